"""CPU row kernels (ops.h) and paged attention (attention.h) against plain float64 numpy.

Each kernel runs through ``lmengine._core.kernels`` on random float32 data at awkward sizes (one
element, odd lengths, SIMD tile and KV page boundaries ± 1) and is compared with the reference
below, evaluated in float64 on the same float32 inputs. Where the engine itself rounds something
before the kernel sees it (the RoPE angle, the KV cache dtype), the reference rounds it the same
way first, so the tolerances only cover the kernel's own arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmengine import _core

kernels = _core.kernels

# ---------------------------------------------------------------------------------------------
# Tolerances (all kernels compute in fp32; U = 2^-24 is fp32's unit roundoff). Checked per
# element as |kernel - reference| <= bound.
#   rmsnorm:  RMSNORM_REL * |ref|. The fp32 sum of squares of n <= 2048 positive terms over 16
#             lanes is off by at most ~(n/16 + 16) U relative (<= 7e-6 for n = 1537), halved by the
#             square root, plus a few U for sqrt, division and the two products.
#   rope:     ROPE_REL * (|a| + |b|) for the pair (a, b) an element is rotated with: cos/sin within
#             1 ulp each, two products and a sum (cancellation makes |ref| the wrong scale).
#   silu_mul: SILU_REL * |ref| + SILU_ABS. exp's error (below) at |gate| <= ~20 plus a few U;
#             gates under -87.3 make exp saturate and the output is ~1e-37 instead of ~1e-42.
#   exp:      (EXP_POLY_REL + EXP_ARG_REL * |x|) * |ref| for x >= -87.3; exactly 0 below. The
#             polynomial for 2^f is good to ~1e-7, but t = x * log2(e) is rounded to fp32 first,
#             which costs up to |x| * U relative (the condition number of exp): ~1.2e-6 at -87.
#   attention: ATTENTION_ABS * max|V[lo..pos]|. Scores are fp32 dots of <= 128 terms (an error
#             of ~D U |q||k| scale in the logit), the softmax sees exp's error, and the output sums
#             <= 257 weighted rows. The reference uses K/V rounded to the cache dtype, so one bound
#             serves f32, f16 and bf16.
U = 2.0**-24
RMSNORM_REL = 1e-5
ROPE_REL = 8 * U
SILU_REL = 2e-6
SILU_ABS = 1e-30
EXP_POLY_REL = 2e-7
EXP_ARG_REL = U
EXP_FLUSH_BELOW = np.float32(-87.3)
ATTENTION_ABS = 1e-5
# ---------------------------------------------------------------------------------------------


def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """(T, n), (n,) -> (T, n): x / sqrt(mean(x^2) + eps) * w."""
    x64 = x.astype(np.float64)
    rms = np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + np.float64(np.float32(eps)))
    return x64 / rms * w.astype(np.float64)


def rope_angles(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """(T,), (D/2,) -> (T, D/2) float64 holding the engine's float32 angles pos * inv_freq.

    At pos = 100000 the float32 angle is off the exact one by up to ~4e-3 rad; the engine uses
    the float32 value, so the reference does too."""
    angle32 = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    assert angle32.dtype == np.float32
    return angle32.astype(np.float64)


def rope_halves_ref(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """(T, H, D) -> (T, H, D), HF's rotate_half form: x * cos + rotate_half(x) * sin."""
    ang = rope_angles(positions, inv_freq)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[:, None, :]  # (T, 1, D)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[:, None, :]
    x64 = x.astype(np.float64)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x64[..., half:], x64[..., :half]], axis=-1)
    return x64 * cos + rotated * sin


