"""Achieved memory bandwidth of lmengine's CUDA kernels on one GPU.

Question: how close do RMSNorm, RoPE, paged decode attention and the dequantizing GEMV come to the
GPU's memory bandwidth, at shapes a decode step produces?

Method
- Each kernel is first validated at a small shape against the numpy references and checks of
  tests/test_cuda_kernels.py (this script imports that file, so it needs pytest installed).
- Then it is timed at a shape whose working set is far larger than the 50 MB L2, so DRAM is what
  is measured: _core.cuda.<kernel>(..., iters=N) runs the kernel N times back to back between two
  CUDA events after one untimed call; the mean per call is reported. The copies to and from the
  device are outside the timed region.
- GB/s = bytes the kernel must move (the napkin math at the top of each .cu file) / time.
- Peer, measured in the same run: a device-to-device cudaMemcpy of 1 GiB, GB/s = 2 * bytes / time
  (read + write), the practical ceiling for a streaming kernel; the H200's nominal 4.8 TB/s is
  printed beside it.

Usage: python bench/bench_cuda_kernels.py [--iters 20] [--quick]. Prints a table; writes JSON and
CSV to bench/results/. Exits 0 with a message when no CUDA device is usable.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lmengine import _core  # noqa: E402

NOMINAL_GBPS = 4800.0  # H200 HBM3e
MEMCPY_BYTES = 1 << 30


def gbps(n_bytes: float, ms: float) -> float:
    return n_bytes / (ms * 1e-3) / 1e9


def finite_kv(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    """Cheap finite values of a KV dtype: raw bits below the exponent of 2.0 (1.0 for bf16)."""
    n = int(np.prod(shape))
    if kind == "f32":
        return rng.random(n, dtype=np.float32).reshape(shape)
    if kind == "f16":
        return rng.integers(0, 0x3C00, n, dtype=np.uint16).view(np.float16).reshape(shape)
    return rng.integers(0, 0x3F80, n, dtype=np.uint16).reshape(shape)


def validate(ref) -> None:
    """Small-shape checks of every kernel, as in the tests; raises on a mismatch."""
    cuda = _core.cuda
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 4096), dtype=np.float32)
    w = rng.standard_normal(4096, dtype=np.float32)
    np.testing.assert_allclose(
        cuda.rmsnorm(x, w, 1e-5),
        ref.rmsnorm_reference(x, w, 1e-5),
        rtol=ref.RMSNORM_RTOL,
        atol=ref.RMSNORM_ATOL,
    )
    inv_freq = (10000.0 ** (-np.arange(0, 128, 2) / 128)).astype(np.float32)
    x = rng.standard_normal((5, 4 * 128), dtype=np.float32)
    pos = np.array([0, 1, 17, 4095, 99999], dtype=np.int32)
    np.testing.assert_allclose(
        cuda.rope(x, pos, inv_freq, 4, False),
        ref.rope_reference(x, pos, inv_freq, 4, False),
        rtol=1e-5,
        atol=1e-5,
    )
    for kind in ("f32", "f16", "bf16"):
        k_pool, v_pool, table = ref.make_paged_cache(rng, ref.SEQ_LENS, 2, 128, kind)
        q = rng.standard_normal((len(ref.SEQ_LENS), 8, 128), dtype=np.float32)
        lens = np.array(ref.SEQ_LENS, dtype=np.int32)
        ref.check_attention(q, k_pool, v_pool, table, lens, 1, 128**-0.5)
    for t in ref.BLOCK_TYPES + ref.FLOAT_TYPES:
        k = 1024
        raw = ref.make_weights(t, 17, k, rng)
        ref.check_gemv(t, raw, k, rng.standard_normal((1, k), dtype=np.float32))


def bench_rmsnorm(rng, iters, quick):
    rows, n = (1024, 8192) if quick else (8192, 8192)
    x = rng.standard_normal((rows, n), dtype=np.float32)
    w = rng.standard_normal(n, dtype=np.float32)
    _, ms = _core.cuda.rmsnorm(x, w, 1e-5, iters=iters)
    yield "rmsnorm", f"{rows}x{n}", "f32", 4 * (2 * rows * n + n), ms


def bench_rope(rng, iters, quick):
    tokens, heads, dim = (1024, 32, 128) if quick else (8192, 32, 128)
    x = rng.standard_normal((tokens, heads * dim), dtype=np.float32)
    pos = np.arange(tokens, dtype=np.int32)
    inv_freq = (10000.0 ** (-np.arange(0, dim, 2) / dim)).astype(np.float32)
    _, ms = _core.cuda.rope(x, pos, inv_freq, heads, False, iters=iters)
    yield "rope", f"T{tokens} H{heads} D{dim}", "f32", 8 * tokens * heads * dim, ms


def bench_attention(rng, iters, quick):
    page, dim, kv_heads, group = 16, 128, 8, 4
    shapes = [(32, 4096), (1, 32768)] if not quick else [(8, 2048), (1, 8192)]
    for kind in ("f16", "bf16", "f32"):
        for n_seqs, ctx in shapes:
            pages_per_seq = ctx // page
            n_pages = n_seqs * pages_per_seq
            # kv_cache.h layout: K transposed within a page, V by rows.
            k_pool = finite_kv(rng, (n_pages, 1, kv_heads, dim, page), kind)
            v_pool = finite_kv(rng, (n_pages, 1, kv_heads, page, dim), kind)
            table = rng.permutation(n_pages).astype(np.int32).reshape(n_seqs, pages_per_seq)
            lens = np.full(n_seqs, ctx, dtype=np.int32)
            q = rng.standard_normal((n_seqs, kv_heads * group, dim), dtype=np.float32)
            _, ms = _core.cuda.attention_decode(
                q, k_pool, v_pool, table, lens, 0, dim**-0.5, iters=iters
            )
            kv_bytes = 2 * n_seqs * ctx * kv_heads * dim * k_pool.itemsize
            shape = f"S{n_seqs} ctx{ctx} Hkv{kv_heads} G{group} D{dim}"
            yield "attention_decode", shape, kind, kv_bytes + 2 * q.nbytes, ms


def bench_gemv(rng, iters, quick):
    from test_cuda_kernels import BLOCK_TYPES, FLOAT_TYPES, make_weights, row_bytes

    rows, k = (8192, 4096) if quick else (32768, 8192)
    for t in BLOCK_TYPES + FLOAT_TYPES:
        raw = make_weights(t, rows, k, rng, raw=True)
        x = rng.standard_normal((1, k), dtype=np.float32)
        _, ms = _core.cuda.gemv(int(t), raw, k, x, iters=iters)
        yield "gemv", f"{rows}x{k} T1", t.name, rows * row_bytes(t, k) + 4 * (k + rows), ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smaller shapes (some fit in L2)")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    cuda = getattr(_core, "cuda", None)
    if cuda is None or not _core.cuda_compiled() or not _core.cuda_available():
        print("no usable CUDA device (or lmengine built without CUDA): nothing to measure")
        return 0
    import test_cuda_kernels as ref

    validate(ref)
    print("validation: all kernels match the numpy references")

    memcpy_ms = cuda.memcpy_ms(MEMCPY_BYTES, args.iters)
    peer = gbps(2 * MEMCPY_BYTES, memcpy_ms)
    print(f"peer: device-to-device memcpy {peer:.0f} GB/s; nominal {NOMINAL_GBPS:.0f} GB/s\n")

    rng = np.random.default_rng(1)
    rows = []
    header = (
        f"{'kernel':<17} {'shape':<30} {'dtype':<5} {'MB':>8} {'us':>9} {'GB/s':>7}"
        f" {'/memcpy':>8} {'/nominal':>9}"
    )
    print(header)
    print("-" * len(header))
    for bench in (bench_rmsnorm, bench_rope, bench_attention, bench_gemv):
        for kernel, shape, dtype, n_bytes, ms in bench(rng, args.iters, args.quick):
            rate = gbps(n_bytes, ms)
            row = {
                "kernel": kernel,
                "shape": shape,
                "dtype": dtype,
                "bytes": int(n_bytes),
                "us": ms * 1e3,
                "gbps": rate,
                "fraction_of_memcpy": rate / peer,
                "fraction_of_nominal": rate / NOMINAL_GBPS,
            }
            rows.append(row)
            print(
                f"{kernel:<17} {shape:<30} {dtype:<5} {n_bytes / 1e6:>8.1f} {ms * 1e3:>9.1f} "
                f"{rate:>7.0f} {rate / peer:>8.2f} {rate / NOMINAL_GBPS:>9.2f}",
                flush=True,
            )

    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_cuda_kernels-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {
        "memcpy_gbps": peer,
        "nominal_gbps": NOMINAL_GBPS,
        "iters": args.iters,
        "quick": args.quick,
    }
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {stem}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
