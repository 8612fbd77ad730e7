"""The prompt-chunk product (``quant_matmul(..., fp32_activations=True)``, C++ matmul_rows_f32)
against numpy: weights dequantized exactly, fp32 activations, any weight type.

Reference: ``gguf``-dequantized W @ x.T in float64. The only error is fp32 accumulation, bounded by
FP32_SUM_REL * sum_i |W x| (test_quant.py's tolerance table); no activation rounding term.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as G

from lmengine import _core
from test_quant import (
    FP32_SUM_REL,
    SUPPORTED,
    assert_bit_exact,
    block_size,
    gguf_dequantize,
    make_weights,
)


def k_for(t: G, k_blocks: int) -> int:
    # Float types have block size 1: 37 per "block" leaves a tail past the 8-float transposes.
    return k_blocks * (block_size(t) if block_size(t) > 1 else 37)


def f32_matmul(t: G, raw: np.ndarray, k: int, x: np.ndarray) -> np.ndarray:
    return _core.quant_matmul(int(t), raw, k, x, fp32_activations=True)


# Sizes straddle the micro-panel (16 rows), the panel group (32 rows) and the token tile (6).
@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 15, 17, 33, 130])
@pytest.mark.parametrize("n_tokens", [1, 6, 7, 13])
@pytest.mark.parametrize("k_blocks", [1, 3, 7])
def test_fp32_activation_matmul_matches_numpy(t, rows, n_tokens, k_blocks):
    rng = np.random.default_rng(1000 * rows + 10 * n_tokens + k_blocks)
    k = k_for(t, k_blocks)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    w = gguf_dequantize(t, raw, rows).astype(np.float64)
    expected = x.astype(np.float64) @ w.T
    bound = FP32_SUM_REL * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-30
    y = f32_matmul(t, raw, k, x)
    assert y.shape == (n_tokens, rows)
    err = np.abs(y - expected)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@pytest.mark.parametrize("t", SUPPORTED, ids=lambda t: t.name)
def test_fp32_activation_panels_hold_exact_weights(t):
    # Unit activation rows make every FMA chain one exact product: y[i, r] == W[r, i] bit for bit,
    # so the dequantized panels equal gguf's dequantization (SIMD and scalar unpacking alike). The
    # chains start at +0, so a weight of -0 comes out +0: compare after adding +0 to both.
    rng = np.random.default_rng(3)
    rows, k = 19, k_for(t, 3)
    raw = make_weights(t, rows, k, rng)
    y = f32_matmul(t, raw, k, np.eye(k, dtype=np.float32))
    zero = np.float32(0)
    expected = gguf_dequantize(t, raw, rows).astype(np.float32) + zero
    assert_bit_exact(np.ascontiguousarray(y.T) + zero, expected)


@pytest.mark.parametrize("t", [G.Q4_1, G.Q8_0, G.Q6_K, G.F16], ids=lambda t: t.name)
def test_fp32_activation_results_do_not_depend_on_the_call(t):
    # The engine relies on y[t, r] being the same bits whichever tokens and rows share the call:
    # one token at a time, every token together, and a row range starting mid-panel.
    rng = np.random.default_rng(11)
    rows, n_tokens, k = 45, 13, k_for(t, 3)
    raw = make_weights(t, rows, k, rng)
    x = rng.standard_normal((n_tokens, k), dtype=np.float32)
    together = f32_matmul(t, raw, k, x)
    alone = np.concatenate([f32_matmul(t, raw, k, x[i : i + 1]) for i in range(n_tokens)])
    assert_bit_exact(together, alone)
    assert_bit_exact(f32_matmul(t, np.ascontiguousarray(raw[5:]), k, x[3:10]), together[3:10, 5:])


def test_fp32_activation_matmul_rejects_reference_flag():
    raw = make_weights(G.Q8_0, 2, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="fp32_activations"):
        _core.quant_matmul(int(G.Q8_0), raw, 32, np.zeros((1, 32), np.float32), True, True)
