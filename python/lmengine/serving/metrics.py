"""Prometheus text exposition (format 0.0.4) for the serving metrics, written by hand.

Counters and histograms are updated from the engine thread and the event loop and read by the
``/metrics`` handler; one lock guards them all. Gauges are read at scrape time from callbacks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

__all__ = ["Counter", "Histogram", "Gauge", "Registry", "ServingMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: TTFT spans queueing + prefill (ms to minutes on a loaded CPU);
# TPOT spans one decode step (ms to seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [
            f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items
        ]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = self.header()
        cumulative = 0
        for upper, n in zip(self.buckets, counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(upper)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class Gauge(_Metric):
    """A value read at scrape time from ``read()``."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.read())}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class ServingMetrics:
    """The engine's request, token and latency metrics (names follow vLLM's, prefixed
    ``lmengine_``); ``record_finished`` takes a request's final ``TokenEvent``."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(
            Counter(
                "lmengine_requests_total",
                "Finished requests by finish reason (stop, length, abort, error).",
                ["finish_reason"],
            )
        )
        self.prompt_tokens = r.add(
            Counter("lmengine_prompt_tokens_total", "Prompt tokens of finished requests.")
        )
        self.generation_tokens = r.add(
            Counter("lmengine_generation_tokens_total", "Tokens generated.")
        )
        self.ttft = r.add(
            Histogram(
                "lmengine_time_to_first_token_seconds",
                "From arrival to the first generated token (queueing + prefill).",
                TTFT_BUCKETS,
            )
        )
        self.tpot = r.add(
            Histogram(
                "lmengine_time_per_output_token_seconds",
                "Mean time between a request's generated tokens after the first.",
                TPOT_BUCKETS,
            )
        )
        self.e2e = r.add(
            Histogram(
                "lmengine_e2e_request_latency_seconds",
                "From arrival to the last event of a request.",
                E2E_BUCKETS,
            )
        )

    def record_tokens(self, n: int) -> None:
        if n:
            self.generation_tokens.inc(n)

    def record_finished(self, event) -> None:
        self.requests.inc(1, event.finish_reason or "unknown")
        self.prompt_tokens.inc(event.num_prompt_tokens)
        m = event.metrics or {}
        if m.get("ttft_s") is not None:
            self.ttft.observe(m["ttft_s"])
        if m.get("tpot_s") is not None:
            self.tpot.observe(m["tpot_s"])
        if m.get("e2e_s") is not None:
            self.e2e.observe(m["e2e_s"])
