"""An OpenAI-compatible HTTP server over ``AsyncEngine``: FastAPI routes, run by uvicorn.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream over SSE with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Request handling, in order: the body is parsed and type-checked (bad JSON or types: 400), the
model name checked (404), the prompt rendered and tokenized and every request of the body built
and validated (400, nothing has started yet), then the ``n`` choices (x prompts) run as separate
engine requests. Choice ``i`` of a seeded request uses ``seed + i``, so the choices differ and
each is reproducible (choice 0 equals ``LLM.generate`` with ``seed``). A client that disconnects
aborts every request of its body, streaming or not, so their KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmengine.errors import (
    ContextLengthError,
    KVCacheFullError,
    LMEngineError,
    SamplingParamsError,
)
from lmengine.sampling import SamplingParams
from lmengine.serving.async_engine import AsyncEngine
from lmengine.serving.metrics import CONTENT_TYPE, Counter, Gauge, Registry
from lmengine.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body
from lmengine.serving.scheduler import TokenEvent

__all__ = ["create_app", "serve", "DEFAULT_MAX_N"]

log = logging.getLogger("lmengine.serving")

DEFAULT_MAX_N = 16


class _APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(status: int, message: str, param=None, code=None, type_=None) -> JSONResponse:
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "internal_error"
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _engine_error(error: LMEngineError) -> _APIError:
    """A validation failure of the engine as an HTTP error (all are the client's to fix)."""
    if isinstance(error, ContextLengthError):
        return _APIError(400, str(error), "prompt", "context_length_exceeded")
    if isinstance(error, SamplingParamsError):
        message = str(error)
        param = (
            message.split(".", 1)[1].split(" ", 1)[0]
            if message.startswith("SamplingParams.")
            else None
        )
        return _APIError(400, message.replace("SamplingParams.", "", 1), param)
    if isinstance(error, KVCacheFullError):
        return _APIError(400, str(error), "max_tokens", "kv_cache_too_small")
    return _APIError(400, str(error))


# --------------------------------------------------------------------------------------------
# One HTTP request's engine requests
# --------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    echo_text: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


def _sampling_params(
    body, max_tokens: int, logprobs: int | None, seed: int | None
) -> SamplingParams:
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": seed,
        "stop": body.stop,
        "stop_token_ids": body.stop_token_ids,
        "ignore_eos": body.ignore_eos,
        "logprobs": logprobs,
        "include_stop_str_in_output": body.include_stop_str_in_output,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    return SamplingParams(**options)


class _Server:
    def __init__(self, engine: AsyncEngine, model_name: str, max_n: int):
        self.engine = engine
        self.model_name = model_name
        self.max_n = max_n
        self.created = int(time.time())

    # -- validation ---------------------------------------------------------------------------

    def check_common(self, body) -> None:
        if body.model != self.model_name:
            raise _APIError(
                404, f"The model `{body.model}` does not exist.", "model", "model_not_found"
            )
        if not 1 <= body.n <= self.max_n:
            raise _APIError(400, f"n must be in [1, {self.max_n}], got {body.n}", "n")
        if body.logit_bias:
            raise _APIError(400, "logit_bias is not supported", "logit_bias")

    def build_choices(
        self,
        prompts: list[list[int]],
        body,
        max_tokens: int | None,
        logprobs: int | None,
        kind: str,
    ) -> list[_Choice]:
        """Every (prompt, n) choice with validated params; raises _APIError before any runs."""
        choices = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise _APIError(400, "empty prompt: at least one token is needed", "prompt")
            room = self.engine.max_context - len(ids)
            if room < 1:
                raise _APIError(
                    400,
                    f"This model's maximum context length is {self.engine.max_context} tokens; "
                    f"the prompt has {len(ids)} tokens, leaving none to generate.",
                    "messages" if kind == "chat" else "prompt",
                    "context_length_exceeded",
                )
            wanted = room if max_tokens is None else max_tokens
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                try:
                    params = _sampling_params(body, wanted, logprobs, seed)
                except LMEngineError as error:
                    raise _engine_error(error) from error
                choices.append(
                    _Choice(
                        index=p * body.n + j,
                        prompt_index=p,
                        prompt_ids=ids,
                        params=params,
                        request_id=f"{kind}-{uuid.uuid4().hex}",
                    )
                )
        return choices

    def tokenize_completion_prompts(
        self, body: CompletionRequest
    ) -> tuple[list[list[int]], list[str]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(x, str) for x in prompt):
            texts = list(prompt)
        elif prompt and all(isinstance(x, list) for x in prompt):
            return [list(x) for x in prompt], [self.engine.tokenizer.decode(x) for x in prompt]
        elif all(isinstance(x, int) for x in prompt):
            return [list(prompt)], [self.engine.tokenizer.decode(prompt)]
        else:
            raise _APIError(
                400, "prompt must be a string, strings, token ids or lists of them", "prompt"
            )
        ids = []
        for text in texts:
            if not text:
                raise _APIError(400, "empty prompt: at least one token is needed", "prompt")
            ids.append(self.engine.tokenizer.encode(text))
        return ids, texts

    def tokenize_chat(self, body: ChatCompletionRequest) -> list[int]:
        if not body.messages:
            raise _APIError(400, "messages must hold at least one message", "messages")
        if body.tools:
            raise _APIError(400, "tools are not supported", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _APIError(
                400, 'only response_format {"type": "text"} is supported', "response_format"
            )
        messages = []
        for m in body.messages:
            message = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                message["content"] = "".join(part.text for part in m.content)
            elif m.content is None:
                message["content"] = ""
            messages.append(message)
        try:
            text = self.engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **(body.chat_template_kwargs or {})
            )
        except LMEngineError as error:
            raise _APIError(400, str(error), "messages") from error
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    # -- running ------------------------------------------------------------------------------

    async def start(self, choices: list[_Choice]) -> list[AsyncIterator[TokenEvent]]:
        """Submit every choice, or none: a failure aborts those already submitted."""
        streams = []
        try:
            for c in choices:
                streams.append(self.engine.generate(c.prompt_ids, c.params, c.request_id))
        except LMEngineError as error:
            await self.abort(choices[: len(streams)])
            raise _engine_error(error) from error
        return streams

    async def abort(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.finish_reason is None:
                await self.engine.abort(c.request_id)

    async def _finish_tasks(self, tasks: list[asyncio.Future], choices: list[_Choice]) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.abort(choices)

    async def collect(self, choices: list[_Choice], streams) -> None:
        async def run(choice: _Choice, stream) -> None:
            async for event in stream:
                self.absorb(choice, event)

        tasks = [asyncio.ensure_future(run(c, s)) for c, s in zip(choices, streams)]
        try:
            await asyncio.gather(*tasks)
        finally:
            await self._finish_tasks(tasks, choices)

    @staticmethod
    def absorb(choice: _Choice, event: TokenEvent) -> None:
        choice.text.append(event.text)
        choice.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            choice.logprobs.extend(event.logprobs)
            choice.top_logprobs.extend(event.top_logprobs or [])
        if event.finished:
            choice.finish_reason = event.finish_reason

    async def merged(
        self, choices: list[_Choice], streams
    ) -> AsyncIterator[tuple[_Choice, TokenEvent]]:
        """Events of every choice as they come; closing this aborts whatever still runs."""
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(choice: _Choice, stream) -> None:
            try:
                async for event in stream:
                    events.put_nowait((choice, event))
            except Exception as error:
                events.put_nowait((choice, error))
            finally:
                events.put_nowait((choice, done))

        tasks = [asyncio.ensure_future(pump(c, s)) for c, s in zip(choices, streams)]
        remaining = len(tasks)
        try:
            while remaining:
                choice, item = await events.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield choice, item
        finally:
            await self._finish_tasks(tasks, choices)

    # -- formatting ---------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, token_ids, logprobs, top, offset: int) -> dict[str, Any]:
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs),
            "top_logprobs": [{self.token_text(i): lp for i, lp in entry} for entry in top],
            "text_offset": offsets,
        }

    def chat_logprobs(self, token_ids, logprobs, top) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, logprob, alternatives in zip(token_ids, logprobs, top):
            item = entry(token_id, logprob)
            item["top_logprobs"] = [entry(i, lp) for i, lp in alternatives]
            content.append(item)
        return {"content": content}

    @staticmethod
    def usage(choices: list[_Choice]) -> dict[str, int]:
        prompts: dict[int, int] = {c.prompt_index: len(c.prompt_ids) for c in choices}
        prompt_tokens = sum(prompts.values())
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events from an async iterator of strings. Listens for the client's
    disconnect while streaming and then closes the iterator at once (so its requests are
    aborted), whatever the ASGI server's spec version. ``cleanup`` runs last in every case,
    also when the iterator never started."""

    def __init__(self, chunks: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]):
        super().__init__(
            chunks,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.chunks = chunks
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send(
                    {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streamer = asyncio.ensure_future(stream())
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({streamer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            streamer.cancel()
            try:
                await streamer
            except (asyncio.CancelledError, OSError):
                pass  # the client left (uvicorn raises an OSError on send after a disconnect)
            except Exception:
                log.exception("event stream failed")
            await self.chunks.aclose()
            await self.cleanup()


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Runs ``work`` until done or the client disconnects (then cancels it): (done, result)."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()  # its finally blocks abort the engine requests
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


class _HTTPMetrics:
    """Pure ASGI middleware counting responses by route and status (streams included)."""

    def __init__(self, app, counter: Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
        route = path if path in known else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counter.inc(1, route, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: AsyncEngine, model_name: str, *, max_n: int = DEFAULT_MAX_N) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (the only model it knows)."""
    from lmengine import __version__

    server = _Server(engine, model_name, max_n)
    app = FastAPI(title="lmengine", version=__version__)
    registry = Registry()
    http_requests = registry.add(
        Counter(
            "lmengine_http_requests_total",
            "HTTP responses by route and status.",
            ["route", "status"],
        )
    )
    stats = engine.stats
    for name, help_text, read in (
        (
            "lmengine_num_requests_running",
            "Requests whose sequences are in the running batch.",
            lambda: stats().running,
        ),
        (
            "lmengine_num_requests_waiting",
            "Requests waiting for KV pages (new or preempted).",
            lambda: stats().waiting,
        ),
        ("lmengine_kv_cache_pages_total", "Pages in the KV pool.", lambda: stats().total_pages),
        (
            "lmengine_kv_cache_pages_used",
            "KV pages held by sequences.",
            lambda: stats().total_pages - stats().free_pages,
        ),
        (
            "lmengine_kv_cache_usage_ratio",
            "Fraction of the KV pool in use (0-1).",
            lambda: 1 - stats().free_pages / max(1, stats().total_pages),
        ),
        ("lmengine_kv_cache_page_size_tokens", "Tokens per KV page.", lambda: stats().page_size),
        (
            "lmengine_num_preemptions_total",
            "Sequences preempted (pages freed, recomputed later).",
            lambda: stats().preemptions,
        ),
        ("lmengine_engine_steps_total", "Batched engine steps run.", lambda: stats().steps),
    ):
        registry.add(Gauge(name, help_text, read))
    app.add_middleware(_HTTPMetrics, counter=http_requests)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error_response(
                400, f"Malformed JSON body: {first.get('msg', '')}", code="invalid_json"
            )
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
            for e in errors[:5]
        )
        return _error_response(400, f"Invalid request: {message}", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(_APIError)
    async def on_api_error(request: Request, exc: _APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"{type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "lmengine",
                    "max_model_len": engine.max_context,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        text = engine.metrics.registry.render() + registry.render()
        return Response(text, media_type=CONTENT_TYPE)

    def _event_stream(body, response_id, obj, created, choices, events) -> _EventStream:
        """SSE response of one request: ``events(chunk)`` yields its choice chunks; then the
        usage chunk if asked, an error chunk if the engine failed, and [DONE]. A client that
        disconnects aborts the request's choices."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice_list, usage=None) -> str:
            payload = {
                "id": response_id,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": choice_list,
            }
            if include_usage:
                payload["usage"] = usage
            return _sse(payload)

        async def stream() -> AsyncIterator[str]:
            try:
                async for piece in events(chunk):
                    yield piece
                if include_usage:
                    yield chunk([], server.usage(choices))
            except LMEngineError as error:
                yield _sse(error_body(str(error), "internal_error"))
            yield "data: [DONE]\n\n"

        return _EventStream(stream(), lambda: server.abort(choices))

    async def _collected(request, choices, streams, response_id, obj, created, choice_body):
        """Non-streaming response: waits for every choice (499 if the client left first)."""
        finished, _ = await _unless_disconnected(request, server.collect(choices, streams))
        if not finished:
            return Response(status_code=499)
        return JSONResponse(
            {
                "id": response_id,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": [choice_body(c) for c in choices],
                "usage": server.usage(choices),
            }
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.check_common(body)
        if body.best_of is not None and body.best_of != body.n:
            raise _APIError(400, "best_of other than n is not supported", "best_of")
        if body.suffix:
            raise _APIError(400, "suffix is not supported", "suffix")
        if body.max_tokens is not None and body.max_tokens < 1:
            raise _APIError(
                400, f"max_tokens must be at least 1, got {body.max_tokens}", "max_tokens"
            )
        if body.echo and body.logprobs is not None:
            raise _APIError(400, "echo with logprobs is not supported", "echo")
        prompts, texts = server.tokenize_completion_prompts(body)
        choices = server.build_choices(prompts, body, body.max_tokens, body.logprobs, "cmpl")
        if body.echo:
            for c in choices:
                c.echo_text = texts[c.prompt_index]
        streams = await server.start(choices)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        want_lp = body.logprobs is not None

        def logprobs_of(choice, token_ids, logprobs, top, offset):
            if not want_lp:
                return None
            return server.completion_logprobs(token_ids, logprobs, top, offset)

        if body.stream:

            async def events(chunk) -> AsyncIterator[str]:
                offsets = {c.index: 0 for c in choices}
                for c in choices:
                    if c.echo_text:
                        yield chunk(
                            [
                                {
                                    "index": c.index,
                                    "text": c.echo_text,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ]
                        )
                async for c, event in server.merged(choices, streams):
                    server.absorb(c, event)
                    if not (event.text or event.finished or (want_lp and event.token_ids)):
                        continue
                    lp = logprobs_of(
                        c,
                        event.token_ids,
                        event.logprobs or [],
                        event.top_logprobs or [],
                        offsets[c.index],
                    )
                    offsets[c.index] += (
                        sum(len(server.token_text(t)) for t in event.token_ids) if want_lp else 0
                    )
                    yield chunk(
                        [
                            {
                                "index": c.index,
                                "text": event.text,
                                "logprobs": lp,
                                "finish_reason": event.finish_reason if event.finished else None,
                            }
                        ]
                    )

            return _event_stream(body, response_id, "text_completion", created, choices, events)

        return await _collected(
            request,
            choices,
            streams,
            response_id,
            "text_completion",
            created,
            lambda c: {
                "index": c.index,
                "text": c.echo_text + "".join(c.text),
                "logprobs": logprobs_of(c, c.token_ids, c.logprobs, c.top_logprobs, 0),
                "finish_reason": c.finish_reason,
            },
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server.check_common(body)
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        if max_tokens is not None and max_tokens < 1:
            param = (
                "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            )
            raise _APIError(400, f"{param} must be at least 1, got {max_tokens}", param)
        if body.top_logprobs is not None and not body.logprobs:
            raise _APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        ids = server.tokenize_chat(body)
        choices = server.build_choices([ids], body, max_tokens, logprobs, "chatcmpl")
        streams = await server.start(choices)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        if body.stream:

            async def events(chunk) -> AsyncIterator[str]:
                for c in choices:
                    yield chunk(
                        [
                            {
                                "index": c.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                async for c, event in server.merged(choices, streams):
                    server.absorb(c, event)
                    if event.text or (logprobs is not None and event.token_ids):
                        lp = None
                        if logprobs is not None:
                            lp = server.chat_logprobs(
                                event.token_ids, event.logprobs or [], event.top_logprobs or []
                            )
                        yield chunk(
                            [
                                {
                                    "index": c.index,
                                    "delta": {"content": event.text},
                                    "logprobs": lp,
                                    "finish_reason": None,
                                }
                            ]
                        )
                    if event.finished:
                        yield chunk(
                            [
                                {
                                    "index": c.index,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": event.finish_reason,
                                }
                            ]
                        )

            return _event_stream(
                body, response_id, "chat.completion.chunk", created, choices, events
            )

        return await _collected(
            request,
            choices,
            streams,
            response_id,
            "chat.completion",
            created,
            lambda c: {
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": server.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs)
                if logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
            },
        )

    return app


def serve(
    engine: AsyncEngine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_n: int = DEFAULT_MAX_N,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Run the server in this thread until interrupted; then stop the engine."""
    import uvicorn

    app = create_app(engine, model_name, max_n=max_n)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
    finally:
        engine.shutdown()
