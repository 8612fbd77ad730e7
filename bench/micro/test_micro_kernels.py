"""Core kernels, one pytest-benchmark each, every one validated against numpy before timing.

Question: how fast is each kernel on its own, and how close to the machine's limits? Each
benchmark records the bytes it must move and the FLOPs it must do in ``extra_info`` (napkin
math), so achieved GB/s and GFLOP/s follow from the timing; compare them with the probe in
``lmengine.bench.hardware.cpu_spec`` (printed by ``lmengine bench cap``).

- matmul_rows per weight type at 1 token (decode: streams the weights; memory bound) and 64
  tokens (prefill tile: compute bound), 1024 rows x 1024 (2048 for K-quants' 256-blocks fit too).
- paged attention of one decode query group over 1000 cached positions in 16-slot pages.
- RMSNorm and RoPE over 64 rows.
Run: pytest bench/micro --benchmark-only [--benchmark-json out.json]
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as G

from lmengine import _core

ROWS, K = 1024, 1024
# fp16 scale offsets inside each block type (the other bytes may be anything).
HALF_OFFSETS = {
    G.Q4_0: [0],
    G.Q4_1: [0, 2],
    G.Q5_0: [0],
    G.Q8_0: [0],
    G.Q4_K: [0, 2],
    G.Q6_K: [208],
}
ACT_BLOCK = {G.Q4_0: 32, G.Q4_1: 32, G.Q5_0: 32, G.Q8_0: 32, G.Q4_K: 256, G.Q6_K: 256}
TYPES = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q8_0, G.Q4_K, G.Q6_K, G.F16, G.BF16, G.F32]


def make_weights(t: G, rng) -> np.ndarray:
    if t == G.F32:
        return rng.standard_normal((ROWS, K), dtype=np.float32).view(np.uint8)
    if t in (G.F16, G.BF16):
        return np.ascontiguousarray(
            quants.quantize(rng.standard_normal((ROWS, K), dtype=np.float32), t).view(np.uint8)
        )
    bs, nbytes = GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, (ROWS * K // bs, nbytes), dtype=np.uint8)
    for off in HALF_OFFSETS[t]:
        half = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16).view(np.uint8)
        blocks[:, off : off + 2] = half.reshape(-1, 2)
    return blocks.reshape(ROWS, -1)


def reference_matmul(t: G, w: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy W @ x.T in float64 and the bound on the engine's error (8-bit activation rounding,
    half a step per element, plus fp32 accumulation)."""
    wd = (w.view(np.float32) if t == G.F32 else quants.dequantize(w, t)).reshape(ROWS, K)
    wd = wd.astype(np.float64)
    x64 = x.astype(np.float64)
    bound = 2e-4 * (np.abs(x64) @ np.abs(wd).T)
    if t in ACT_BLOCK:
        b = ACT_BLOCK[t]
        amax = np.abs(x64).reshape(x.shape[0], -1, b).max(axis=-1)
        bound += np.repeat(amax / 127.0 / 2.0, b, axis=-1) @ np.abs(wd).T
    return x64 @ wd.T, bound


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_rows(benchmark, t, tokens):
    rng = np.random.default_rng(int(t) * 100 + tokens)
    w = make_weights(t, rng)
    x = rng.standard_normal((tokens, K), dtype=np.float32)
    got = _core.quant_matmul(int(t), w, K, x)
    want, bound = reference_matmul(t, w, x)
    assert np.all(np.abs(got - want) <= bound + 1e-6), f"{t.name}: product disagrees with numpy"
    benchmark.extra_info.update(
        weight_bytes=int(w.nbytes), flops=2 * ROWS * K * tokens, tokens=tokens, type=t.name
    )
    benchmark(_core.quant_matmul, int(t), w, K, x)


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_attention_paged_decode(benchmark, kv_dtype):
    rng = np.random.default_rng(1)
    group, d, n, page = 3, 64, 1000, 16
    q = rng.standard_normal((group, d), dtype=np.float32)
    k = rng.standard_normal((n, d), dtype=np.float32)
    v = rng.standard_normal((n, d), dtype=np.float32)
    order = rng.permutation(-(-n // page)).astype(np.int32)
    got = _core.kernels.attention_paged(q, k, v, 0, page, kv_dtype, order)
    kk, vv = (k, v) if kv_dtype == "f32" else (k.astype(np.float16), v.astype(np.float16))
    s = q.astype(np.float64) @ kk.astype(np.float64).T / np.sqrt(d)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    want = (p / p.sum(axis=1, keepdims=True)) @ vv.astype(np.float64)
    np.testing.assert_allclose(got, want, atol=2e-3 if kv_dtype == "f16" else 2e-5)
    elem = 4 if kv_dtype == "f32" else 2
    benchmark.extra_info.update(kv_bytes=2 * n * d * elem, flops=4 * group * n * d)
    # The binding copies K/V into a fresh page pool on each call: this times pool fill + attention.
    benchmark(_core.kernels.attention_paged, q, k, v, 0, page, kv_dtype, order)


def test_rmsnorm(benchmark):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 576), dtype=np.float32)
    w = rng.standard_normal(576, dtype=np.float32)
    got = _core.kernels.rmsnorm(x, w, 1e-5)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    benchmark.extra_info.update(bytes=2 * x.nbytes, flops=4 * x.size)
    benchmark(_core.kernels.rmsnorm, x, w, 1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(benchmark, interleaved):
    rng = np.random.default_rng(3)
    T, H, D = 64, 9, 64
    x = rng.standard_normal((T, H, D), dtype=np.float32)
    pos = np.arange(100, 100 + T, dtype=np.int32)
    inv = (10000.0 ** (-np.arange(0, D, 2, dtype=np.float32) / D)).astype(np.float32)
    got = _core.kernels.rope(x, pos, inv, interleaved)
    ang = (pos.astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)[:, None, :]
    c, s = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        want = np.empty_like(x, dtype=np.float64)
        want[..., 0::2], want[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., : D // 2], x[..., D // 2 :]
        want = np.concatenate([a * c - b * s, a * s + b * c], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-4)
    benchmark.extra_info.update(bytes=2 * x.nbytes, flops=6 * x.size // 2)
    benchmark(_core.kernels.rope, x, pos, inv, interleaved)
