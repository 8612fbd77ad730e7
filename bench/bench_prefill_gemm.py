"""Prompt-chunk products: lmengine's fp32-activation kernel against its 8-bit kernels and numpy.

Question: on one core, at the shapes of the default model (SmolLM2-135M, Q4_1 blocks and the Q8_0
LM head), how many GFLOP/s does each product path reach for a prompt chunk of T tokens?
- ``fp32``: ``quant_matmul(..., fp32_activations=True)`` (C++ matmul_rows_f32): weights dequantized
  panel by panel, fp32 FMA micro-kernel; what prompt chunks of >= 8 tokens use.
- ``int8 x2``: the 8-bit kernel over 2T activation rows, the work of the default two-level
  (value + residual) activations that prompts used before and short chunks still use.
- ``int8``: the 8-bit kernel over T rows (single 8-bit activation rows, llama.cpp's scheme).
- peer: numpy fp32 GEMM of the same shape on dequantized weights (OpenBLAS, one thread), and the
  same numpy GEMM at 2048^3 as the core's practical fp32 peak.
Each path is validated against float64 numpy before it is timed. Times are the best of --reps
calls (the machine is shared; the minimum is the least disturbed), one thread everywhere.

With --engine-reps N (> 0) it also times the whole engine: greedy generation of one token after a
--prompt-tokens prompt of license text on the default model, --threads threads, with the fp32
prompt path on (default) and off (core config f32_prompt_min_tokens=0: every product on two-level
8-bit rows, as before), the two engines alternating in one process so both see the same load;
prefill tok/s medians.

Usage: python bench/bench_prefill_gemm.py [--tokens 8,64,512] [--reps 7] [--engine-reps 5]
Results: a table on stdout, JSON and CSV in bench/results/.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads its BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from gguf import quants  # noqa: E402
from gguf.constants import GGMLQuantizationType as G  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from lmengine import _core  # noqa: E402
from lmengine.bench_cli import best_seconds  # noqa: E402

# (name, weight type, rows, k) of the default model's products.
SHAPES = [
    ("attn_q, attn_output (Q4_1)", G.Q4_1, 576, 576),
    ("ffn_gate/up (Q4_1)", G.Q4_1, 1536, 576),
    ("ffn_down (Q4_1)", G.Q4_1, 576, 1536),
    ("lm_head slice (Q8_0)", G.Q8_0, 4096, 576),
]


def time_paths(wt: G, raw: np.ndarray, k: int, x: np.ndarray, w_deq: np.ndarray, reps: int):
    """Best seconds of each product path for activations x [T, k]."""
    x2 = np.repeat(x, 2, axis=0)  # the two-level rows' work: 2 activation rows per token
    w_t = np.ascontiguousarray(w_deq.T)
    return {
        "fp32": best_seconds(
            lambda: _core.quant_matmul(int(wt), raw, k, x, fp32_activations=True), reps
        ),
        "int8x2": best_seconds(lambda: _core.quant_matmul(int(wt), raw, k, x2), reps),
        "int8": best_seconds(lambda: _core.quant_matmul(int(wt), raw, k, x), reps),
        "numpy": best_seconds(lambda: x @ w_t, reps),
    }


def engine_prefill(prompt_tokens: int, threads: int, reps: int) -> dict[str, list[float]]:
    """Prefill tok/s of the default model with the fp32 prompt path on and off, alternating."""
    import statistics

    from lmengine import LLM, SamplingParams
    from lmengine.models.spec import ModelSpec
    from lmengine.registry import resolve_model

    path = resolve_model("smollm2-135m")
    original = ModelSpec.core_config
    engines = {}
    for name, min_tokens in (("fp32 prompts", 8), ("two-level int8", 0)):

        def patched(self, max_context=None, _min=min_tokens):
            return original(self, max_context) | {"f32_prompt_min_tokens": _min}

        ModelSpec.core_config = patched
        try:
            engines[name] = LLM(path, n_threads=threads, kv_cache_tokens=4 * prompt_tokens)
        finally:
            ModelSpec.core_config = original
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = next(iter(engines.values())).tokenizer.encode(text)
    params = SamplingParams(max_tokens=1, temperature=0)
    tok_s: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(reps + 1):  # the first round warms up
        window = ids[rep * 7 : rep * 7 + prompt_tokens]
        firsts = set()
        for name, llm in engines.items():
            t0 = time.perf_counter()
            out = llm.generate_ids(window, params)
            seconds = time.perf_counter() - t0
            firsts.add(out.token_ids[0])
            if rep > 0:
                tok_s[name].append(prompt_tokens / seconds)
        if len(firsts) != 1:
            print(f"  note: the two paths chose different greedy tokens {sorted(firsts)}")
    for name, values in tok_s.items():
        print(f"  {name:16s} prefill {statistics.median(values):7.1f} tok/s (median of {reps})")
    on, off = (statistics.median(v) for v in tok_s.values())
    print(f"  fp32 prompt path / two-level int8: {on / off:.2f}x")
    return tok_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="8,64,512")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--engine-reps", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    token_counts = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.1f}; one thread; best of {args.reps}")

    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    peak = 2 * 2048**3 / best_seconds(lambda: a @ a, max(3, args.reps // 2)) / 1e9
    print(f"numpy fp32 GEMM 2048^3: {peak:.1f} GFLOP/s (this core's practical fp32 peak)\n")

    rows_out = []
    header = f"{'shape':30s} {'T':>5s} {'fp32':>7s} {'int8x2':>7s} {'int8':>7s} {'numpy':>7s}"
    print(header + "   GFLOP/s; fp32/int8x2, fp32/numpy")
    for name, wt, rows, k in SHAPES:
        w = rng.standard_normal((rows, k), dtype=np.float32)
        raw = np.ascontiguousarray(quants.quantize(w, wt).view(np.uint8).reshape(rows, -1))
        w_deq = quants.dequantize(raw, wt).reshape(rows, k).astype(np.float32)
        for n_tok in token_counts:
            x = rng.standard_normal((n_tok, k), dtype=np.float32)
            expected = x.astype(np.float64) @ w_deq.T.astype(np.float64)
            got = _core.quant_matmul(int(wt), raw, k, x, fp32_activations=True)
            scale = np.abs(x).astype(np.float64) @ np.abs(w_deq).T.astype(np.float64)
            if not (np.abs(got - expected) <= 1.5e-4 * scale + 1e-30).all():
                raise SystemExit(f"fp32 path wrong at {name}, T={n_tok}")
            approx = _core.quant_matmul(int(wt), raw, k, x)
            if not (np.abs(approx - expected) <= 0.05 * scale + 1e-30).all():
                raise SystemExit(f"int8 path wrong at {name}, T={n_tok}")
            flops = 2.0 * rows * k * n_tok
            t = time_paths(wt, raw, k, x, w_deq, args.reps)
            g = {key: flops / s / 1e9 for key, s in t.items()}
            print(
                f"{name:30s} {n_tok:5d} {g['fp32']:7.1f} {g['int8x2']:7.1f} {g['int8']:7.1f} "
                f"{g['numpy']:7.1f}   {g['fp32'] / g['int8x2']:.2f}x, {g['fp32'] / g['numpy']:.2f}x"
            )
            rows_out.append(
                {"shape": name, "type": wt.name, "rows": rows, "k": k, "tokens": n_tok}
                | {f"{key}_gflops": round(v, 2) for key, v in g.items()}
                | {"numpy_peak_gflops": round(peak, 2)}
            )
    engine = {}
    if args.engine_reps > 0:
        print(f"\nengine, {args.prompt_tokens}-token prefill, {args.threads} threads:")
        engine = engine_prefill(args.prompt_tokens, args.threads, args.engine_reps)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"prefill_gemm_{time.strftime('%Y%m%d_%H%M%S')}"
    Path(f"{stem}.json").write_text(
        json.dumps(
            {"peak_gflops": peak, "rows": rows_out, "engine_prefill_tok_s": engine}, indent=2
        )
    )
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"results: {stem}.json, {stem}.csv")


if __name__ == "__main__":
    main()
