"""Long-context decoding: step latency and tokens/s vs context length, per attention mode.

Question: how does a decode step's time grow with the context (2K .. 128K positions) at batch 1
and 4, how much of it is attention, how close is dense attention to the memory-bandwidth limit,
and how much do the sparse modes (ReSA: block-sparse attention + periodic dense rectification)
save against dense, next to what ReSA's cost model predicts?

Method
- Model: SmolLM2-135M-Instruct (GGUF Q4_1) with max_context raised to the length (RoPE is not
  extended; speed does not depend on it). KV cache fp16 by default: 23 KB per position (30 layers
  x 3 KV heads x 64 x K+V x 2 B), 3 GB per sequence at 128K.
- Filling: every sequence gets `context` positions of K/V imported through
  Engine.seq_write_kv, drawn per (layer, head, dim) with the mean/std of a short real prefill
  (lmengine.profile_cli.fill_sequences), instead of minutes of prefill.
- Each (mode, context, batch) gets a fresh LLM; after 2 warm-up steps, --steps decode steps are
  timed one by one (wall) with Engine.op_seconds() reset around each: end-to-end = mean step
  wall time; attention-only = the step's selection + sparse + dense attention op time, both as
  means over the timed steps. ReSA runs whole rectification cycles (a multiple of f + 1 steps, one
  of which carries the f-token dense chunk), so its mean is the amortised cost, as in use.
- Peer: dense attention in the same run; for each sparse mode the measured attention-only and
  end-to-end speedups are printed beside the cost model's prediction of the KV bytes read,
  1 / (1/b + keep + 1/f) for resa and 1 / (1/b + keep) for sparse (defaults b=16, keep=0.1,
  f=32, or the values the LLM carries).
- Physical limit: KV bytes of a dense step / copy bandwidth (numpy copy, read + write bytes,
  measured in this run) = the fastest dense attention can be at this context.
- Chunk attention (--chunk, dense rows at batch 1): one 32-token chunk (a ReSA rectification's
  shape) at the full context, its attention op time against 32 dense decode steps' attention, and
  its GFLOP/s (4 x tokens x heads x head_dim x context x layers FLOPs) against numpy's fp32
  GEMM (same threads, measured in this run).
- Combinations whose KV pool would not fit in half of MemAvailable are skipped, and say so.

Usage: python bench/bench_long_context.py [--contexts 2048,8192,32768,65536,131072]
       [--batches 1,4] [--attention dense,resa,sparse] [--steps 8] [--kv-dtype f16]
       [--threads 2] [--model PATH]. Results: table on stdout, CSV + JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from lmengine.bench_cli import measure_copy_bandwidth, measure_gemm_peak  # noqa: E402
from lmengine.errors import LMEngineError  # noqa: E402
from lmengine.profile_cli import (  # noqa: E402
    decode_steps,
    fill_sequences,
    kv_bytes_per_token,
    llm_attention_kwargs,
    op_group,
)
from lmengine.resa import ReSAConfig, whole_cycles  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
ATTENTION_GROUPS = ("selection", "sparse attention", "dense attention")
CHUNK_TOKENS = 32


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def cost_model(mode: str, llm) -> float | None:
    """Fraction of dense KV bytes read per step by ReSA's cost model (None for dense)."""
    if mode == "dense":
        return None
    cfg = getattr(llm, "resa", None) or getattr(llm, "resa_config", None)
    b = getattr(cfg, "block_size", 16)
    keep = getattr(cfg, "keep", 0.1)
    f = getattr(cfg, "rectify_every", 32)
    return 1.0 / b + keep + (1.0 / f if mode == "resa" else 0.0)


def attention_seconds(record) -> float:
    return sum(s for k, s in record["ops"].items() if op_group(k) in ATTENTION_GROUPS)


