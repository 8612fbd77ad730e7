"""CUDA kernels against plain numpy references: RMSNorm, RoPE, paged decode attention and the
dequantizing GEMV, called through lmengine._core.cuda (copy in, run, copy out).

The references are at the top of the file, in float64. Sizes are awkward on purpose: odd token and
row counts, contexts at page and chunk boundaries +-1, GQA groups 1/3/4. Kernel tests skip without a
usable CUDA device; the argument checks run wherever the kernels were compiled in, device or not.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as G

from lmengine import _core

# ---------------------------------------------------------------------------------------------
# Tolerances, per op class (fp32 kernels against float64 references).
#   RMSNorm: one fp32 sum of squares (tree order) and two multiplies per element.
RMSNORM_RTOL, RMSNORM_ATOL = 2e-5, 2e-6
#   RoPE: the angle is rounded to fp32 exactly as in the reference, so what is left is sincosf
#   (~2 ulp) and the rotation's multiply-add, relative to |x0| + |x1| of the pair.
ROPE_REL = 2e-6
#   Decode attention, relative to max |v| (the output is a convex combination of v rows):
#   * fp32 softmax and weighted sums over up to ~1000 positions: ATTENTION_REL;
#   * each score is an fp32 dot product, off by ~ATTENTION_SCORE_REL * scale * sum_i |q_i k_i|
#     (a few times sqrt(head_dim) * 2^-24, the typical rather than the worst-case growth); a score
#     off by e moves its softmax weight by a factor exp(+-e), so the output moves <= 2e * max |v|.
ATTENTION_REL = 2e-5
ATTENTION_SCORE_REL = 4e-6
#   GEMV: fp32 accumulation in any order, sum_i |W x| times k * 2^-24 for k <= 2500, plus one
#   rounding of each dequantized weight (already inside that term).
GEMV_SUM_REL = 1.5e-4
# ---------------------------------------------------------------------------------------------

CUDA = getattr(_core, "cuda", None)
KERNELS_COMPILED = CUDA is not None and _core.cuda_compiled() and hasattr(CUDA, "rmsnorm")
GPU = KERNELS_COMPILED and _core.cuda_available()

needs_kernels = pytest.mark.skipif(not KERNELS_COMPILED, reason="built without the CUDA kernels")


def needs_gpu(test):
    skip = pytest.mark.skipif(not GPU, reason="no usable CUDA device (or built without CUDA)")
    return pytest.mark.gpu(skip(test))


# ---------------------------------------------------------------------------------------------
# numpy references


def rmsnorm_reference(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def rope_reference(x, positions, inv_freq, n_heads, interleaved):
    """x: [T, width]; rotates the first n_heads * head_dim columns. Angles rounded to fp32 first."""
    head_dim = 2 * inv_freq.size
    angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(
        np.float64
    )  # (T, D/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # (T, 1, D/2)
    out = x.astype(np.float64)
    heads = out[:, : n_heads * head_dim].reshape(x.shape[0], n_heads, head_dim)  # (T, H, D)
    if interleaved:
        a, b = heads[..., 0::2].copy(), heads[..., 1::2].copy()
        heads[..., 0::2], heads[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    else:
        half = head_dim // 2
        a, b = heads[..., :half].copy(), heads[..., half:].copy()
        heads[..., :half], heads[..., half:] = a * cos - b * sin, a * sin + b * cos
    out[:, : n_heads * head_dim] = heads.reshape(x.shape[0], -1)
    return out


def kv_to_float64(pool: np.ndarray) -> np.ndarray:
    if pool.dtype == np.uint16:  # bf16 bits
        return (pool.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return pool.astype(np.float64)


def attention_decode_reference(q, k_pool, v_pool, page_table, seq_lens, layer, scale, window):
    """q: [S, Hq, D]; k_pool: [pages, layers, Hkv, D, page_size] (K transposed within a page, as
    kv_cache.h); v_pool: [pages, layers, Hkv, page_size, D] -> [S, Hq, D]."""
    k = kv_to_float64(k_pool).swapaxes(3, 4)  # back to rows: (pages, layers, Hkv, page_size, D)
    v = kv_to_float64(v_pool)
    n_seqs, n_q_heads, head_dim = q.shape
    page_size, group = k.shape[3], n_q_heads // k.shape[2]
    out = np.zeros((n_seqs, n_q_heads, head_dim))
    for s in range(n_seqs):
        length = int(seq_lens[s])
        lo = max(0, length - window) if window > 0 else 0
        pos = np.arange(lo, length)
        if pos.size == 0:
            continue
        pages, slots = page_table[s, pos // page_size], pos % page_size
        ks, vs = k[pages, layer, :, slots, :], v[pages, layer, :, slots, :]  # (n, Hkv, D)
        for h in range(n_q_heads):
            scores = ks[:, h // group, :] @ q[s, h].astype(np.float64) * scale  # (n,)
            p = np.exp(scores - scores.max())
            out[s, h] = (p / p.sum()) @ vs[:, h // group, :]
    return out


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# Weight data (as tests/test_quant.py): gguf-quantized normal values, or raw blocks with finite
# fp16 scales where gguf has no quantizer (K-quants) and to reach bit patterns it never writes.

HALF_OFFSETS = {
    G.Q4_0: [0],
    G.Q4_1: [0, 2],
    G.Q5_0: [0],
    G.Q8_0: [0],
    G.Q4_K: [0, 2],
    G.Q6_K: [208],
}
BLOCK_TYPES = list(HALF_OFFSETS)
FLOAT_TYPES = [G.F32, G.F16, G.BF16]
GGUF_QUANTIZABLE = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q8_0, G.F16, G.BF16]


def row_bytes(t: G, n: int) -> int:
    bs, nbytes = GGML_QUANT_SIZES[t]
    return n // bs * nbytes


def random_raw_rows(t: G, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    bs, nbytes = GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, (rows * (k // bs), nbytes), dtype=np.uint8)
    for off in HALF_OFFSETS[t]:
        halves = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16)
        blocks[:, off : off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, row_bytes(t, k))


def make_weights(
    t: G, rows: int, k: int, rng: np.random.Generator, raw: bool = False
) -> np.ndarray:
    """[rows, row_bytes] uint8."""
    if t == G.F32:
        return rng.standard_normal((rows, k), dtype=np.float32).view(np.uint8)
    if t in GGUF_QUANTIZABLE and not raw:
        w = rng.standard_normal((rows, k), dtype=np.float32)
        return np.ascontiguousarray(quants.quantize(w, t).view(np.uint8).reshape(rows, -1))
    return random_raw_rows(t, rows, k, rng)


def dequantize_rows(t: G, raw: np.ndarray) -> np.ndarray:
    if t == G.F32:
        return raw.view(np.float32).reshape(raw.shape[0], -1)
    return quants.dequantize(raw, t).reshape(raw.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# RMSNorm


@needs_gpu
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("n", [64, 127, 4096, 5003])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_matches_numpy(rows, n, eps):
    rng = np.random.default_rng(rows * 1000 + n)
    x = rng.standard_normal((rows, n), dtype=np.float32) * 3
    w = rng.standard_normal(n, dtype=np.float32)
    y = CUDA.rmsnorm(x, w, eps)
    np.testing.assert_allclose(
        y, rmsnorm_reference(x, w, eps), rtol=RMSNORM_RTOL, atol=RMSNORM_ATOL
    )


# ---------------------------------------------------------------------------------------------
# RoPE


@needs_gpu
@pytest.mark.parametrize(("n_tokens", "n_heads"), [(1, 1), (5, 3), (17, 32)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("extra_columns", [0, 96], ids=["packed", "fused-row"])
def test_rope_matches_numpy(n_tokens, n_heads, head_dim, interleaved, extra_columns):
    rng = np.random.default_rng(n_tokens * 100 + n_heads + head_dim)
    width = n_heads * head_dim + extra_columns  # extra columns: the k/v of a fused QKV row
    x = rng.standard_normal((n_tokens, width), dtype=np.float32)
    positions = rng.integers(0, 100_000, n_tokens).astype(np.int32)
    positions[0] = 0
    inv_freq = (10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    y = CUDA.rope(x, positions, inv_freq, n_heads, interleaved)
    expected = rope_reference(x, positions, inv_freq, n_heads, interleaved)
    # Pair magnitudes |x0| + |x1| for every element, in the layout's pairing.
    xa = np.abs(x[:, : n_heads * head_dim].astype(np.float64)).reshape(n_tokens, n_heads, head_dim)
    if interleaved:
        pair = np.repeat(xa[..., 0::2] + xa[..., 1::2], 2, axis=-1)
    else:
        half = head_dim // 2
        pair = np.tile(xa[..., :half] + xa[..., half:], (1, 1, 2))
    bound = ROPE_REL * pair.reshape(n_tokens, -1) + 1e-30
    err = np.abs(y[:, : n_heads * head_dim] - expected[:, : n_heads * head_dim])
    assert (err <= bound).all(), (
        f"max error {err.max():.3g}, bound there {bound.flat[err.argmax()]:.3g}"
    )
    assert np.array_equal(y[:, n_heads * head_dim :], x[:, n_heads * head_dim :]), (
        "columns past the heads changed"
    )


# ---------------------------------------------------------------------------------------------
# Decode attention over the paged cache

PAGE_SIZE = 16
# Contexts at page boundaries +-1, one token, a multi-page run, and empty.
SEQ_LENS = [1, 15, 16, 17, 31, 32, 33, 0, 255, 256, 257, 100]
KV_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def make_paged_cache(
    rng, seq_lens, n_kv_heads, head_dim, kv_dtype, n_layers=2, spare_pages=5, page_size=PAGE_SIZE
):
    """Pools in the CUDA kernels' layout (cuda/kernels.h), K (pages, layers, Hkv, D, page_size)
    and V (pages, layers, Hkv, page_size, D), with the sequences' pages scattered in random order;
    unused table entries are -1."""
    pages_per_seq = [(n + page_size - 1) // page_size for n in seq_lens]
    n_pages = sum(pages_per_seq) + spare_pages
    order = rng.permutation(n_pages).astype(np.int32)
    table = np.full((len(seq_lens), max(pages_per_seq) + 1), -1, dtype=np.int32)
    used = 0
    for s, n in enumerate(pages_per_seq):
        table[s, :n] = order[used : used + n]
        used += n
    k_shape = (n_pages, n_layers, n_kv_heads, head_dim, page_size)
    v_shape = (n_pages, n_layers, n_kv_heads, page_size, head_dim)
    pools = []
    for shape in (k_shape, v_shape):
        values = rng.standard_normal(shape, dtype=np.float32)
        if kv_dtype == "bf16":
            pools.append(float_to_bf16_bits(values))
        else:
            pools.append(values.astype(KV_DTYPES[kv_dtype]))
    return pools[0], pools[1], table


def check_attention(q, k_pool, v_pool, table, seq_lens, layer, scale, window=0, split_tokens=0):
    out = CUDA.attention_decode(
        q, k_pool, v_pool, table, seq_lens, layer, scale, window, split_tokens
    )
    expected = attention_decode_reference(q, k_pool, v_pool, table, seq_lens, layer, scale, window)
    k_abs = np.abs(kv_to_float64(k_pool)[:, layer])  # (pages, Hkv, D, page_size)
    group = q.shape[1] // k_abs.shape[1]
    # Largest scale * sum_i |q_i k_i| over every head and cached row: bounds the score rounding.
    abs_dots = np.einsum("shd,pkdj->shpkj", np.abs(q.astype(np.float64)), k_abs)
    heads = np.arange(q.shape[1])
    dot_max = abs(scale) * abs_dots[:, heads, :, heads // group].max()
    v_max = np.abs(kv_to_float64(v_pool)).max()
    bound = v_max * (ATTENTION_REL + 2 * ATTENTION_SCORE_REL * dot_max)
    err = np.abs(out - expected)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= bound, (
        f"error {err.max():.3g} > bound {bound:.3g} at (seq, head, dim) {worst}"
    )


@needs_gpu
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("split_tokens", [0, 16, 7, 1000], ids=["auto", "page", "odd", "one-chunk"])
def test_attention_decode_matches_numpy(kv_dtype, head_dim, group, split_tokens):
    rng = np.random.default_rng(head_dim * 10 + group)
    n_kv_heads = 2
    k_pool, v_pool, table = make_paged_cache(rng, SEQ_LENS, n_kv_heads, head_dim, kv_dtype)
    seq_lens = np.array(SEQ_LENS, dtype=np.int32)
    q = rng.standard_normal((len(SEQ_LENS), n_kv_heads * group, head_dim), dtype=np.float32)
    check_attention(
        q, k_pool, v_pool, table, seq_lens, 1, head_dim**-0.5, split_tokens=split_tokens
    )


@needs_gpu
@pytest.mark.parametrize("kv_dtype", list(KV_DTYPES))
def test_attention_decode_head_dim_256_one_sequence(kv_dtype):
    rng = np.random.default_rng(256)
    k_pool, v_pool, table = make_paged_cache(rng, [1000], 1, 256, kv_dtype, n_layers=1)
    q = rng.standard_normal((1, 4, 256), dtype=np.float32)
    check_attention(q, k_pool, v_pool, table, np.array([1000], dtype=np.int32), 0, 256**-0.5)


@needs_gpu
@pytest.mark.parametrize("window", [1, 16, 20, 300])
@pytest.mark.parametrize("split_tokens", [0, 7])
def test_attention_decode_sliding_window(window, split_tokens):
    rng = np.random.default_rng(window)
    k_pool, v_pool, table = make_paged_cache(rng, SEQ_LENS, 2, 64, "f16")
    q = rng.standard_normal((len(SEQ_LENS), 6, 64), dtype=np.float32)
    seq_lens = np.array(SEQ_LENS, dtype=np.int32)
    check_attention(q, k_pool, v_pool, table, seq_lens, 1, 0.125, window, split_tokens)


@needs_gpu
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("page_size", [1, 5, 32])
@pytest.mark.parametrize("split_tokens", [0, 7])
def test_attention_decode_other_page_sizes(kv_dtype, page_size, split_tokens):
    # K is transposed within a page, so page_size is the stride between a slot's dims.
    rng = np.random.default_rng(page_size)
    k_pool, v_pool, table = make_paged_cache(
        rng, SEQ_LENS, 2, 64, kv_dtype, n_layers=1, page_size=page_size
    )
    q = rng.standard_normal((len(SEQ_LENS), 6, 64), dtype=np.float32)
    seq_lens = np.array(SEQ_LENS, dtype=np.int32)
    check_attention(q, k_pool, v_pool, table, seq_lens, 0, 0.125, split_tokens=split_tokens)


@needs_gpu
def test_attention_decode_large_scores_stay_finite():
    # Scores of several hundred (in exp units) must not overflow the online softmax or the merge.
    rng = np.random.default_rng(3)
    k_pool, v_pool, table = make_paged_cache(rng, [257, 33], 1, 128, "f32", n_layers=1)
    q = 40 * rng.standard_normal((2, 4, 128), dtype=np.float32)
    check_attention(
        q, k_pool, v_pool, table, np.array([257, 33], dtype=np.int32), 0, 1.0, split_tokens=16
    )


# ---------------------------------------------------------------------------------------------
# Dequantizing GEMV


def check_gemv(t: G, raw: np.ndarray, k: int, x: np.ndarray) -> None:
    w = dequantize_rows(t, raw).astype(np.float64)
    expected = x.astype(np.float64) @ w.T  # (T, rows)
    bound = GEMV_SUM_REL * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-30
    y = CUDA.gemv(int(t), raw, k, x)
    assert y.shape == expected.shape
    err = np.abs(y - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@needs_gpu
@pytest.mark.parametrize("t", BLOCK_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("n_blocks", [1, 3, 9])
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_gemv_matches_numpy(t, rows, n_blocks, n_tokens):
    rng = np.random.default_rng(rows * 100 + n_blocks * 10 + n_tokens)
    k = n_blocks * (GGML_QUANT_SIZES[t][0] if t in BLOCK_TYPES else 256)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    check_gemv(t, raw, k, x)


@needs_gpu
@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_gemv_on_raw_blocks(t):
    # Every bit pattern of the quantized values (Q8_0's -128, negative scales, all scale/min bits).
    rng = np.random.default_rng(11)
    k = 7 * GGML_QUANT_SIZES[t][0]
    raw = make_weights(t, 65, k, rng, raw=True)
    check_gemv(t, raw, k, rng.standard_normal((2, k), dtype=np.float32))


@needs_gpu
@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [1, 7, 37, 1001])
def test_gemv_float_any_length(t, k):
    # Lengths that are not a multiple of 8 take the scalar path (unaligned rows).
    rng = np.random.default_rng(k)
    raw = make_weights(t, 9, k, rng)
    check_gemv(t, raw, k, rng.standard_normal((2, k), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Argument checks: ValueError before any device work, so these run without a GPU too.


@needs_kernels
def test_rmsnorm_rejects_bad_shapes():
    x = np.zeros((3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="w.shape"):
        CUDA.rmsnorm(x, np.zeros(7, dtype=np.float32), 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        CUDA.rmsnorm(x.astype(np.float64), np.zeros(8, dtype=np.float32), 1e-5)


@needs_kernels
def test_rope_rejects_bad_shapes():
    x = np.zeros((2, 64), dtype=np.float32)
    inv_freq = np.ones(32, dtype=np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        CUDA.rope(x, np.zeros(2, dtype=np.int32), inv_freq, 2, False)
    with pytest.raises(ValueError, match="positions"):
        CUDA.rope(x, np.zeros(3, dtype=np.int32), inv_freq, 1, False)


@needs_kernels
def test_attention_decode_rejects_bad_pages_and_lengths():
    rng = np.random.default_rng(0)
    k_pool, v_pool, table = make_paged_cache(rng, [20, 5], 1, 64, "f16", n_layers=1)
    q = np.zeros((2, 2, 64), dtype=np.float32)
    bad_table = table.copy()
    bad_table[0, 1] = k_pool.shape[0]
    with pytest.raises(ValueError, match="not a page"):
        CUDA.attention_decode(q, k_pool, v_pool, bad_table, np.array([20, 5], np.int32), 0, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        CUDA.attention_decode(q, k_pool, v_pool, table, np.array([20, 10_000], np.int32), 0, 0.1)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        CUDA.attention_decode(
            q[:, :1].copy(),
            k_pool[:, :, :0].copy(),
            v_pool[:, :, :0].copy(),
            table,
            np.array([0, 0], np.int32),
            0,
            0.1,
        )
    with pytest.raises(ValueError, match="layer"):
        CUDA.attention_decode(q, k_pool, v_pool, table, np.array([20, 5], np.int32), 1, 0.1)
    # K in rows (page_size, D) or V transposed: not the CUDA pool layout.
    lens = np.array([20, 5], np.int32)
    with pytest.raises(ValueError, match=r"k_pool\.shape\[3\]"):
        CUDA.attention_decode(q, k_pool.swapaxes(3, 4).copy(), v_pool, table, lens, 0, 0.1)
    with pytest.raises(ValueError, match=r"v_pool\.shape\[3\]"):
        CUDA.attention_decode(q, k_pool, v_pool.swapaxes(3, 4).copy(), table, lens, 0, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        CUDA.attention_decode(
            np.zeros((2, 2, 80), np.float32),
            np.zeros((4, 1, 1, 80, 16), np.float16),
            np.zeros((4, 1, 1, 16, 80), np.float16),
            table,
            np.array([1, 1], np.int32),
            0,
            0.1,
        )


@needs_kernels
def test_gemv_rejects_bad_arguments():
    x = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(ValueError, match="unsupported ggml type"):
        CUDA.gemv(int(G.Q5_1), np.zeros((1, 48), np.uint8), 64, x)
    with pytest.raises(ValueError, match="block size"):
        CUDA.gemv(int(G.Q4_0), np.zeros((1, 18), np.uint8), 48, x[:, :48].copy())
    with pytest.raises(ValueError, match="weights.shape"):
        CUDA.gemv(int(G.Q4_0), np.zeros((1, 35), np.uint8), 64, x)


@needs_kernels
def test_kernels_raise_runtime_error_without_a_device():
    if _core.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        CUDA.rmsnorm(np.ones((1, 8), np.float32), np.ones(8, np.float32), 1e-5)
