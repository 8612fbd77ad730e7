"""Online serving: output tokens/s, TTFT and TPOT of `lmengine serve` against llama.cpp's own
server (`llama_cpp.server` from llama-cpp-python) on the same GGUF, threads and load.

Question: with 1, 4, 16 and 64 concurrent streaming clients on loopback, each sending requests
of mixed prompt and output lengths back to back, how many output tokens per second does each
server deliver, how long do clients wait for the first token (TTFT) and between tokens (TPOT),
and how close is that to the machine's physical limits, measured in the same run?

Method
- Both servers run as subprocesses for the whole run, each with --threads threads; the levels
  alternate between them (level C: lmengine, then llama.cpp), so slow drifts of the machine's
  load hit both alike. The clients are one asyncio process (httpx, SSE parsed by hand).
- llama.cpp's server runs under the side venv's python (~/.cache/lmengine/peers/llamacpp-venv,
  built by bench/bench_decode.py; its [server] extra is installed here on first use) with flash
  attention on, logits_all off (lmengine computes only the rows it samples), and
  interrupt_requests off (its default cancels a running request when a new one arrives).
  llama-cpp-python's server runs one request at a time; queued requests wait, which its TTFT shows.
- Requests: greedy (temperature 0; repeat_penalty 1 for llama.cpp, whose default is 1.1), EOS
  ignored so both generate exactly max_tokens (lmengine: ignore_eos; llama.cpp: min_tokens =
  max_tokens). Prompts are windows of the /usr/share/common-licenses token stream at distinct
  offsets (no shared prefix, so llama.cpp's reuse of the previous prompt's KV cannot skip work),
  decoded to text; lengths and max_tokens are drawn uniformly from the ranges below with a seed
  per level, the same for both servers. Each level sends min(max(8, 2 C), 64) requests (or
  --requests) through C client tasks.
- Per request: TTFT = first non-empty text chunk - send; TPOT = (last chunk - first chunk) /
  (chunks - 1); output tokens from the usage chunk (lmengine) or the count of text chunks
  (llama.cpp streams one per token; checked in validation). Output tok/s = all output tokens /
  the level's wall time.
- Validation before timing: one 16-token greedy request on each server; both must return 16
  tokens; the texts are printed side by side (the two engines' arithmetic differs, so they may
  part after a few tokens).
- Physical limits, measured in the same run (bench_decode's worker): memory bandwidth (numpy
  copy) and fp32 GEMM peak. Output tok/s bound for a level = min(C x bandwidth / weight bytes
  (each step streams the weights once for up to C sequences), GEMM peak / FLOPs per output token
  of the level's workload (2 x block params per prompt token + 2 x all params per output token,
  spread over its output tokens)). Integer-dot kernels can beat an fp32 GEMM bound.
- The load average is printed before and after: other work on the machine skews every number.

Usage: python bench/bench_serving.py [--model PATH] [--threads 2] [--concurrency 1,4,16,64]
       [--systems lmengine,llamacpp] [--quick]. Results: a table on stdout, JSON and CSV in
       bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402  (shared helpers: side venv, limits worker, license text)

ALL_SYSTEMS = ("lmengine", "llamacpp")
VALIDATION_TOKENS = 16
SERVED_NAME = "bench-model"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def ensure_llamacpp_server(python: Path) -> None:
    """llama-cpp-python's server needs its [server] extra (fastapi, uvicorn, sse-starlette...)."""
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True)
    if probe.returncode == 0:
        return
    version = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    log(f"installing llama-cpp-python[server]=={version} extras into {python.parent.parent}")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"llama-cpp-python[server]=={version}"],
        check=True,
    )


