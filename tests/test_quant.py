"""Weight formats: dequantization against gguf's reference, quant_matmul against numpy.

References: ``gguf.quants.dequantize`` (the format definition; ours must match it bit for bit) and
``dequantized W @ x.T`` in float64 for the products.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as G

from lmengine import _core

# ---------------------------------------------------------------------------------------------
# Tolerances. Dequantization is exact (0 ulp). For quant_matmul, per output element y[t, r]:
#   * activation rounding: quantized weight types see x converted to 8-bit blocks, each element
#     rounded to a multiple of its block's scale d = amax(block) / 127, an error of at most d / 2.
#     That part of the bound is exact: sum_i |W[r, i]| * d(t, block of i) / 2.
#   * fp32 accumulation (both paths, any summation order): at most FP32_SUM_REL * sum_i |W x|;
#     the worst case for k <= 2000 terms is k * 2^-24 ~ 1.2e-4.
# The SIMD path and the scalar reference see the same 8-bit activations, so they differ only by
# the fp32 term.
#   * activation_bits=16 (the engine's default "wide" rows): 32-element block types see 16-bit
#     blocks, d = amax / 32767; K-quants see an 8-bit row plus its 8-bit rounding residual, whose
#     error is at most amax / 127 / 2 / 127 / 2. Both are below amax / WIDE_STEPS / 2.
ACTIVATION_BLOCK = {  # weight type -> elements per 8-bit activation block (None: fp32 activations)
    G.Q4_0: 32,
    G.Q4_1: 32,
    G.Q5_0: 32,
    G.Q8_0: 32,
    G.Q4_K: 256,
    G.Q6_K: 256,
    G.F32: None,
    G.F16: None,
    G.BF16: None,
}
FP32_SUM_REL = 1.5e-4
STEPS = {8: 127.0, 16: 127.0 * 254.0}  # activation_bits -> amax / (largest rounding step)
# ---------------------------------------------------------------------------------------------

SUPPORTED = list(ACTIVATION_BLOCK)
GGUF_QUANTIZABLE = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q8_0, G.F16, G.BF16]
BLOCK_TYPES = [G.Q4_0, G.Q4_1, G.Q5_0, G.Q8_0, G.Q4_K, G.Q6_K]
# Offsets of the fp16 scales inside each block (the rest of a block may be any bytes).
HALF_OFFSETS = {
    G.Q4_0: [0],
    G.Q4_1: [0, 2],
    G.Q5_0: [0],
    G.Q8_0: [0],
    G.Q4_K: [0, 2],
    G.Q6_K: [208],
}


def block_size(t: G) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: G, n: int) -> int:
    bs, nbytes = GGML_QUANT_SIZES[t]
    return n // bs * nbytes


def random_halves(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Finite fp16 values of modest magnitude, either sign, as raw uint16."""
    return (rng.uniform(-scale, scale, n)).astype(np.float16).view(np.uint16)


