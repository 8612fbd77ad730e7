"""ReSA: block-sparse decoding with periodic dense rectification (arXiv 2506.04108).

``attention="dense"`` decodes with full attention; ``"sparse"`` makes every decode token attend
only to the KV blocks its selection keeps (see cpp/lmengine/attention_sparse.h); ``"resa"``
decodes sparsely and, every ``rectify_every`` decoded tokens of a sequence, re-runs its last
``rectify_every`` tokens densely through all layers, overwriting their K/V (and refreshing the
block summaries they touch), so the errors of sparse decoding cannot pile up in the cache.

Rectification rides on the next decode: the ``f`` re-run tokens and the token just sampled go in
as one dense chunk of ``f + 1`` tokens at positions ``L - f .. L``; the chunk's last row gives the
logits of the new position, so rectification costs no extra pass over the weights. Prompt chunks
and rectification chunks always attend densely.

``ReSACycle`` is the per-sequence phase both ``LLM`` and the serving ``Scheduler`` drive: one
batch mixes sequences at different points of their cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lmengine.errors import InvalidRequestError

__all__ = [
    "ReSAConfig",
    "ReSACycle",
    "ATTENTION_MODES",
    "check_attention_mode",
    "decode_teacher_forced",
    "logits_by_mode",
]

ATTENTION_MODES = ("dense", "sparse", "resa")


@dataclass(frozen=True)
class ReSAConfig:
    """Block-sparse decoding parameters.

    ``block_size``: positions per block (must equal the KV page size). Of the ``M`` blocks of
    the context, a decode token keeps ``max(ceil(M * keep), min(M, n_min))`` per KV head: always
    the last ``n_local`` and the first ``n_sink``, the rest by the upper bound
    ``sum_j max(q_j kmin_j, q_j kmax_j)`` of their scores. ``rectify_every`` (``f``): decoded
    tokens between two rectifications in ``"resa"`` mode.
    """

    block_size: int = 16
    keep: float = 0.1
    n_min: int = 16
    n_local: int = 1
    n_sink: int = 0
    rectify_every: int = 32

    def __post_init__(self) -> None:
        for name in ("block_size", "n_min", "n_local", "n_sink", "rectify_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequestError(
                    f"ReSAConfig.{name} must be an int, got {type(value).__name__}"
                )
        if not 1 <= self.block_size <= 4096:
            raise InvalidRequestError(
                f"ReSAConfig.block_size must be in [1, 4096], got {self.block_size}"
            )
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise InvalidRequestError(
                f"ReSAConfig.keep must be a number, got {type(self.keep).__name__}"
            )
        if not 0.0 < float(self.keep) <= 1.0:
            raise InvalidRequestError(f"ReSAConfig.keep must be in (0, 1], got {self.keep}")
        for name in ("n_min", "n_local", "n_sink"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(
                    f"ReSAConfig.{name} must be >= 0, got {getattr(self, name)}"
                )
        if self.rectify_every < 1:
            raise InvalidRequestError(
                f"ReSAConfig.rectify_every must be >= 1, got {self.rectify_every}"
            )

    def apply(self, engine) -> None:
        """Sets the selection parameters of an ``lmengine._core.Engine`` built with summaries."""
        engine.set_sparse_attention(float(self.keep), self.n_min, self.n_local, self.n_sink)


def check_attention_mode(attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise InvalidRequestError(
            f"attention must be one of {', '.join(map(repr, ATTENTION_MODES))}, got {attention!r}"
        )
    return attention


class ReSACycle:
    """The decoding phase of one sequence.

    Before each decode token is fed, ``decode()`` says how many already-fed positions to re-run
    with it (0, or ``f`` once ``f`` tokens were decoded sparsely since the prompt or the last
    rectification) and whether the feed is sparse. The caller truncates the sequence's KV by
    that many positions and feeds them plus the new token as one chunk. ``reset()`` after the
    sequence's KV was rebuilt from scratch (preemption and recompute).
    """

    __slots__ = ("sparse", "rectify_every", "n_sparse")

    def __init__(self, attention: str, config: ReSAConfig | None):
        self.sparse = attention != "dense"
        self.rectify_every = config.rectify_every if attention == "resa" and config else 0
        self.n_sparse = 0

    def decode(self) -> tuple[int, bool]:
        """(positions to re-run before the new token, whether the feed is sparse)."""
        if self.rectify_every and self.n_sparse >= self.rectify_every:
            rewind, self.n_sparse = self.n_sparse, 0
            return rewind, False
        if self.sparse:
            self.n_sparse += 1
        return 0, self.sparse

    def reset(self) -> None:
        self.n_sparse = 0


def whole_cycles(n_steps: int, config: ReSAConfig) -> int:
    """n_steps rounded up to whole ReSA cycles: f sparse steps, then the step that re-runs those f
    tokens with its new token (f + 1 steps, as ``ReSACycle`` feeds them). Timings over whole
    cycles include the rectification's amortised cost."""
    cycle = config.rectify_every + 1
    return max(cycle, -(-n_steps // cycle) * cycle)


def decode_teacher_forced(engine, seq: int, ids: np.ndarray, start: int, cycle: ReSACycle):
    """Feeds ``ids[start:]`` to sequence ``seq`` (which holds ``ids[:start]``) one decode token
    at a time, rectifying when ``cycle`` says so; returns their logits, float32
    ``[len(ids) - start, vocab]``. A rectification step's row is the last row of its dense chunk,
    the row generation samples from."""
    rows = []
    for i in range(start, len(ids)):
        rewind, sparse = cycle.decode()
        if rewind:
            engine.seq_truncate(seq, i - rewind)
            rows.append(engine.step([seq], [ids[i - rewind : i + 1]], [False], [False]))
        else:
            rows.append(engine.step([seq], [ids[i : i + 1]], [True], [sparse]))
    return rows


def logits_by_mode(
    llm,
    token_ids,
    prefill: int,
    modes: list[tuple[str, ReSAConfig | None]],
    stats: list[dict] | None = None,
) -> list[np.ndarray]:
    """Teacher-forced logits of ``ids[prefill:]`` under each ``(attention, ReSAConfig)`` of
    ``modes``, as ``llm.logits(ids, prefill)`` gives them, sharing one prefill: after each mode the
    sequence is truncated back to the prompt (decoding writes only positions >= prefill, and
    truncation refreshes the summary of the block it cuts). For quality tests and benchmarks;
    the LLM's own mode is restored afterwards. ``stats``, if given, receives per mode the
    engine's sparse counters accumulated by its decodes and their wall seconds."""
    ids = llm._check_ids(token_ids)
    if not 1 <= prefill < len(ids):
        raise InvalidRequestError(f"prefill must be in [1, {len(ids) - 1}], got {prefill}")
    llm._check_fits(len(ids))
    engine, saved = llm._engine, (llm.attention, llm.resa)
    seq = engine.seq_create()
    try:
        engine.step([seq], [ids[:prefill]], [False])
        out = []
        for attention, config in modes:
            llm.set_attention(attention, config)
            cycle = ReSACycle(attention, llm.resa)
            before, t0 = engine.sparse_counters(), time.perf_counter()
            out.append(np.concatenate(decode_teacher_forced(engine, seq, ids, prefill, cycle)))
            if stats is not None:
                after = engine.sparse_counters()
                delta = {key: after[key] - before[key] for key in after}
                stats.append({**delta, "seconds": time.perf_counter() - t0})
            engine.seq_truncate(seq, prefill)
        return out
    finally:
        engine.seq_free(seq)
        llm.set_attention(*saved)
