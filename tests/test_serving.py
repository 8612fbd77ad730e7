"""The OpenAI-compatible server, end to end: a real `lmengine serve` process on a free loopback
port, driven by the official `openai` client (and raw httpx for malformed bodies). Greedy results
must equal `LLM.generate` / `LLM.chat` on the same prompt, under 32 concurrent clients too; bad
requests get OpenAI-style errors while the server keeps serving; disconnecting frees pages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import lmengine  # noqa: E402
from lmengine import SamplingParams  # noqa: E402

MODEL = "smol"
MAX_CONTEXT = 256
KV_TOKENS = 1024  # 64 pages: the 32-client test needs more, so requests queue and preempt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf_path):
    port = free_port()
    env = dict(os.environ)
    # The server imports the same lmengine as this test (installed, or ./python in place).
    package_root = str(Path(lmengine.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "lmengine.cli", "serve",
        "-m", str(smollm2_gguf_path), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "-t", "2",
        "--kv-cache-tokens", str(KV_TOKENS), "--max-context", str(MAX_CONTEXT),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up in 90 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_pool_empty(base: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        idle = m["lmengine_num_requests_running"] == 0 and m["lmengine_num_requests_waiting"] == 0
        if idle and m["lmengine_kv_cache_pages_used"] == 0:
            return m
        assert time.monotonic() < deadline, f"KV pool not released: {m}"
        time.sleep(0.1)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


# -- AsyncEngine inside an asyncio application ------------------------------------------------


def test_async_engine_embedded_in_asyncio(smollm2):
    from lmengine import AsyncEngine
    from lmengine.errors import InvalidRequestError

    prompts = ["The capital of France is", "1+1="]
    params = greedy(6, ignore_eos=True)
    want = [smollm2.generate(p, params)[0] for p in prompts]

    async def main():
        async with AsyncEngine(smollm2) as engine:

            async def run(prompt, request_id):
                text, ids, last = "", [], None
                async for event in engine.generate(prompt, params, request_id=request_id):
                    text, ids, last = text + event.text, ids + event.token_ids, event
                return text, ids, last

            long = engine.generate("Once upon a time", greedy(200, ignore_eos=True), "long")
            first = await long.__anext__()
            results = await asyncio.gather(*(run(p, i) for i, p in enumerate(prompts)))
            await engine.abort("long")
            rest = [event async for event in long]
            with pytest.raises(InvalidRequestError):
                engine.generate("", params)
            return results, first, rest, engine.stats()

    results, first, rest, stats = asyncio.run(main())
    for (text, ids, last), ref in zip(results, want):
        assert ids == ref.token_ids and text == ref.text
        assert last.finished and last.finish_reason == "length" and last.metrics["ttft_s"] > 0
    assert len(first.token_ids) == 1
    assert rest[-1].finish_reason == "abort" and rest[-1].num_output_tokens < 200
    assert stats.running == stats.waiting == 0 and stats.free_pages == stats.total_pages


# -- results equal the offline API ------------------------------------------------------------


def test_models_health_and_completion_match_llm(server, client, smollm2):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}

    prompt = "The capital of France is"
    want = smollm2.generate(prompt, greedy(12))[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)


def test_chat_matches_llm_chat(client, smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = smollm2.chat(messages, greedy(12))
    got = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)


def test_streaming_equals_whole_response(client, smollm2):
    prompt = "Once upon a time"
    want = smollm2.generate(prompt, greedy(10))[0]
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text and len([c for c in chunks if c.choices]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)

    messages = [{"role": "user", "content": "Say hello."}]
    want_chat = smollm2.chat(messages, greedy(10))
    deltas = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == want_chat.text
    assert deltas[-1].choices[0].finish_reason == want_chat.finish_reason


def test_n_choices_seed_and_stop(client, smollm2):
    prompt = "My favourite animal is"
    sampled = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=3
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]
    # Choice i draws with seed + i: choice 0 is LLM.generate with the same seed.
    want = smollm2.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=11))[0]
    assert sampled.choices[0].text == want.text
    assert len({c.text for c in sampled.choices}) > 1

    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
        n=2, stream=True,
    )  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts[0] == texts[1] != ""

    stop_prompt = "The capital of France is"
    want = smollm2.generate(stop_prompt, greedy(8, stop=["."]))[0]
    got = client.completions.create(
        model=MODEL, prompt=stop_prompt, max_tokens=8, temperature=0, stop=["."]
    )
    assert got.choices[0].text == want.text == " Paris"
    assert got.choices[0].finish_reason == "stop" == want.finish_reason


def test_logprobs(client, smollm2):
    want = smollm2.generate("2+2=", greedy(4, logprobs=2))[0]
    got = client.completions.create(
        model=MODEL, prompt="2+2=", max_tokens=4, temperature=0, logprobs=2
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) == len(lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(top) <= 2 for top in lp.top_logprobs)

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


# -- load -------------------------------------------------------------------------------------


def test_32_concurrent_clients_match_sequential_and_free_the_pool(server, smollm2, english_text):
    words = english_text.split()
    cases = []
    for i in range(32):
        start = 53 * i
        prompt = " ".join(words[start : start + 2 + (i * 7) % 12])
        cases.append((prompt, 2 + (i * 5) % 7))
    # One request at a time through LLM.generate: the sequential reference.
    t0 = time.perf_counter()
    want = [smollm2.generate(p, greedy(n, ignore_eos=True))[0] for p, n in cases]
    print(f"sequential reference: {time.perf_counter() - t0:.1f} s")

    async def run_all():
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120
        ) as aclient:
            calls = [
                aclient.completions.create(
                    model=MODEL,
                    prompt=p,
                    max_tokens=n,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                for p, n in cases
            ]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=180)

    before = metrics(server)
    t0 = time.perf_counter()
    outs = asyncio.run(run_all())
    print(f"32 concurrent clients: {time.perf_counter() - t0:.1f} s")
    for (prompt, n), out, ref in zip(cases, outs, want):
        assert out.choices[0].text == ref.text, prompt
        assert out.usage.completion_tokens == n == len(ref.token_ids)
    after = wait_pool_empty(server)
    done = 'lmengine_requests_total{finish_reason="length"}'
    assert after[done] - before.get(done, 0) == 32
    assert after["lmengine_generation_tokens_total"] - before[
        "lmengine_generation_tokens_total"
    ] == sum(n for _, n in cases)


# -- bad requests -----------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, client):
    url = f"{server}/v1/completions"
    headers = {"content-type": "application/json"}
    cases = [
        ('{"model": "smol", "prompt": "x", ', 400, None),  # malformed JSON
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": {"text": "x"}}), 400, "prompt"),
        (json.dumps({"model": MODEL}), 400, "prompt"),
        (json.dumps({"model": "gpt-17", "prompt": "x"}), 404, "model"),
        (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -5}), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "prompt": "x", "n": 1000}), 400, "n"),
        (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}), 400, "temperature"),
        (json.dumps({"model": MODEL, "prompt": "word " * (MAX_CONTEXT + 10)}), 400, "prompt"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == status, (body[:60], r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param), error
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": "hello"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    assert httpx.get(f"{server}/v1/nothing").status_code == 404

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="unknown", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="word " * (MAX_CONTEXT + 10), max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    ok = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    wait_pool_empty(server)


# -- disconnects ------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    aborted = 'lmengine_requests_total{finish_reason="abort"}'
    before = metrics(server).get(aborted, 0)
    body = {
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
        "ignore_eos": True, "stream": True,
    }  # fmt: skip
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
            if len(got) == 3:
                break
    assert all(c["choices"][0]["finish_reason"] is None for c in got)
    m = wait_pool_empty(server)
    assert m[aborted] == before + 1

    # A non-streaming client that gives up is aborted too.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=1.5)
    m = wait_pool_empty(server)
    assert m[aborted] == before + 2


def test_metrics_are_prometheus_text(server):
    r = httpx.get(f"{server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "lmengine_time_to_first_token_seconds_bucket",
        "lmengine_time_per_output_token_seconds_count",
        "lmengine_generation_tokens_total",
        "lmengine_prompt_tokens_total",
        "lmengine_kv_cache_usage_ratio",
        "lmengine_http_requests_total",
    ):
        assert name in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(
            r"[a-z0-9_]+(\{[^}]*\})? [-+0-9.eInf]+", line
        ), line