def random_raw_rows(t: G, rows: int, n: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Rows of random blocks: any bytes, except finite fp16 scales of at most `scale`."""
    bs, nbytes = GGML_QUANT_SIZES[t]
    blocks = rng.integers(0, 256, (rows * (n // bs), nbytes), dtype=np.uint8)
    for off in HALF_OFFSETS[t]:
        halves = random_halves(rng, blocks.shape[0], scale)
        blocks[:, off : off + 2] = halves.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, row_bytes(t, n))


def make_weights(t: G, rows: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, row_bytes] uint8: gguf-quantized normals, or raw blocks if gguf has no quantizer."""
    if t == G.F32:
        return rng.standard_normal((rows, k), dtype=np.float32).view(np.uint8)
    if t in GGUF_QUANTIZABLE:
        w = rng.standard_normal((rows, k), dtype=np.float32)
        return np.ascontiguousarray(quants.quantize(w, t).view(np.uint8).reshape(rows, -1))
    return random_raw_rows(t, rows, k, rng, scale=0.05)


def gguf_dequantize(t: G, raw: np.ndarray, n_rows: int) -> np.ndarray:
    if t == G.F32:
        return raw.view(np.float32).reshape(n_rows, -1)
    return quants.dequantize(raw.reshape(n_rows, -1), t).reshape(n_rows, -1)


def core_dequantize(t: G, raw: np.ndarray, n_rows: int, n: int) -> np.ndarray:
    raw = raw.reshape(n_rows, -1)
    return np.stack([_core.dequantize(int(t), np.ascontiguousarray(r), n) for r in raw])


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and expected.dtype == np.float32
    assert actual.shape == expected.shape
    mismatch = actual.view(np.uint32) != expected.view(np.uint32)
    if mismatch.any():
        i = tuple(np.argwhere(mismatch)[0])
        pytest.fail(
            f"{mismatch.sum()} values differ, first at {i}: {actual[i]!r} vs {expected[i]!r}"
        )


def matmul_error_bound(t: G, w_deq: np.ndarray, x: np.ndarray, bits: int = 8) -> np.ndarray:
    """[T, rows] bound on |quant_matmul - W @ x.T| (see the tolerance table)."""
    w_abs = np.abs(w_deq.astype(np.float64))
    x64 = x.astype(np.float64)
    bound = FP32_SUM_REL * (np.abs(x64) @ w_abs.T)
    block = ACTIVATION_BLOCK[t]
    if block is not None:
        amax = np.abs(x64).reshape(x.shape[0], -1, block).max(axis=-1)
        half_step = np.repeat(amax / STEPS[bits] / 2.0, block, axis=-1)
        bound += half_step @ w_abs.T
    return bound


# ---------------------------------------------------------------------------------------------
# Type table


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_type_table_matches_gguf(t):
    assert _core.dtype_is_supported(int(t))
    bs = block_size(t)
    for n in (bs, 3 * bs, 256 * bs):
        assert _core.dtype_row_bytes(int(t), n) == row_bytes(t, n)


def test_unsupported_types():
    for t in (G.Q5_1, G.Q2_K, G.Q5_K, G.IQ4_NL, -1, 99, 2**40):
        assert not _core.dtype_is_supported(int(t))


# ---------------------------------------------------------------------------------------------
# Dequantization, bit-exact against gguf


@pytest.mark.parametrize("t", GGUF_QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks", [1, 3, 40])
def test_dequantize_matches_gguf_on_quantized_data(t, n_blocks):
    rng = np.random.default_rng(n_blocks)
    n = n_blocks * block_size(t) * (16 if t in (G.F16, G.BF16) else 1)
    raw = make_weights(t, 2, n, rng)
    assert_bit_exact(core_dequantize(t, raw, 2, n), gguf_dequantize(t, raw, 2))


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.05, 60000.0])
def test_dequantize_matches_gguf_on_raw_blocks(t, scale):
    # Any bit pattern of the quantized values, including ones gguf's quantizer never writes
    # (Q8_0's -128, negative scales, fp16-subnormal scales from the small ones).
    rng = np.random.default_rng(7)
    n = 5 * block_size(t)
    raw = random_raw_rows(t, 3, n, rng, scale)
    assert_bit_exact(core_dequantize(t, raw, 3, n), gguf_dequantize(t, raw, 3))


def test_dequantize_every_f16_and_bf16_bit_pattern():
    bits = np.arange(65536, dtype=np.uint16)
    for t in (G.F16, G.BF16):
        ours = _core.dequantize(int(t), bits.view(np.uint8), bits.size)
        theirs = quants.dequantize(bits.view(np.uint8), t).reshape(-1)
        assert_bit_exact(ours, theirs)


# ---------------------------------------------------------------------------------------------
# quant_matmul against numpy, at awkward sizes


def check_matmul(t: G, raw: np.ndarray, k: int, x: np.ndarray, bits: int = 8) -> None:
    rows = raw.shape[0]
    w_deq = gguf_dequantize(t, raw, rows)
    expected = x.astype(np.float64) @ w_deq.astype(np.float64).T
    bound = matmul_error_bound(t, w_deq, x, bits)
    fp32_bound = FP32_SUM_REL * (np.abs(x.astype(np.float64)) @ np.abs(w_deq.astype(np.float64)).T)
    fast = _core.quant_matmul(int(t), raw, k, x, activation_bits=bits)
    reference = _core.quant_matmul(int(t), raw, k, x, reference=True, activation_bits=bits)
    assert fast.shape == reference.shape == (x.shape[0], rows)
    for name, y in (("simd", fast), ("reference", reference)):
        err = np.abs(y - expected)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), (
            f"{name}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
        )
    assert (np.abs(fast - reference) <= fp32_bound + 1e-30).all(), "simd and reference paths differ"


# Sizes straddle the kernels' tiles (4 rows x 4 tokens, 1-2 rows for K-quants), their groups of
# 8 blocks (k_blocks 7, 8 + 8 + 3) and 8-float vectors (float types use k = 37 * k_blocks).
@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 17, 64, 130])
@pytest.mark.parametrize("n_tokens", [1, 2, 5, 7, 33])
@pytest.mark.parametrize("k_blocks", [1, 3, 7, 19])
def test_quant_matmul_matches_numpy(t, rows, n_tokens, k_blocks):
    rng = np.random.default_rng(1000 * rows + 10 * n_tokens + k_blocks)
    # Float types have block size 1; give them lengths that leave a SIMD tail (k % 8 != 0).
    k = k_blocks * (block_size(t) if block_size(t) > 1 else 37)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    check_matmul(t, raw, k, x)


