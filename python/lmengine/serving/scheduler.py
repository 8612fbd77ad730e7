"""Continuous batching over the core's paged KV cache: the synchronous ``Scheduler``.

Every ``step()`` builds one batch for ``Engine.step`` and runs it:

1. one decode token for each running sequence whose known tokens are all in the KV cache but the
   last (decodes go first, so a long prompt never stalls generation);
2. prompt chunks of running sequences still being prefilled, then of newly admitted ones, until
   the step holds ``max_step_tokens`` tokens (chunked prefill). With ``step_time_target`` set,
   a step that holds decodes takes prompt tokens only while its time, predicted by an online
   ``StepCostModel`` fitted to the steps so far, stays under the target: decodes never wait
   behind a long prompt (the time per output token stays near the target), and prompts are
   prefilled in the slack of each step, and a request is admitted only while a step decoding
   every running sequence and it is predicted to fit the target (the batch sizes itself);
3. admission is first-come first-served by free pages: the head of the waiting queue is admitted
   when the pool's free pages, less those still owed to admitted prompts, hold its whole prompt.
   Nothing is reserved for the tokens a request will generate; sequences grow page by page.
4. When a decode needs a page and none is free, the youngest running sequence (latest arrival)
   is preempted: its pages are freed and it goes back to the waiting queue in arrival order with
   prompt + generated tokens as the tokens to recompute. Its sampler, detokenizer and stop state
   are kept, so once recomputed it continues exactly where it stopped (prefill and decode
   compute the same bits, see docs/architecture.md), and a seeded request draws the same tokens.

A request is accepted only if it fits the whole pool alone (prompt + max_tokens), so the oldest
sequence can always finish once everything younger is preempted: the pool running out is never
an error. Finished and aborted sequences free their pages at once.

The scheduler is not thread-safe: one thread calls ``add_request``/``abort``/``step``
(``AsyncEngine`` runs it in its own thread and passes requests to it through a queue).

Invariant, per sequence: ``tokens`` = prompt + every generated token; the KV cache holds
``tokens[:n_computed]``; a token is sampled when a step brings ``n_computed`` to ``len(tokens)``.

Sparse decoding (``attention="sparse"|"resa"``, see ``lmengine.resa``): decode tokens attend
block-sparsely; in ``"resa"`` mode each sequence's ``ReSACycle`` turns every ``f+1``-th decode
into a rectification: the sequence's KV is truncated by ``f`` (``n_computed -= f``) and the step
feeds those ``f`` tokens with the new one as one dense chunk. Truncating first frees exactly the
pages the chunk takes back, so page planning is that of a one-token decode; the chunk's extra
tokens are not counted against ``max_step_tokens``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmengine.errors import ContextLengthError, InvalidRequestError, KVCacheFullError
from lmengine.resa import ReSAConfig, ReSACycle, check_attention_mode
from lmengine.sampling import Sampler, SamplingParams, StopChecker, end_of_request, greedy
from lmengine.serving.step_cost import StepCostModel

__all__ = ["Scheduler", "TokenEvent", "SchedulerStats"]


@dataclass
class TokenEvent:
    """What one step did for one request: the tokens it generated (zero or one) and the text
    now safe to stream; the last event of a request has ``finished`` set.

    ``finish_reason``: "stop" (EOS, stop string or stop token), "length" (max_tokens or the end
    of the context), "abort", or "error" (``error`` holds the exception).
    """

    request_id: Hashable
    token_ids: list[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: Exception | None = None
    # On the final event: ttft_s, e2e_s, tpot_s (None under two tokens), queue_s, preemptions.
    metrics: dict[str, Any] | None = None


@dataclass
class SchedulerStats:
    """A snapshot taken at the end of every step and abort, so readers in other threads never
    wait on the engine (whose properties lock the mutex a running step holds)."""

    running: int = 0
    waiting: int = 0
    free_pages: int = 0
    total_pages: int = 0
    page_size: int = 0
    preemptions: int = 0
    steps: int = 0


@dataclass(eq=False)
class _Sequence:
    request_id: Hashable
    arrival: int
    tokens: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    sampler: Sampler
    stops: StopChecker
    detok: Any
    max_new: int
    t_arrival: float
    seq: int = -1
    n_computed: int = 0
    n_output: int = 0
    preemptions: int = 0
    t_admitted: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    cycle: ReSACycle | None = None


def _pages(n_tokens: int, page_size: int) -> int:
    return -(-n_tokens // page_size)


class Scheduler:
    """Continuous batching of requests over one ``lmengine._core.Engine``.

    ``add_request`` validates and queues a request (raising ``InvalidRequestError``,
    ``ContextLengthError``, ``SamplingParamsError`` or ``KVCacheFullError`` at once);
    ``step()`` runs one batched engine step and returns the ``TokenEvent`` of every request that
    generated a token or finished in it; ``abort`` drops a request and frees its pages.
    ``max_running`` caps how many sequences share a step. ``step_time_target`` (seconds, or
    None for no limit) bounds the predicted time of steps that hold decodes (see the module
    docstring).
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        vocab_size: int,
        max_context: int,
        max_step_tokens: int = 512,
        max_running: int = 256,
        step_time_target: float | None = None,
        attention: str = "dense",
        resa: ReSAConfig | None = None,
    ):
        if max_step_tokens < 1:
            raise InvalidRequestError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if max_running < 1:
            raise InvalidRequestError(f"max_running must be >= 1, got {max_running}")
        if step_time_target is not None and not step_time_target > 0:
            raise InvalidRequestError(
                f"step_time_target must be > 0 seconds or None, got {step_time_target}"
            )
        self.step_time_target = None if step_time_target is None else float(step_time_target)
        self.cost_model = StepCostModel()
        self.engine = engine
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.max_context = int(max_context)
        self.max_step_tokens = int(max_step_tokens)
        self.max_running = int(max_running)
        self.attention = check_attention_mode(attention)
        self.resa = ReSAConfig() if resa is None else resa
        self.page_size = int(engine.page_size)
        self.total_pages = int(engine.total_pages)
        self._eos_ids = frozenset(tokenizer.eos_token_ids)
        self._arrivals = itertools.count()
        self._requests: dict[Hashable, _Sequence] = {}
        self._running: list[_Sequence] = []  # sorted by arrival
        self._waiting: list[_Sequence] = []  # sorted by arrival
        self._waiting_keys: list[int] = []
        self.stats = SchedulerStats(page_size=self.page_size, total_pages=self.total_pages)
        self._snapshot()

    @classmethod
    def for_llm(cls, llm: Any, **kwargs: Any) -> Scheduler:
        """A scheduler over an ``LLM``'s engine, tokenizer and limits."""
        kwargs.setdefault("max_step_tokens", llm.max_step_tokens)
        kwargs.setdefault("attention", llm.attention)
        kwargs.setdefault("resa", llm.resa)
        return cls(
            llm._engine,
            llm.tokenizer,
            vocab_size=llm.vocab_size,
            max_context=llm.max_context,
            **kwargs,
        )

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: Hashable,
        prompt_token_ids: Sequence[int] | np.ndarray,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request (FCFS). Raises at once if it is invalid or could never fit."""
        self.enqueue(self.make_request(request_id, prompt_token_ids, params, arrival_time))

    def make_request(
        self,
        request_id: Hashable,
        prompt_token_ids: Sequence[int] | np.ndarray,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> _Sequence:
        """Validate a request and build its state without touching the queues; reads only
        immutable settings, so another thread may call it while ``step`` runs."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = np.asarray(prompt_token_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InvalidRequestError("prompt token ids must be a flat sequence of integers")
        if ids.size == 0:
            raise InvalidRequestError("empty prompt: at least one token is needed")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise InvalidRequestError(
                f"token id {int(ids[bad][0])} out of range [0, {self.vocab_size})"
            )
        n_prompt = int(ids.size)
        if n_prompt >= self.max_context:
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens does not fit the context of {self.max_context} "
                f"(at least one position must be left to generate)"
            )
        max_new = min(params.max_tokens, self.max_context - n_prompt)
        # The last generated token is never fed back, so the sequence peaks at this length.
        peak = n_prompt + max_new - 1
        if _pages(peak, self.page_size) > self.total_pages:
            raise KVCacheFullError(
                f"request needs {peak} KV positions but the pool holds "
                f"{self.total_pages * self.page_size}; raise kv_cache_tokens"
            )
        prompt = ids.astype(np.int64).tolist()
        return _Sequence(
            request_id=request_id,
            arrival=-1,
            tokens=prompt,
            num_prompt_tokens=n_prompt,
            params=params,
            sampler=Sampler(params, ids),
            stops=StopChecker.from_params(params),
            detok=self.tokenizer.stream_decoder(),
            max_new=max_new,
            t_arrival=time.perf_counter() if arrival_time is None else arrival_time,
            cycle=ReSACycle(self.attention, self.resa),
        )

    def enqueue(self, request: _Sequence) -> None:
        """Queue a request built by ``make_request``."""
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        request.arrival = next(self._arrivals)
        self._requests[request.request_id] = request
        self._wait(request)
        self._snapshot()

    def abort(self, request_id: Hashable) -> TokenEvent | None:
        """Drop a request and free its pages. Returns its closing event (finish_reason
        "abort"), or None if the id is unknown or already finished."""
        s = self._requests.get(request_id)
        if s is None:
            return None
        event = self._final(s, "abort")
        self._snapshot()
        return event

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Schedule and run one batched engine step; returns its events (maybe none)."""
        events: list[TokenEvent] = []
        t_start = time.perf_counter()
        plan = self._schedule(events)
        if not plan:
            self._snapshot()
            return events
        seqs = list(plan)
        sparse = [self._decode_feed(s, plan) for s in seqs]
        work = self._work(plan)  # after rectification chunks widened their plans
        chunks = [
            np.asarray(s.tokens[s.n_computed : s.n_computed + plan[s]], dtype=np.int32)
            for s in seqs
        ]
        # Dense schedulers keep the 3-argument step, so any engine-like object works.
        extra = (sparse,) if self.attention != "dense" else ()
        try:
            logits = self.engine.step([s.seq for s in seqs], chunks, [False] * len(seqs), *extra)
        except KVCacheFullError:
            # Pages taken since planning by sequences this scheduler does not own. The failed
            # step changed nothing: make room from the young end and plan again next step.
            if len(self._running) <= 1:
                raise
            self._preempt(self._running[-1])
            self._snapshot()
            return events
        # logits: (len(seqs), vocab), one row per sequence (its last fed token)
        self.stats.steps += 1
        sampling_rows, sampling = [], []
        for row, s in enumerate(seqs):
            s.n_computed += plan[s]
            if s.n_computed == len(s.tokens):
                sampling_rows.append(row)
                sampling.append(s)
        now = time.perf_counter()
        plain = [i for i, s in enumerate(sampling) if s.sampler.is_plain_greedy]
        chosen: dict[int, tuple[int, float | None, Any]] = {}
        if plain:
            ids = greedy(logits[[sampling_rows[i] for i in plain]])
            for i, token in zip(plain, ids.tolist()):
                sampling[i].sampler.record(token)
                chosen[i] = (token, None, None)
        for i, s in enumerate(sampling):
            if i not in chosen:
                result = s.sampler.sample(logits[sampling_rows[i]])
                chosen[i] = (result.token_id, result.logprob, result.top_logprobs)
        for i, s in enumerate(sampling):
            events.append(self._advance(s, *chosen[i], now))
        self.cost_model.observe(*work, time.perf_counter() - t_start)
        self._snapshot()
        return events

    @staticmethod
    def _work(plan: dict[_Sequence, int]) -> tuple[int, int, float]:
        """(decode tokens, prompt tokens, positions attended) of a planned step."""
        n_decode = n_prefill = 0
        attended = 0.0
        for s, n in plan.items():
            if n == 1 and len(s.tokens) - s.n_computed == 1:
                n_decode += 1
            else:
                n_prefill += n
            attended += n * s.n_computed + n * (n + 1) / 2
        return n_decode, n_prefill, attended

    def _decode_feed(self, s: _Sequence, plan: dict[_Sequence, int]) -> bool:
        """Whether s's feed this step is sparse; turns a due decode into a rectification chunk
        (truncating s's KV and widening ``plan[s]``)."""
        if plan[s] != 1 or len(s.tokens) - s.n_computed != 1:
            return False
        rewind, sparse = s.cycle.decode()
        if rewind:
            self.engine.seq_truncate(s.seq, s.n_computed - rewind)
            s.n_computed -= rewind
            plan[s] += rewind
        return sparse

    def _schedule(self, events: list[TokenEvent]) -> dict[_Sequence, int]:
        """The tokens each sequence feeds this step (insertion order = row order)."""
        while True:
            plan = self._plan()
            if plan or not (self._running or self._waiting):
                return plan
            if self._running:
                # Nothing could move (prefills starved of pages): make room from the young end.
                self._preempt(self._running[-1])
            else:
                # An empty scheduler whose head request still does not fit: the pool is held
                # by sequences this scheduler does not own.
                head = self._waiting[0]
                error = KVCacheFullError(
                    f"the KV pool has {self.engine.free_pages} free pages, the rest held by "
                    f"sequences outside this scheduler; the request needs "
                    f"{_pages(len(head.tokens), self.page_size)}"
                )
                events.append(self._final(head, "error", error))

    def _plan(self) -> dict[_Sequence, int]:
        ps = self.page_size
        free = int(self.engine.free_pages)
        budget = self.max_step_tokens
        plan: dict[_Sequence, int] = {}

        def growth(s: _Sequence, n: int) -> int:
            return _pages(s.n_computed + n, ps) - _pages(s.n_computed, ps)

        for s in list(self._running):
            if budget == 0:
                break
            if s.seq < 0 or len(s.tokens) - s.n_computed != 1:
                continue
            need = growth(s, 1)
            while need > free:
                victim = self._running[-1]
                free += _pages(victim.n_computed, ps)
                if victim in plan:
                    free += growth(victim, plan[victim])
                    budget += plan.pop(victim)
                self._preempt(victim)
                if victim is s:
                    break
            if s.seq < 0:
                continue
            plan[s] = 1
            free -= need
            budget -= 1

        decoding = self._work(plan) if plan and self.step_time_target is not None else None

        def allowance(s: _Sequence, n: int) -> int:
            """n, cut so that a step with decodes stays within the time target."""
            nonlocal decoding
            if decoding is None:
                return n
            n_dec, n_pre, attended = decoding
            cap = self.cost_model.prefill_allowance(
                n_dec, n_pre, attended, s.n_computed, self.step_time_target
            )
            n = n if cap is None else min(n, cap)
            decoding = (n_dec, n_pre + n, attended + n * s.n_computed + n * (n + 1) / 2)
            return n

        for s in self._running:
            if budget == 0:
                break
            remaining = len(s.tokens) - s.n_computed
            if s in plan or remaining <= 1:
                continue
            n = min(remaining, budget, (_pages(s.n_computed, ps) + free) * ps - s.n_computed)
            n = allowance(s, n) if n > 0 else n
            if n > 0:
                plan[s] = n
                free -= growth(s, n)
                budget -= n

        # Pages still owed to admitted prompts beyond this step.
        owed = sum(
            _pages(len(s.tokens), ps) - _pages(s.n_computed + plan.get(s, 0), ps)
            for s in self._running
        )
        while self._waiting and budget > 0 and len(self._running) < self.max_running:
            s = self._waiting[0]
            need = _pages(len(s.tokens), ps)
            if need > free - owed or not self._decode_fits(s):
                break
            n = allowance(s, min(len(s.tokens), budget))
            if n == 0:
                break
            del self._waiting[0], self._waiting_keys[0]
            s.seq = self.engine.seq_create()
            if not s.t_admitted:
                s.t_admitted = time.perf_counter()
            self._running.insert(bisect.bisect([r.arrival for r in self._running], s.arrival), s)
            plan[s] = n
            free -= _pages(n, ps)
            owed += need - _pages(n, ps)
            budget -= n
        return plan

    def _decode_fits(self, s: _Sequence) -> bool:
        """With a time target, a request joins only while a step decoding every running sequence
        and it is predicted to stay within the target: the running batch sizes itself to the
        time per output token asked for. The first sequence is always admitted."""
        if self.step_time_target is None or not self._running or not self.cost_model.ready:
            return True
        attended = sum(len(r.tokens) for r in self._running) + len(s.tokens)
        n = len(self._running) + 1
        return self.cost_model.predict(n, 0, attended) <= self.step_time_target

    # -- per-sequence bookkeeping ---------------------------------------------------------------

    def _wait(self, s: _Sequence) -> None:
        i = bisect.bisect(self._waiting_keys, s.arrival)
        self._waiting.insert(i, s)
        self._waiting_keys.insert(i, s.arrival)

    def _preempt(self, s: _Sequence) -> None:
        self._running.remove(s)
        self._release(s)
        s.n_computed = 0
        s.cycle.reset()
        s.preemptions += 1
        self.stats.preemptions += 1
        self._wait(s)

    def _release(self, s: _Sequence) -> None:
        if s.seq >= 0:
            self.engine.seq_free(s.seq)
            s.seq = -1

    def _advance(
        self, s: _Sequence, token: int, logprob: float | None, top: Any, now: float
    ) -> TokenEvent:
        """Record one sampled token: its text, the stop checks, and the request's end if due."""
        if not s.n_output:
            s.t_first = now
        s.t_last = now
        s.tokens.append(token)
        s.n_output += 1
        reason, text, stop_reason = self._check_end(s, token)
        want_lp = s.params.logprobs is not None
        event = TokenEvent(
            request_id=s.request_id,
            token_ids=[token],
            text=text,
            num_prompt_tokens=s.num_prompt_tokens,
            num_output_tokens=s.n_output,
            logprobs=[logprob] if want_lp else None,
            top_logprobs=[top or []] if want_lp else None,
        )
        if reason is not None:
            self._finish(s, event, reason, stop_reason)
        return event

    def _check_end(self, s: _Sequence, token: int) -> tuple[str | None, str, str | int | None]:
        """(finish reason or None, text to emit, stop reason) after ``token``; the rules are
        ``sampling.end_of_request``, shared with ``LLM``."""
        return end_of_request(
            token, s.params, self._eos_ids, s.stops, s.detok, s.n_output, s.max_new
        )

    def _final(self, s: _Sequence, reason: str, error: Exception | None = None) -> TokenEvent:
        """A closing event without a token (abort, error)."""
        event = TokenEvent(
            request_id=s.request_id,
            token_ids=[],
            text="",
            num_prompt_tokens=s.num_prompt_tokens,
            num_output_tokens=s.n_output,
            error=error,
        )
        self._finish(s, event, reason, None)
        return event

    def _finish(
        self, s: _Sequence, event: TokenEvent, reason: str, stop_reason: str | int | None
    ) -> None:
        """Mark ``event`` as s's last; remove s and free its pages if still held."""
        if self._requests.get(s.request_id) is s:
            del self._requests[s.request_id]
            if s.seq >= 0:
                self._running.remove(s)
                self._release(s)
            elif s in self._waiting:
                i = self._waiting.index(s)
                del self._waiting[i], self._waiting_keys[i]
        event.finished = True
        event.finish_reason = reason
        event.stop_reason = stop_reason
        now = time.perf_counter()
        event.metrics = {
            "ttft_s": s.t_first - s.t_arrival if s.n_output else None,
            "e2e_s": now - s.t_arrival,
            "tpot_s": (s.t_last - s.t_first) / (s.n_output - 1) if s.n_output > 1 else None,
            "queue_s": s.t_admitted - s.t_arrival if s.t_admitted else None,
            "preemptions": s.preemptions,
        }

    def abort_all(self, error: Exception | None = None) -> list[TokenEvent]:
        """End every request (after an engine failure): their final events, pages freed."""
        events = [
            self._final(s, "error" if error else "abort", error)
            for s in list(self._requests.values())
        ]
        self._snapshot()
        return events

    def _snapshot(self) -> None:
        st = self.stats
        st.running, st.waiting = len(self._running), len(self._waiting)
        st.free_pages = int(self.engine.free_pages)