def rope_interleaved_ref(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """(T, H, D) -> (T, H, D), Meta's form: adjacent pairs as complex numbers times e^(i angle)."""
    ang = rope_angles(positions, inv_freq)[:, None, :]  # (T, 1, D/2)
    x64 = x.astype(np.float64)
    z = (x64[..., 0::2] + 1j * x64[..., 1::2]) * np.exp(1j * ang)
    out = np.empty_like(x64)
    out[..., 0::2] = z.real
    out[..., 1::2] = z.imag
    return out


def silu_mul_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * up.astype(np.float64)


def gelu_tanh_mul_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    # 0.5 (1 + tanh(u)) written as sigmoid(2u): the same function without float64's
    # cancellation in 1 + tanh(u) where tanh(u) ~ -1.
    g = gate.astype(np.float64)
    inner = np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3)
    with np.errstate(over="ignore"):  # exp(+large) = inf gives the right limit, 0
        return g / (1.0 + np.exp(-2.0 * inner)) * up.astype(np.float64)


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, lo: int, scale: float) -> np.ndarray:
    """(group, D), (L, D), (L, D) -> (group, D): the query at position L-1 over keys lo..L-1."""
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k[lo:], v[lo:]))
    s = scale * (q64 @ k64.T)  # (group, L - lo)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v64


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), as float32, for finite inputs."""
    bits = x.astype(np.float32).view(np.uint32)
    toward_zero = bits & np.uint32(0xFFFF0000)
    away = toward_zero + np.uint32(0x10000)
    a = toward_zero.view(np.float32).astype(np.float64)
    b = away.view(np.float32).astype(np.float64)
    x64 = x.astype(np.float64)
    da, db = np.abs(x64 - a), np.abs(b - x64)
    even = ((toward_zero >> np.uint32(16)) & np.uint32(1)) == 0
    pick_a = (da < db) | ((da == db) & even)
    return np.where(pick_a, toward_zero, away).view(np.float32)


def round_kv(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    if kv_dtype == "f32":
        return x
    if kv_dtype == "f16":
        return x.astype(np.float16).astype(np.float32)
    return round_bf16(x)


def inv_freq_for(head_dim: int, theta: float) -> np.ndarray:
    """(D/2,) float32, as HF computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / theta**exponent).astype(np.float32)


# ---------------------------------------------------------------------------------------------


def test_round_bf16_reference():
    x = np.array([1.0, 1.00390625, 1.005859375, 1.0078125 + 2**-8, -3.14159, 0.0], np.float32)
    want = np.array([1.0, 1.0, 1.0078125, 1.015625, -3.140625, 0.0], np.float32)
    np.testing.assert_array_equal(round_bf16(x), want)