# Wide rows (activation_bits=16) through every tile shape: 1 token (1-, 2- or 4-row tiles by row
# length: k_blocks 48 makes every 32-element type's rows long enough for 1-row tiles), 2-4 tokens,
# 5+ tokens, and row counts that leave partial tiles.
@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 5, 64])
@pytest.mark.parametrize("n_tokens", [1, 2, 3, 4, 5, 11])
@pytest.mark.parametrize("k_blocks", [1, 8, 19, 48])
def test_quant_matmul_wide_matches_numpy(t, rows, n_tokens, k_blocks):
    rng = np.random.default_rng(7000 * rows + 10 * n_tokens + k_blocks)
    k = k_blocks * block_size(t)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    check_matmul(t, raw, k, x, bits=16)


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_quant_matmul_wide_is_finer_than_8_bit(t):
    # The wide rows must actually carry more precision: on the same data their worst error is
    # far below the 8-bit rows' (a wide path that silently fell back to 8 bits would fail this).
    rng = np.random.default_rng(11)
    k = 8 * block_size(t)
    raw = make_weights(t, 32, k, rng)
    x = rng.standard_normal((4, k), dtype=np.float32)
    w_deq = gguf_dequantize(t, raw, 32).astype(np.float64)
    expected = x.astype(np.float64) @ w_deq.T
    err = {
        bits: np.abs(_core.quant_matmul(int(t), raw, k, x, activation_bits=bits) - expected).max()
        for bits in (8, 16)
    }
    assert err[16] < err[8] / 30, err


# Batching invariance: the engine relies on a token's result not depending on which other tokens
# share the call. The kernels take 1 token, 2-4 tokens (decode with residual activation rows) and
# 5+ tokens (prefill) through different tile shapes; every one must give each (row, token) the
# bits of the one-token call.
@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [2, 3, 4, 5, 9])
@pytest.mark.parametrize("rows", [1, 3, 7, 130])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("k_blocks", [19, 48])  # one-token tiles of 2-4 rows, then of 1 row
def test_quant_matmul_tokens_are_independent(t, n_tokens, rows, bits, k_blocks):
    rng = np.random.default_rng(100 * rows + n_tokens)
    k = k_blocks * (block_size(t) if block_size(t) > 1 else 37)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    alone = np.concatenate(
        [
            _core.quant_matmul(int(t), raw, k, x[i : i + 1], activation_bits=bits)
            for i in range(n_tokens)
        ]
    )
    assert_bit_exact(_core.quant_matmul(int(t), raw, k, x, activation_bits=bits), alone)


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_quant_matmul_many_tokens(t):
    # More tokens than the kernels take per pass over the weights (64).
    rng = np.random.default_rng(5)
    k = 2 * max(block_size(t), 32)
    raw = make_weights(t, 6, k, rng)
    check_matmul(t, raw, k, rng.standard_normal((70, k), dtype=np.float32))


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("bits", [8, 16])
def test_quant_matmul_outliers_and_zero_blocks(t, bits):
    # An activation block of zeros (scale 0) and blocks dominated by one large value.
    rng = np.random.default_rng(3)
    k = 4 * max(block_size(t), 32)
    raw = make_weights(t, 9, k, rng)
    x = rng.standard_normal((3, k), dtype=np.float32)
    x[0, : k // 4] = 0.0
    x[1, 5] = 1e4
    x[2] *= 1e-30
    check_matmul(t, raw, k, x, bits)


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_quant_matmul_empty(t):
    k = block_size(t)
    raw = make_weights(t, 4, k, np.random.default_rng(0))
    assert _core.quant_matmul(int(t), raw, k, np.zeros((0, k), np.float32)).shape == (0, 4)
    assert _core.quant_matmul(int(t), raw[:0], k, np.zeros((2, k), np.float32)).shape == (2, 0)


# ---------------------------------------------------------------------------------------------
# Real tensors from the SmolLM2 GGUF file


@functools.lru_cache(maxsize=1)
def first_tensor_of_each_type(path: str) -> dict:
    """The first tensor of each GGML type in a GGUF file (the reader is slow: cached)."""
    from gguf import GGUFReader

    first_of_type = {}
    for tensor in GGUFReader(path).tensors:
        first_of_type.setdefault(G(tensor.tensor_type), tensor)
    return first_of_type


def test_real_tensors_dequantize_exactly(smollm2_gguf_path):
    tensors = first_tensor_of_each_type(str(smollm2_gguf_path))
    assert tensors, "no tensors in the file"
    for t, tensor in tensors.items():
        assert _core.dtype_is_supported(int(t)), f"{tensor.name} has unsupported type {t.name}"
        n = int(tensor.shape[0])  # GGUF lists the row length first
        raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1, row_bytes(t, n))
        picked = raw[[0, 1, 2, raw.shape[0] - 1]] if raw.shape[0] > 3 else raw
        ours = core_dequantize(t, picked, picked.shape[0], n)
        assert_bit_exact(ours, gguf_dequantize(t, np.ascontiguousarray(picked), picked.shape[0]))


