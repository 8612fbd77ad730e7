"""``AsyncEngine``: continuous batching for asyncio applications.

One background thread owns the ``Scheduler`` and runs its steps back to back while any request
is unfinished (``Engine.step`` releases the GIL, so the event loop keeps serving meanwhile).
Requests and aborts reach that thread through a queue and are applied between steps; each
step's ``TokenEvent``s go back to the event loop that made the request (``call_soon_threadsafe``)
into that request's ``asyncio.Queue``.

    engine = AsyncEngine("smollm2-135m", n_threads=4)
    async for event in engine.generate("The capital of France is", SamplingParams(max_tokens=8)):
        print(event.text, end="")
    await engine.abort(request_id)

Leaving the ``async for`` early (break, an exception, the task cancelled) aborts the request,
as does ``await engine.abort(request_id)``; either way its KV pages are freed before the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from lmengine.errors import InvalidRequestError
from lmengine.sampling import SamplingParams
from lmengine.serving.metrics import ServingMetrics
from lmengine.serving.scheduler import Scheduler, SchedulerStats, TokenEvent

__all__ = ["AsyncEngine"]

log = logging.getLogger("lmengine.serving")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """An ``LLM`` served by continuous batching to asyncio code.

    ``model`` is a loaded ``LLM`` or anything ``LLM()`` accepts (then ``llm_kwargs`` go to it).
    ``max_step_tokens`` (default: the LLM's) caps the tokens of one step, ``max_running`` the
    sequences in one step, ``step_time_target`` (seconds) the predicted time of a step that holds
    decodes (prompt chunks only fill its slack; see ``Scheduler``). Safe to call from several
    event loops and threads.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_step_tokens: int | None = None,
        max_running: int = 256,
        step_time_target: float | None = None,
        **llm_kwargs: Any,
    ):
        from lmengine.llm import LLM

        if isinstance(model, LLM):
            if llm_kwargs:
                raise InvalidRequestError("llm_kwargs apply only when model is not an LLM")
            self.llm = model
        else:
            self.llm = LLM(model, **llm_kwargs)
        self.tokenizer = self.llm.tokenizer
        options: dict[str, Any] = {"max_running": max_running, "step_time_target": step_time_target}
        if max_step_tokens is not None:
            options["max_step_tokens"] = max_step_tokens
        self.scheduler = Scheduler.for_llm(self.llm, **options)
        self.metrics = ServingMetrics()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[Hashable, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the thread's start
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        self._id_prefix = f"req-{os.getpid()}-{id(self):x}-"

    # -- public API ---------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.llm.max_context

    def stats(self) -> SchedulerStats:
        """Running and waiting requests, KV pages and preemptions as of the last step."""
        return self.scheduler.stats

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: Hashable | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Submit a request and iterate over its events; the last has ``finished`` set.

        ``prompt`` is text (tokenized with the model's BOS, as ``LLM.generate``) or token ids.
        Validation happens here, before iteration: a bad request raises ``InvalidRequestError``
        (or a subclass) or ``KVCacheFullError`` (it could never fit the pool). Must be called
        with an event loop running. An engine failure during generation raises from the
        iteration.
        """
        if self._closed:
            raise RuntimeError("AsyncEngine is shut down")
        loop = asyncio.get_running_loop()
        arrival = time.perf_counter()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("empty prompt: at least one token is needed")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt
        if request_id is None:
            request_id = f"{self._id_prefix}{next(self._ids)}"
        request = self.scheduler.make_request(request_id, ids, params, arrival)
        stream = _Stream(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._start()
        self._commands.put(("add", request))
        return self._iterate(request_id, stream)

    async def abort(self, request_id: Hashable) -> None:
        """Abort a request: its iterator ends with finish_reason "abort" and its pages are
        freed between steps. Unknown or finished ids are ignored."""
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        """Abort everything and stop the engine thread (blocks for at most one step)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._commands.put(("stop", None))
            thread.join()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # -- event loop side ----------------------------------------------------------------------

    async def _iterate(self, request_id: Hashable, stream: _Stream) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while True:
                event: TokenEvent = await stream.queue.get()
                if event.finished:
                    finished = True
                    if event.error is not None:
                        raise event.error
                yield event
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    @staticmethod
    def _deliver(batch: list[tuple[_Stream, TokenEvent]]) -> None:
        for stream, event in batch:
            stream.queue.put_nowait(event)

    # -- engine thread ------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmengine-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        sched = self.scheduler
        while True:
            events: list[TokenEvent] = []
            try:
                command = self._commands.get(block=not sched.has_unfinished())
            except queue.Empty:
                command = None
            while command is not None:
                kind, arg = command
                if kind == "stop":
                    self._publish(sched.abort_all())
                    return
                if kind == "add":
                    try:
                        sched.enqueue(arg)
                    except Exception as error:  # a duplicate id; the request never ran
                        events.append(
                            TokenEvent(
                                arg.request_id,
                                [],
                                "",
                                arg.num_prompt_tokens,
                                0,
                                finished=True,
                                finish_reason="error",
                                error=error,
                            )
                        )
                elif kind == "abort":
                    event = sched.abort(arg)
                    if event is not None:
                        events.append(event)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if sched.has_unfinished():
                try:
                    events.extend(sched.step())
                except Exception as error:
                    log.exception("engine step failed; failing every request")
                    events.extend(sched.abort_all(error))
            self._publish(events)

    def _publish(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, TokenEvent]]] = {}
        orphans = []
        with self._lock:
            for event in events:
                self.metrics.record_tokens(len(event.token_ids))
                if event.finished:
                    self.metrics.record_finished(event)
                # A finished request's stream is dropped here, not only by its reader, so one
                # never iterated (a client gone before it started) leaves nothing behind.
                if event.finished:
                    stream = self._streams.pop(event.request_id, None)
                else:
                    stream = self._streams.get(event.request_id)
                if stream is None:
                    continue
                by_loop.setdefault(stream.loop, []).append((stream, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: nobody will read these requests
                orphans.extend(stream_event[1].request_id for stream_event in batch)
        for request_id in orphans:
            with self._lock:
                self._streams.pop(request_id, None)
            event = self.scheduler.abort(request_id)
            if event is not None:
                self.metrics.record_finished(event)