def start_lmengine(args, port: int, kv_tokens: int, log_file) -> subprocess.Popen:
    lmengine = bd.import_lmengine()
    env = dict(os.environ)
    package_root = str(Path(lmengine.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "lmengine.cli", "serve", "-m", args.model,
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "-t", str(args.threads), "--kv-cache-tokens", str(kv_tokens),
        "--max-step-tokens", str(args.max_step_tokens), "--log-level", "warning",
    ]  # fmt: skip
    if args.step_time_target > 0:
        cmd += ["--step-time-target", str(args.step_time_target)]
    if args.max_running > 0:
        cmd += ["--max-running", str(args.max_running)]
    return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def start_llamacpp(args, python: Path, port: int, n_ctx: int, log_file) -> subprocess.Popen:
    cmd = [
        str(python), "-m", "llama_cpp.server", "--model", args.model,
        "--model_alias", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
        "--n_ctx", str(n_ctx), "--n_batch", "512", "--flash_attn", "true",
        "--logits_all", "false", "--interrupt_requests", "false", "--verbose", "false",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {base} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def request_body(system: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if system == "lmengine":
        body.update(ignore_eos=True, stream_options={"include_usage": True})
    else:
        body.update(min_tokens=max_tokens, repeat_penalty=1.0)
    return body


async def one_request(client, base: str, system: str, prompt: str, max_tokens: int) -> dict:
    body = request_body(system, prompt, max_tokens)
    start = time.perf_counter()
    chunk_times, texts, usage_tokens = [], [], None
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{system}: HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    chunk_times.append(time.perf_counter())
                    texts.append(choice["text"])
    end = time.perf_counter()
    n_chunks = len(chunk_times)
    return {
        "ttft_s": chunk_times[0] - start if chunk_times else None,
        "tpot_s": (chunk_times[-1] - chunk_times[0]) / (n_chunks - 1) if n_chunks > 1 else None,
        "e2e_s": end - start,
        "output_tokens": usage_tokens if usage_tokens is not None else n_chunks,
        "chunks": n_chunks,
        "max_tokens": max_tokens,
        "text": "".join(texts),
        "start": start,
        "end": end,
    }


async def run_level(base: str, system: str, cases: list[tuple[str, int]], concurrency: int):
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)
    results = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt, max_tokens = queue.get_nowait()
                results.append(await one_request(client, base, system, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(results: list[dict], wall: float) -> dict:
    out_tokens = sum(r["output_tokens"] for r in results)
    summary = {
        "requests": len(results),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "requests_per_s": len(results) / wall,
    }
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        values = [r[key] for r in results]
        for q in (50, 90, 99):
            summary[f"{key[:-2]}_p{q}_s"] = percentile(values, q)
    return summary


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


def make_workloads(stream: list[int], decode, args) -> tuple[str, dict[int, list]]:
    """The validation prompt and, per level, (prompt text, max_tokens) cases; windows of the
    token stream never overlap, so no prompt shares a prefix with another."""
    offset = 0

    def window(n: int) -> str:
        nonlocal offset
        if offset + n > len(stream):
            offset = 0  # the license stream is long; wrapping only happens for huge runs
        ids = stream[offset : offset + n]
        offset += n + 1
        return decode(ids)

    validation = window(32)
    workloads = {}
    for c in args.concurrency:
        rng = random.Random(args.seed * 1000 + c)
        n_requests = args.requests or min(max(8, 2 * c), 64)
        workloads[c] = [
            (
                window(rng.randint(args.min_prompt, args.max_prompt)),
                rng.randint(args.min_output, args.max_output),
            )
            for _ in range(n_requests)
        ]
    return validation, workloads


def level_bound(cases, concurrency: int, prompt_tokens: list[int], limits, params, file_bytes):
    """Physical bound on output tok/s for one level (see the module docstring)."""
    outputs = sum(n for _, n in cases)
    bandwidth_bound = concurrency * limits["bandwidth_GBps"] * 1e9 / file_bytes
    blocks, total = params.get("n_params_blocks"), params.get("n_params")
    if not blocks or not total:
        return bandwidth_bound, None
    flops = 2 * blocks * sum(prompt_tokens) + 2 * total * outputs
    compute_bound = outputs / (flops / (limits["gemm_GFLOPs"] * 1e9))
    return min(bandwidth_bound, compute_bound), compute_bound


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=bd.DEFAULT_MODEL, help="GGUF file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=0, help="per level (0: max(8, 2C) <= 64)")
    parser.add_argument("--min-prompt", type=int, default=32)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--max-step-tokens", type=int, default=512, help="lmengine's step budget")
    parser.add_argument(
        "--step-time-target",
        type=float,
        default=0.05,
        help="lmengine's per-step time bound with decodes running, seconds (0: none)",
    )
    parser.add_argument(
        "--max-running", type=int, default=0, help="lmengine's sequences per step (0: default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    parser.add_argument("--llamacpp-python", help="python with llama_cpp (default: side venv)")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.min_prompt, args.max_prompt, args.min_output, args.max_output = 16, 48, 8, 24
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(ALL_SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(set(systems) - set(ALL_SYSTEMS))}")
    args.model = os.path.abspath(args.model)
    if not os.path.isfile(args.model):
        raise SystemExit(f"model file not found: {args.model} (pass --model PATH to a GGUF)")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"WARNING: load average {load_before[0]:.1f} before the run; numbers will be skewed")

    log(f"physical limits with {args.threads} threads ...")
    limits_cfg = {"threads": args.threads, "bandwidth_mib": 512, "bandwidth_reps": 5}
    limits_cfg["gemm_reps"] = 5
    limits = bd.run_worker("limits", sys.executable, limits_cfg, results_dir, 600)
    if "error" in limits:
        raise SystemExit(f"limits measurement failed: {limits['error']}")
    params = bd.gguf_param_counts(args.model)
    file_bytes = os.path.getsize(args.model)

    lmengine = bd.import_lmengine()
    from lmengine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(args.model)
    stream = tokenizer.encode(bd.license_text(), add_special_tokens=False)
    validation_prompt, workloads = make_workloads(stream, tokenizer.decode, args)
    prompt_tokens = {
        c: [len(tokenizer.encode(p)) for p, _ in cases] for c, cases in workloads.items()
    }
    log(f"lmengine {lmengine.__version__}; {len(stream)} license tokens; levels {args.concurrency}")

    longest = args.max_prompt + args.max_output + 64
    kv_tokens = max(args.concurrency) * longest
    procs: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    log_files = []
    try:
        for system in systems:
            port = free_port()
            log_path = results_dir / f".bench_serving_{system}.log"
            log_file = open(log_path, "w")  # noqa: SIM115 - closed in finally
            log_files.append(log_file)
            if system == "lmengine":
                procs[system] = start_lmengine(args, port, kv_tokens, log_file)
            else:
                python = (
                    Path(args.llamacpp_python) if args.llamacpp_python else bd.side_venv_python()
                )
                if not bd.llamacpp_importable(python):
                    bd.install_llamacpp()
                ensure_llamacpp_server(python)
                procs[system] = start_llamacpp(args, python, port, longest, log_file)
            bases[system] = f"http://127.0.0.1:{port}"
        for system in systems:
            wait_ready(bases[system], procs[system])
            log(
                f"{system}: ready at {bases[system]} (log {results_dir}/.bench_serving_{system}.log)"
            )

        validation = {}
        for system in systems:
            (result,), _ = asyncio.run(
                run_level(bases[system], system, [(validation_prompt, VALIDATION_TOKENS)], 1)
            )
            if result["output_tokens"] != VALIDATION_TOKENS:
                raise SystemExit(
                    f"{system}: asked for {VALIDATION_TOKENS} tokens, got {result['output_tokens']}"
                )
            validation[system] = result["text"]
            log(f"  validated {system}: {result['text']!r}")
        if len(validation) == 2:
            a, b = validation.values()
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            log(f"  greedy texts agree on the first {same} of {len(a)} characters")

        rows = []
        for c in args.concurrency:
            cases = workloads[c]
            bound, compute_bound = level_bound(
                cases, c, prompt_tokens[c], limits, params, file_bytes
            )
            for system in systems:
                log(f"{system}: {len(cases)} requests from {c} clients ...")
                results, wall = asyncio.run(run_level(bases[system], system, cases, c))
                short = [r for r in results if r["output_tokens"] != r["max_tokens"]]
                summary = summarize(results, wall)
                summary.update(
                    system=system,
                    concurrency=c,
                    bound_tok_s=bound,
                    compute_bound_tok_s=compute_bound,
                    prompt_tokens=sum(prompt_tokens[c]),
                    short_requests=len(short),
                )
                rows.append(summary)
                log(
                    f"  {summary['output_tok_s']:.1f} out tok/s, TTFT p50 "
                    f"{fmt(summary['ttft_p50_s'], '.3f')} s, TPOT p50 "
                    f"{fmt(summary['tpot_p50_s'], '.4f')} s"
                )
    finally:
        for proc in procs.values():
            stop(proc)
        for f in log_files:
            f.close()

    load_after = os.getloadavg()
    report(args, limits, params, file_bytes, validation, rows, load_before, load_after)
    stem = results_dir / f"bench_serving-{started}"
    payload = {
        "args": vars(args),
        "limits": limits,
        "params": params,
        "validation": validation,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
    }
    Path(f"{stem}.json").write_text(json.dumps(payload, indent=2))
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nresults: {stem}.json, {stem}.csv")


def report(args, limits, params, file_bytes, validation, rows, load_before, load_after) -> None:
    print()
    print(
        f"model      {args.model} ({file_bytes / 1e6:.1f} MB, {params.get('n_params', '?')} params)"
    )
    print(
        f"limits     {limits['bandwidth_GBps']:.1f} GB/s copy bandwidth, "
        f"{limits['gemm_GFLOPs']:.1f} GFLOP/s fp32 GEMM, {args.threads} threads"
    )
    print(
        f"workload   prompts {args.min_prompt}-{args.max_prompt} tokens, outputs "
        f"{args.min_output}-{args.max_output} tokens, greedy, streaming"
    )
    print(f"load avg   before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    header = (
        f"{'clients':>7} {'system':<9} {'reqs':>4} {'out tok/s':>9} {'x peer':>6} {'bound':>7} "
        f"{'% bound':>7} {'TTFT p50':>8} {'p90':>7} {'p99':>7} {'TPOT p50':>8} {'p90':>7} "
        f"{'p99':>7}"
    )
    print(header)
    print("-" * len(header))
    by_level: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_level.setdefault(row["concurrency"], {})[row["system"]] = row
    for c, systems in by_level.items():
        for system, row in systems.items():
            peers = [r for s, r in systems.items() if s != system]
            ratio = row["output_tok_s"] / peers[0]["output_tok_s"] if peers else None
            print(
                f"{c:>7} {system:<9} {row['requests']:>4} {row['output_tok_s']:>9.1f} "
                f"{fmt(ratio, '.2f'):>6} {row['bound_tok_s']:>7.0f} "
                f"{100 * row['output_tok_s'] / row['bound_tok_s']:>6.1f}% "
                f"{fmt(row['ttft_p50_s'], '.3f'):>8} {fmt(row['ttft_p90_s'], '.3f'):>7} "
                f"{fmt(row['ttft_p99_s'], '.3f'):>7} {fmt(row['tpot_p50_s'], '.4f'):>8} "
                f"{fmt(row['tpot_p90_s'], '.4f'):>7} {fmt(row['tpot_p99_s'], '.4f'):>7}"
            )
    print(
        "\nTTFT/TPOT in seconds. 'x peer': output tok/s over the other server's at the same level."
        "\n'bound': min(C x bandwidth / weight bytes, fp32 GEMM peak / workload FLOPs per output"
        " token)."
    )


if __name__ == "__main__":
    main()