@pytest.mark.parametrize("n", [1, 7, 64, 576, 1537])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_rmsnorm(n, T):
    rng = np.random.default_rng(1000 * n + T)
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[-1] *= 1e3  # scale invariance, away from eps
    if T > 2:
        x[1] = 0.0  # eps alone keeps the row finite
    w = (1.0 + 0.5 * rng.standard_normal(n)).astype(np.float32)
    eps = 1e-6
    y = kernels.rmsnorm(x, w, eps)
    assert y.shape == (T, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, rmsnorm_ref(x, w, eps), rtol=RMSNORM_REL, atol=0)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 2])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope(interleaved, head_dim, T, theta):
    rng = np.random.default_rng(head_dim * 100 + T)
    n_heads = 3
    x = rng.standard_normal((T, n_heads, head_dim)).astype(np.float32)
    positions = rng.integers(0, 1 << 17, T).astype(np.int32)
    positions[-1] = 100000
    if T > 1:
        positions[0] = 0
    if T > 2:
        positions[1] = 1
    inv_freq = inv_freq_for(head_dim, theta)
    y = kernels.rope(x, positions, inv_freq, interleaved)
    assert y.shape == x.shape and y.dtype == np.float32
    ref = (rope_interleaved_ref if interleaved else rope_halves_ref)(x, positions, inv_freq)
    idx = np.arange(head_dim)
    partner = idx ^ 1 if interleaved else (idx + head_dim // 2) % head_dim
    bound = ROPE_REL * (np.abs(x) + np.abs(x[..., partner])).astype(np.float64)
    err = np.abs(y - ref)
    assert (err <= bound).all(), f"max err/bound {np.max(err / bound):.3g}"
    if T > 1:
        np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity


@pytest.mark.parametrize("n", [1, 7, 64, 255, 256, 257, 576, 1537])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_silu_mul(n, T):
    rng = np.random.default_rng(1000 * n + T)
    gate = (4.0 * rng.standard_normal((T, n))).astype(np.float32)
    up = rng.standard_normal((T, n)).astype(np.float32)
    extremes = np.array([-100.0, -88.0, -87.0, -20.0, 0.0, 20.0, 90.0], np.float32)
    flat = gate.reshape(-1)
    flat[-len(extremes) :] = extremes[-flat.size :]
    out = kernels.silu_mul(gate, up)
    assert out.shape == (T, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, silu_mul_ref(gate, up), rtol=SILU_REL, atol=SILU_ABS)


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 2048])
@pytest.mark.parametrize("T", [1, 3])
def test_gelu_tanh_mul(n, T):
    # gelu_tanh(x) = x * sigmoid(2u): exp's error at argument 2u (up to its clamp at |x| ~ 9.5,
    # past which the output is x, or a number below 1e-30 where the reference is ~0).
    rng = np.random.default_rng(7000 * n + T)
    gate = (3.0 * rng.standard_normal((T, n))).astype(np.float32)
    up = rng.standard_normal((T, n)).astype(np.float32)
    extremes = np.array([-100.0, -12.0, -9.5, -3.0, 0.0, 3.0, 9.5, 90.0], np.float32)
    flat = gate.reshape(-1)
    flat[-len(extremes) :] = extremes[-flat.size :]
    out = kernels.gelu_tanh_mul(gate, up)
    assert out.shape == (T, n) and out.dtype == np.float32
    ref = gelu_tanh_mul_ref(gate, up)
    g = gate.astype(np.float64)
    exp_arg = np.minimum(np.abs(2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)), 88.3)
    # The argument 2u itself is rounded ~4 times in fp32 (x^3, two products, a sum): each costs
    # up to U * |2u| in exp's argument, i.e. relative error in the result.
    bound = (EXP_POLY_REL + 5 * EXP_ARG_REL * exp_arg + 8 * U) * np.abs(ref) + SILU_ABS
    assert np.all(np.abs(out - ref) <= bound)


def test_exp():
    grid = np.linspace(-100.0, 10.0, 110001, dtype=np.float32)
    edges = np.array(
        [
            EXP_FLUSH_BELOW,
            np.nextafter(EXP_FLUSH_BELOW, np.float32(-np.inf)),
            np.nextafter(EXP_FLUSH_BELOW, np.float32(np.inf)),
            -0.0,
            0.0,
            1e-30,
            -1e-30,
            0.5,
            -0.5,
            1.5,
            88.0,
        ],
        np.float32,
    )
    x = np.concatenate([grid, edges]).reshape(-1, 7)
    y = kernels.exp(x)
    assert y.shape == x.shape and y.dtype == np.float32
    flushed = x < EXP_FLUSH_BELOW
    assert (y[flushed] == 0).all()
    x64 = x[~flushed].astype(np.float64)
    ref = np.exp(x64)
    rel = np.abs(y[~flushed] / ref - 1.0)
    bound = EXP_POLY_REL + EXP_ARG_REL * np.abs(x64)
    worst = np.argmax(rel / bound)
    assert (rel <= bound).all(), (
        f"exp({x64[worst]!r}): rel err {rel[worst]:.3g} > {bound[worst]:.3g}"
    )
    assert (y[x == 0] == 1.0).all()


LENGTHS = [1, 15, 16, 17, 31, 33, 256, 257]
WINDOW = 13  # a sliding window that starts mid-page


def shuffled_pages(n_pages: int, rng: np.random.Generator) -> np.ndarray:
    """A random single-cycle permutation of range(n_pages) (Sattolo): every page moves."""
    cycle = rng.permutation(n_pages)
    order = np.empty(n_pages, np.int32)
    order[cycle] = np.roll(cycle, -1)
    return order


