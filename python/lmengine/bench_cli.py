"""``lmengine bench``: a short speed table for one model, with the machine's physical limits.

Peers (llama.cpp, HF transformers) are measured by bench/bench_decode.py; this command is the
quick look a user gets from the README's main command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def best_seconds(fn, reps: int) -> float:
    """Fastest of ``reps`` timed calls of ``fn`` after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_copy_bandwidth(n_bytes: int = 256 << 20, reps: int = 5) -> float:
    """Copy bandwidth in GB/s, counting read + write bytes (best of reps)."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    return 2 * n_bytes / best_seconds(lambda: np.copyto(dst, src), reps) / 1e9


def measure_gemm_peak(n: int = 1024, reps: int = 5) -> float:
    """fp32 GEMM GFLOP/s through numpy's BLAS (best of reps)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / best_seconds(lambda: a @ b, reps) / 1e9


def _text_ids(llm, n: int) -> list[int]:
    texts = []
    for p in sorted(Path("/usr/share/common-licenses").glob("*")):
        if p.is_file():
            texts.append(p.read_text(errors="ignore"))
    text = "\n".join(texts) or "The quick brown fox jumps over the lazy dog. " * 400
    ids = llm.tokenizer.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_quick_bench(args: argparse.Namespace) -> int:
    from lmengine.cli import _attention_kwargs
    from lmengine.llm import LLM
    from lmengine.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        n_threads=args.threads,
        kv_cache_tokens=args.prompt_tokens + args.decode_tokens + 64,
        **_attention_kwargs(args),
    )
    load_s = time.perf_counter() - t0
    ids = _text_ids(llm, args.prompt_tokens)
    greedy1 = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate_ids(ids[:32], greedy1)  # warm-up
    prefill, decode = [], []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        llm.generate_ids(ids, greedy1)
        prefill.append(args.prompt_tokens / (time.perf_counter() - t0))
        short = ids[:16]
        t0 = time.perf_counter()
        llm.generate_ids(short, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = llm.generate_ids(
            short, SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
        )
        dt = time.perf_counter() - t0 - t_first
        decode.append((len(out.token_ids) - 1) / dt)
    bw = measure_copy_bandwidth()
    peak = measure_gemm_peak()
    weight_bytes = llm.checkpoint.weight_bytes
    flops_per_token = 2 * llm.spec.n_params
    rows = [
        ("load time (s)", f"{load_s:.2f}", ""),
        (
            f"prefill tok/s ({args.prompt_tokens} tokens)",
            f"{np.median(prefill):.1f}",
            f"fp32 GEMM peak {peak:.0f} GFLOP/s -> {peak * 1e9 / flops_per_token:.0f} tok/s",
        ),
        (
            f"decode tok/s ({args.decode_tokens} tokens)",
            f"{np.median(decode):.1f}",
            f"{weight_bytes / 1e6:.0f} MB weights / {bw:.1f} GB/s -> {bw * 1e9 / weight_bytes:.0f} tok/s",
        ),
    ]
    print(f"\nlmengine bench: {args.model}, {llm.n_threads} threads, median of {args.reps}")
    print(f"{'metric':<32} {'lmengine':>10}   physical limit")
    for name, value, limit in rows:
        print(f"{name:<32} {value:>10}   {limit}")
    print(
        "(peers: python bench/bench_decode.py measures llama.cpp and HF transformers in the same run)"
    )
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="quick speed table (prefill, decode, load) with physical limits"
    )
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    from lmengine.cli import _add_attention_args

    _add_attention_args(p)
    p.set_defaults(func=run_quick_bench)
    from lmengine.bench.cap_cli import add_cap_parser

    add_cap_parser(p.add_subparsers(dest="bench_command", metavar="{cap}"))