def chunk_attention(llm, seq: int, context: int, n_layers: int) -> dict:
    """One CHUNK_TOKENS-token chunk appended at `context` (then truncated away): attention op
    seconds and GFLOP/s."""
    eng = llm._engine
    ids = np.random.default_rng(5).integers(0, llm.spec.vocab_size, CHUNK_TOKENS).astype(np.int32)
    best = float("inf")
    for _ in range(2):
        eng.reset_op_seconds()
        eng.step([seq], [ids], [False])
        best = min(best, eng.op_seconds()["attention"])
        eng.seq_truncate(seq, context)
    spec = llm.spec
    keys = CHUNK_TOKENS * context + CHUNK_TOKENS * (CHUNK_TOKENS + 1) // 2
    flops = 4 * spec.n_heads * spec.head_dim * keys * n_layers
    return {"chunk_attention_s": best, "chunk_gflops": flops / best / 1e9}


def run_config(args, mode, context, batch, bw) -> dict | None:
    from lmengine.llm import LLM

    try:
        kw = llm_attention_kwargs(mode)
    except LMEngineError as e:
        print(f"  skip {mode}: {e}", flush=True)
        return None
    # Sparse modes run whole rectification cycles: with resa a cycle is f sparse steps and then
    # one step that carries the f re-run tokens with its new token (f + 1 steps: ReSACycle), and
    # the mean over a whole number of cycles is the amortised cost. (Until 2026-11-29 12:20 this
    # used multiples of f, so the timed steps never contained the rectification step.)
    n_steps = args.steps
    if mode == "resa":
        n_steps = whole_cycles(n_steps, ReSAConfig())  # the LLM below runs the default ReSAConfig
    span = context + n_steps + 2 + CHUNK_TOKENS + 16
    llm = LLM(
        args.model,
        n_threads=args.threads,
        kv_cache_tokens=batch * span,
        kv_dtype=args.kv_dtype,
        max_context=span,
        **kw,
    )
    t0 = time.perf_counter()
    seqs = fill_sequences(llm, batch, context, "import")
    fill_s = time.perf_counter() - t0
    try:
        decode_steps(llm, seqs, 2)
        records = decode_steps(llm, seqs, n_steps, seed=1)
        extra = {}
        if args.chunk and batch == 1 and mode == "dense":
            llm._engine.seq_truncate(seqs[0], context)
            extra = chunk_attention(llm, seqs[0], context, llm.spec.n_layers)
    finally:
        for s in seqs:
            llm._engine.seq_free(s)
    per_tok = kv_bytes_per_token(llm, args.kv_dtype)
    ctx_mid = context + 2 + n_steps // 2
    kv_bytes = batch * ctx_mid * per_tok
    # Means, not medians: a rectification step is 1 in f and its cost belongs in the figure.
    step_s = float(np.mean([r["wall_s"] for r in records]))
    attn_s = float(np.mean([attention_seconds(r) for r in records]))
    frac = cost_model(mode, llm)
    row = {
        "mode": mode,
        "context": context,
        "batch": batch,
        "kv_dtype": args.kv_dtype,
        "threads": llm.n_threads,
        "steps": n_steps,
        "fill_s": fill_s,
        "step_ms": step_s * 1e3,
        "tok_s": batch / step_s,
        "attention_ms": attn_s * 1e3,
        "attention_share": attn_s / step_s,
        "kv_mb_dense": kv_bytes / 1e6,
        "dense_attention_limit_ms": kv_bytes / bw * 1e3,
        "attention_gb_s_if_dense_read": kv_bytes / attn_s / 1e9 if attn_s > 0 else None,
        "cost_model_fraction": frac,
        "rectification_steps": sum(r["tokens"] > batch for r in records),
    }
    if mode == "resa" and row["rectification_steps"] == 0:
        raise RuntimeError(
            "resa: no rectification step among the timed steps; the figure would leave it out"
        )
    if extra:
        row.update(extra)
        row["decode32_attention_s"] = CHUNK_TOKENS * attn_s
    del llm
    gc.collect()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--contexts", default="2048,8192,32768,65536,131072")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--attention", default="dense,resa,sparse")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv-dtype", default="f16", choices=["f32", "f16", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-chunk", dest="chunk", action="store_false", help="skip the chunk run")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    if "dense" not in modes:
        modes.insert(0, "dense")  # the peer every speedup is measured against

    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    bw = measure_copy_bandwidth() * 1e9
    gemm = measure_gemm_peak()
    load = os.getloadavg()
    print(
        f"copy bandwidth {bw / 1e9:.1f} GB/s, numpy fp32 GEMM {gemm:.0f} GFLOP/s, "
        f"load average {load[0]:.1f}",
        flush=True,
    )
    from lmengine.models.loader import load_checkpoint
    from lmengine.registry import resolve_model

    spec = load_checkpoint(resolve_model(args.model)).spec
    elem = {"f32": 4, "f16": 2, "bf16": 2}[args.kv_dtype]
    per_tok = 2 * spec.n_layers * spec.n_kv_heads * spec.head_dim * elem
    rows = []
    for context in contexts:
        for batch in batches:
            need = batch * (context + args.steps + 64) * per_tok
            if need > 0.5 * mem_available():
                print(
                    f"skip context {context} batch {batch}: KV pool {need / 2**30:.1f} GiB > half of "
                    f"MemAvailable {mem_available() / 2**30:.1f} GiB",
                    flush=True,
                )
                continue
            dense = None
            for mode in modes:
                print(f"run {mode} context {context} batch {batch}", flush=True)
                row = run_config(args, mode, context, batch, bw)
                if row is None:
                    continue
                if mode == "dense":
                    dense = row
                elif dense is not None:
                    row["speedup_e2e"] = dense["step_ms"] / row["step_ms"]
                    row["speedup_attention"] = dense["attention_ms"] / row["attention_ms"]
                    row["speedup_predicted"] = 1.0 / row["cost_model_fraction"]
                rows.append(row)

    print(
        f"\n{'mode':<6} {'ctx':>7} {'B':>2} {'step ms':>9} {'tok/s':>7} {'attn ms':>9} "
        f"{'attn %':>6} {'limit ms':>8} {'attn GB/s':>9} {'x e2e':>6} {'x attn':>6} {'x model':>7}"
    )
    for r in rows:
        sp = [r.get(k) for k in ("speedup_e2e", "speedup_attention", "speedup_predicted")]
        sps = " ".join(f"{v:6.2f}" if v else f"{'-':>6}" for v in sp)
        print(
            f"{r['mode']:<6} {r['context']:>7} {r['batch']:>2} {r['step_ms']:9.1f} {r['tok_s']:7.2f} "
            f"{r['attention_ms']:9.1f} {100 * r['attention_share']:5.0f}% "
            f"{r['dense_attention_limit_ms']:8.1f} {r['attention_gb_s_if_dense_read'] or 0:9.1f} {sps}"
        )
    chunk_rows = [r for r in rows if "chunk_attention_s" in r]
    if chunk_rows:
        print(
            f"\n{CHUNK_TOKENS}-token chunk (rectification shape), dense, batch 1 "
            f"(numpy GEMM {gemm:.0f} GFLOP/s):"
        )
        print(
            f"{'ctx':>7} {'chunk attn ms':>13} {'32 decode attn ms':>17} {'ratio':>6} {'GFLOP/s':>8}"
        )
        for r in chunk_rows:
            print(
                f"{r['context']:>7} {r['chunk_attention_s'] * 1e3:13.1f} "
                f"{r['decode32_attention_s'] * 1e3:17.1f} "
                f"{r['chunk_attention_s'] / r['decode32_attention_s']:6.2f} {r['chunk_gflops']:8.1f}"
            )
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "copy_bandwidth_gb_s": bw / 1e9,
        "numpy_gemm_gflops": gemm,
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "args": vars(args),
    }
    (out / f"long_context_{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    keys = sorted({k for r in rows for k in r})
    with open(out / f"long_context_{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(
        f"\nload average at end {os.getloadavg()[0]:.1f}; wrote {out}/long_context_{stamp}.{{json,csv}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