def attention_case(L, head_dim, group, kv_dtype, seed):
    rng = np.random.default_rng(seed)
    q = (2.0 * rng.standard_normal((group, head_dim))).astype(np.float32)
    k = rng.standard_normal((L, head_dim)).astype(np.float32)
    v = rng.standard_normal((L, head_dim)).astype(np.float32)
    return q, k, v, rng


def check_attention(out, q, k, v, lo, kv_dtype, scale=None):
    group, head_dim = q.shape
    if scale is None:
        scale = float(np.float32(1.0) / np.sqrt(np.float32(head_dim)))
    kr, vr = round_kv(k, kv_dtype), round_kv(v, kv_dtype)
    ref = attention_ref(q, kr, vr, lo, scale)
    assert out.shape == (group, head_dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    bound = ATTENTION_ABS * np.abs(vr[lo:]).max()
    err = np.abs(out - ref).max()
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, WINDOW, 1], ids=["full", "window", "self"])
@pytest.mark.parametrize("L", LENGTHS)
def test_attention_paged(L, window, group, head_dim, kv_dtype):
    page_size = 16
    q, k, v, rng = attention_case(L, head_dim, group, kv_dtype, seed=L * 1000 + head_dim + group)
    lo = 0 if window is None else max(0, L - window)
    order = shuffled_pages(-(-L // page_size), rng)
    out = kernels.attention_paged(q, k, v, lo, page_size, kv_dtype, order)
    check_attention(out, q, k, v, lo, kv_dtype)


@pytest.mark.parametrize("page_size", [1, 8, 32])
@pytest.mark.parametrize("L", [1, 31, 33, 100])
def test_attention_paged_other_page_sizes(page_size, L):
    """Page sizes other than 16 take the generic page-score loop."""
    q, k, v, rng = attention_case(L, 64, 2, "f16", seed=page_size * 1000 + L)
    for lo in sorted({0, max(0, L - WINDOW), L - 1}):
        order = shuffled_pages(-(-L // page_size), rng)
        out = kernels.attention_paged(q, k, v, lo, page_size, "f16", order)
        check_attention(out, q, k, v, lo, "f16")


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("L", [1000, 2111])
def test_attention_paged_across_page_groups(L, kv_dtype):
    """Contexts of several pool page groups (KVCache::kPageGroup = 32 pages), pages shuffled
    over the pool: the decode kernel walks 4-page softmax steps across group boundaries."""
    q, k, v, rng = attention_case(L, 64, 3, kv_dtype, seed=L + 17)
    for lo in (0, 517, L - 40):
        out = kernels.attention_paged(q, k, v, lo, 16, kv_dtype, shuffled_pages(-(-L // 16), rng))
        check_attention(out, q, k, v, lo, kv_dtype)


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
def test_attention_paged_page_order_is_invisible(kv_dtype):
    """Where the pages live changes no bit of the result."""
    L, page_size = 257, 16
    q, k, v, rng = attention_case(L, 128, 4, kv_dtype, seed=7)
    n_pages = -(-L // page_size)
    identity = kernels.attention_paged(
        q, k, v, 40, page_size, kv_dtype, np.arange(n_pages, dtype=np.int32)
    )
    for _ in range(3):
        shuffled = kernels.attention_paged(
            q, k, v, 40, page_size, kv_dtype, shuffled_pages(n_pages, rng)
        )
        np.testing.assert_array_equal(shuffled, identity)


def test_attention_paged_scale_and_peaked_softmax():
    """A large scale makes the softmax nearly one-hot; the max subtraction must keep it finite."""
    q, k, v, _ = attention_case(33, 64, 3, "f32", seed=11)
    order = np.array([2, 0, 1], np.int32)
    for scale in [0.01, 1.0, 30.0]:
        out = kernels.attention_paged(q, k, v, 0, 16, "f32", order, scale=scale)
        check_attention(out, q, k, v, 0, "f32", scale=scale)


f32 = np.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kernels.rmsnorm(np.ones((2, 4)), np.ones(4, f32), 1e-6), "dtype"),
        (lambda: kernels.rmsnorm(np.ones((2, 4), f32), np.ones(5, f32), 1e-6), "w has shape"),
        (lambda: kernels.rmsnorm(np.ones((2, 0), f32), np.ones(0, f32), 1e-6), "at least one"),
        (lambda: kernels.rmsnorm(np.ones((4, 2), f32).T, np.ones(4, f32), 1e-6), "C-contiguous"),
        (
            lambda: kernels.rope(
                np.ones((1, 1, 3), f32), np.zeros(1, np.int32), np.ones(1, f32), False
            ),
            "even",
        ),
        (
            lambda: kernels.rope(
                np.ones((2, 1, 4), f32), np.zeros(1, np.int32), np.ones(2, f32), False
            ),
            "positions",
        ),
        (
            lambda: kernels.rope(
                np.ones((1, 1, 4), f32), np.zeros(1, np.int64), np.ones(2, f32), True
            ),
            "dtype",
        ),
        (
            lambda: kernels.rope(
                np.ones((1, 1, 4), f32), np.zeros(1, np.int32), np.ones(3, f32), True
            ),
            "inv_freq",
        ),
        (lambda: kernels.silu_mul(np.ones((2, 3), f32), np.ones((3, 2), f32)), "up has shape"),
        (lambda: kernels.exp(np.ones(3, np.float64)), "dtype"),
        (lambda: kernels.attention_paged(*attn_args(kv_dtype="fp8")), "kv_dtype"),
        (lambda: kernels.attention_paged(*attn_args(lo=17)), "lo"),
        (lambda: kernels.attention_paged(*attn_args(lo=-1)), "lo"),
        (lambda: kernels.attention_paged(*attn_args(page_size=0)), "page_size"),
        (lambda: kernels.attention_paged(*attn_args(order=[0, 0])), "permutation"),
        (lambda: kernels.attention_paged(*attn_args(order=[0, 2])), "permutation"),
        (lambda: kernels.attention_paged(*attn_args(order=[0])), "page_order"),
        (lambda: kernels.attention_paged(*attn_args(k_len=16)), "v has shape"),
        (lambda: kernels.attention_paged(*attn_args(q_dim=8)), "k has shape"),
        (lambda: kernels.attention_paged(*attn_args(L=0)), "at least one token"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def attn_args(L=17, kv_dtype="f32", lo=0, page_size=16, order=(1, 0), k_len=None, q_dim=4):
    q = np.ones((2, q_dim), f32)
    k = np.ones((L if k_len is None else k_len, 4), f32)
    v = np.ones((L, 4), f32)
    return q, k, v, lo, page_size, kv_dtype, np.asarray(order, np.int32)


# ---------------------------------------------------------------------------------------------
# log_sum_exp (the sampler's one pass over a logits row)


@pytest.mark.parametrize("n", [1, 7, 8, 513, 49152])
def test_log_sum_exp_matches_float64(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 8).astype(np.float32)
    peak, lse = kernels.log_sum_exp(x)
    x64 = x.astype(np.float64)
    assert peak == x.max()
    want = x64.max() + np.log(np.exp(x64 - x64.max()).sum())
    assert abs(lse - want) <= 1e-6 * max(1.0, abs(want))


def test_log_sum_exp_non_finite_and_bad_input():
    x = np.array([1.0, np.nan, 3.0], np.float32)
    assert np.isnan(kernels.log_sum_exp(x)[0])
    assert kernels.log_sum_exp(np.array([-np.inf, -np.inf], np.float32))[0] == -np.inf
    assert kernels.log_sum_exp(np.array([0.0, np.inf], np.float32)) == (np.inf, np.inf)
    with pytest.raises(ValueError, match="empty"):
        kernels.log_sum_exp(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        kernels.log_sum_exp(np.zeros(4, np.float64))