def test_real_tensors_matmul(smollm2_gguf_path):
    tensors = first_tensor_of_each_type(str(smollm2_gguf_path))
    rng = np.random.default_rng(11)
    for t, tensor in tensors.items():
        if len(tensor.shape) != 2:
            continue
        k = int(tensor.shape[0])
        raw = np.ascontiguousarray(tensor.data[:67]).view(np.uint8).reshape(-1, row_bytes(t, k))
        x = rng.standard_normal((5, k), dtype=np.float32)
        check_matmul(t, raw, k, x)


# ---------------------------------------------------------------------------------------------
# Bad arguments: ValueError before any memory is touched


def q4_0_row(n_blocks: int = 2) -> np.ndarray:
    return make_weights(G.Q4_0, 1, 32 * n_blocks, np.random.default_rng(0)).reshape(-1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((int(G.Q5_1), q4_0_row(), 32), "unsupported"),
        ((99, q4_0_row(), 32), "unsupported"),
        ((-1, q4_0_row(), 32), "unsupported"),
        ((2**40, q4_0_row(), 32), "unsupported"),
        ((int(G.Q4_0), q4_0_row(), 33), "block size"),
        ((int(G.Q4_0), q4_0_row(), -32), "block size"),
        ((int(G.Q4_0), q4_0_row(2), 96), "bytes"),
        ((int(G.Q4_0), q4_0_row().view(np.int8), 32), "dtype"),
        ((int(G.Q4_0), q4_0_row().reshape(1, -1), 32), "1-D"),
        ((int(G.Q4_0), np.repeat(q4_0_row(), 2)[::2], 64), "contiguous"),
    ],
)
def test_dequantize_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        _core.dequantize(*args)


def test_quant_matmul_rejects():
    k = 64
    w = make_weights(G.Q4_0, 4, k, np.random.default_rng(0))
    x = np.zeros((2, k), np.float32)
    bad = [
        ((int(G.Q5_1), w, k, x), "unsupported"),
        ((int(G.Q4_0), w, 48, x[:, :48]), "block size"),
        ((int(G.Q4_0), w, 0, x[:, :0]), "positive"),
        ((int(G.Q4_0), w, 96, np.zeros((2, 96), np.float32)), "bytes"),
        ((int(G.Q4_0), np.ascontiguousarray(w[:, :-1]), k, x), "bytes"),
        ((int(G.Q4_0), w.view(np.int8), k, x), "dtype"),
        ((int(G.Q4_0), w.reshape(-1), k, x), "2-D"),
        ((int(G.Q4_0), np.repeat(w, 2, axis=0)[::2], k, x), "contiguous"),
        ((int(G.Q4_0), w, k, x.astype(np.float64)), "dtype"),
        ((int(G.Q4_0), w, k, x.reshape(-1)), "2-D"),
        ((int(G.Q4_0), w, k, np.zeros((2, 2 * k), np.float32)[:, ::2]), "contiguous"),
        ((int(G.Q4_0), w, k, np.zeros((2, 2 * k), np.float32)), "columns"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            _core.quant_matmul(*args)
    with pytest.raises(ValueError, match="activation_bits must be 8 or 16"):
        _core.quant_matmul(int(G.Q4_0), w, k, x, activation_bits=12)
    with pytest.raises(ValueError, match="excludes fp32_activations"):
        _core.quant_matmul(int(G.Q4_0), w, k, x, fp32_activations=True, activation_bits=16)


def test_dtype_row_bytes_rejects():
    with pytest.raises(ValueError, match="unsupported"):
        _core.dtype_row_bytes(int(G.Q5_1), 32)
    with pytest.raises(ValueError, match="block size"):
        _core.dtype_row_bytes(int(G.Q4_K), 255)
