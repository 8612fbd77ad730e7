"""CUDA MoE layer (cuda/moe_dispatch.cu through lmengine._core.cuda.moe_forward) against the
float64 numpy reference of tests/test_moe_dispatch.py, on the same (dequantized) weights.

``cuda.moe_forward`` takes kernels.moe_forward's arguments (weight tuples), copies them to the device
and returns (out [T, d], counts [E]). The sweep covers T in {1, 3, 17, 64}, E in {4, 8, 64}, top_k in
{1, 2, 8}, widths 64/96/160, softmax and sigmoid + group-limited routing, renormalisation, routed
scaling, selection bias, shared experts with and without a gate, float and quantized weights; more
tests cover odd float widths, K-quants, experts without tokens, every token on one expert, and
determinism. Kernel tests skip without a usable CUDA device; the argument checks, the workspace
sizes and the no-device error run wherever the kernels were compiled in.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as G

from lmengine import _core
from lmengine.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from test_cuda_kernels import dequantize_rows, make_weights
from test_cuda_kernels import needs_gpu as cuda_needs_gpu
from test_moe_dispatch import (
    all_to_expert_2,
    as_weight,
    layer_core_args,
    layer_reference,
    layer_shared,
    make_layer,
    rel_err,
)

# ---------------------------------------------------------------------------------------------
# Tolerance: max |out - ref| <= MOE_TOL * max |ref| over the whole [T, d] output, for every weight
# type. The device keeps activations in fp32 and the reference sees the dequantized weights, so what
# is left is fp32 rounding: two chained products of <= 256 terms (~sqrt(n) * 2^-24 each, n * 2^-24 =
# 1.5e-5 at worst), expf in the scores and SiLU, and the k-term slot sum. Routing is compared
# exactly (expert histogram): the router stays F32, far below the gaps between random scores.
MOE_TOL = 1e-4
# ---------------------------------------------------------------------------------------------

CUDA = getattr(_core, "cuda", None)
MOE_COMPILED = CUDA is not None and _core.cuda_compiled() and hasattr(CUDA, "moe_forward")

needs_moe_kernels = pytest.mark.skipif(not MOE_COMPILED, reason="built without the CUDA kernels")


def needs_gpu(test):
    return needs_moe_kernels(cuda_needs_gpu(test))


BLOCK_KINDS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0"]
KINDS = ["F32", "F16", "BF16", *BLOCK_KINDS]


def run_both(layer, x, top_k, **routing):
    """(out, counts) of the device and of the reference, for kernels.moe_forward-style kwargs."""
    out, counts = CUDA.moe_forward(
        x, *layer_core_args(layer, top_k), shared=layer_shared(layer, 0), **routing
    )
    ref, ref_counts = layer_reference(layer, x, top_k, **routing)
    return out, counts, ref, ref_counts


def check(out, counts, ref, ref_counts, what=""):
    np.testing.assert_array_equal(counts, ref_counts)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= MOE_TOL, f"{what}: relative error {err:.2e}"


def random_routing(rng, E, top_k):
    """Softmax (optionally renormalised and scaled) or DeepSeek-V3-style sigmoid routing: groups,
    topk_group, scaling factor and selection bias drawn at random among the valid ones."""
    routing = {"norm_topk_prob": bool(rng.integers(2))}
    if rng.integers(2):
        n_group = int(rng.choice([g for g in (1, 2, 4, 8) if E % g == 0]))
        group_size = E // n_group
        topk_group = int(rng.integers(-(-top_k // group_size), n_group + 1))
        routing.update(
            scoring="sigmoid",
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(rng.choice([1.0, 2.5])),
        )
        if rng.integers(2):
            routing["score_bias"] = (0.5 * rng.standard_normal(E)).astype(np.float32)
    else:
        routing["routed_scaling_factor"] = float(rng.choice([1.0, 1.5]))
    return routing


# ---------------------------------------------------------------------------------------------
# Device results against the reference

SWEEP_EXPERTS = [(E, k) for E in (4, 8, 64) for k in (1, 2, 8) if k <= E]


@needs_gpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("T", [1, 3, 17, 64])
@pytest.mark.parametrize(("E", "top_k"), SWEEP_EXPERTS)
def test_moe_matches_reference(seed, T, E, top_k):
    rng = np.random.default_rng([seed, T, E, top_k])
    kind = KINDS[int(rng.integers(len(KINDS)))]
    d, ff = (int(v) for v in rng.choice([64, 96, 160], 2))
    shared = ["none", "plain", "gated"][int(rng.integers(3))]
    shared_ff = int(rng.choice([32, 96])) if shared != "none" else 0
    layer = make_layer(rng, E, d, ff, kind, shared_ff, router_gain=3.0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    routing = random_routing(rng, E, top_k)
    if shared == "gated":
        routing["shared_gate_inp"] = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, top_k, **routing)
    assert counts.sum() == T * top_k
    check(out, counts, ref, ref_counts, f"{kind} d={d} ff={ff} shared={shared} {routing}")


@needs_gpu
@pytest.mark.parametrize("kind", ["F32", "F16", "BF16"])
@pytest.mark.parametrize(("d", "ff"), [(37, 45), (64, 45), (40, 24), (5, 3)])
def test_moe_float_weights_of_any_width(kind, d, ff):
    # Rows that are not a multiple of 8 take the scalar reader (unaligned activation rows).
    rng = np.random.default_rng(d * 100 + ff)
    layer = make_layer(rng, 6, d, ff, kind, shared_ff=ff)
    x = rng.standard_normal((9, d)).astype(np.float32)
    gate_inp = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    check(*run_both(layer, x, 2, shared_gate_inp=gate_inp), f"{kind} d={d} ff={ff}")


@needs_gpu
@pytest.mark.parametrize("T", [1, 17])
def test_moe_k_quants(T):
    """GGUF-style layer: gate/up Q4_K, down Q6_K (raw blocks: gguf has no K-quantizer), shared
    expert Q6_K/Q4_K, router F16."""
    rng = np.random.default_rng(T)
    E, d, ff = 8, 256, 512

    def raw(t, rows, cols):
        w = make_weights(t, rows, cols, rng, raw=True)
        return (int(t), w.reshape(-1), rows, cols), dequantize_rows(t, w).astype(np.float64)

    layer = {
        "router": as_weight(rng.standard_normal((E, d)) / np.sqrt(d), "F16"),
        "gate": [raw(G.Q4_K, ff, d) for _ in range(E)],
        "up": [raw(G.Q4_K, ff, d) for _ in range(E)],
        "down": [raw(G.Q6_K, d, ff) for _ in range(E)],
        "shared": [raw(G.Q6_K, 256, d), raw(G.Q6_K, 256, d), raw(G.Q4_K, d, 256)],
    }
    # Raw blocks hold weights up to ~50: small activations keep SiLU away from its flat ends.
    x = (0.01 * rng.standard_normal((T, d))).astype(np.float32)
    check(*run_both(layer, x, 3, norm_topk_prob=True), f"K-quants T={T}")


@needs_gpu
@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_moe_all_tokens_to_one_expert(kind, top_k):
    """A router row aligned with a constant input feature sends every token to expert 2 first;
    with top_k=1 every other expert gets nothing (64 pairs on one expert: two work items)."""
    T = 64
    layer, x = all_to_expert_2(np.random.default_rng(5), T, 8, 64, 96, kind, shared_ff=32)
    out, counts, ref, ref_counts = run_both(layer, x, top_k)
    check(out, counts, ref, ref_counts, f"{kind} k={top_k}")
    assert counts[2] == T
    if top_k == 1:
        assert counts.sum() == counts[2]


@needs_gpu
def test_moe_selection_bias_picks_one_expert():
    """Sigmoid scoring with a large selection bias on expert 5: every token chooses it, and its
    weight is still the unbiased sigmoid score (renormalised, times the scaling factor)."""
    rng = np.random.default_rng(6)
    E, d, ff, T = 16, 96, 64, 33
    layer = make_layer(rng, E, d, ff, "Q4_1")
    bias = np.zeros(E, dtype=np.float32)
    bias[5] = 10.0
    routing = dict(
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        score_bias=bias,
    )
    x = rng.standard_normal((T, d)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, 2, **routing)
    check(out, counts, ref, ref_counts)
    assert counts[5] == T


@needs_gpu
def test_moe_experts_without_tokens():
    """One token, 64 experts, top-2: 62 experts get no pair (no work items, no placement)."""
    rng = np.random.default_rng(7)
    layer = make_layer(rng, 64, 64, 64, "Q8_0", shared_ff=64)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, 2)
    check(out, counts, ref, ref_counts)
    assert (counts == 0).sum() == 62


@needs_gpu
def test_moe_is_deterministic_and_batch_invariant():
    """No float atomics: two runs agree bitwise, and a token's row is the same alone as in a batch
    (every pair runs the same instructions whatever else shares its tile)."""
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 8, 64, 96, "Q4_0", shared_ff=32)
    args = layer_core_args(layer, 2)
    shared = tuple(s[0] for s in layer["shared"])
    gate_inp = (rng.standard_normal(64) / 8).astype(np.float32)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    first, counts = CUDA.moe_forward(x, *args, shared=shared, shared_gate_inp=gate_inp)
    again, counts_again = CUDA.moe_forward(x, *args, shared=shared, shared_gate_inp=gate_inp)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(counts, counts_again)
    for t in (0, 13, 39):
        alone, _ = CUDA.moe_forward(x[t : t + 1], *args, shared=shared, shared_gate_inp=gate_inp)
        np.testing.assert_array_equal(alone[0], first[t])


@needs_gpu
def test_moe_counts_match_the_cpu_dispatch():
    rng = np.random.default_rng(9)
    layer = make_layer(rng, 64, 64, 32, "Q4_0", router_gain=3.0)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    _, counts = CUDA.moe_forward(x, *layer_core_args(layer, 8))
    _, cpu_counts = _core.kernels.moe_forward(x, *layer_core_args(layer, 8))
    np.testing.assert_array_equal(counts, cpu_counts)


# ---------------------------------------------------------------------------------------------
# Host-side checks: these run without a GPU (ValueError subclasses before any device work).


def small_layer(rng, E=4, d=64, ff=32):
    return make_layer(rng, E, d, ff, "F32")


@needs_moe_kernels
def test_moe_rejects_bad_layers_before_the_device():
    rng = np.random.default_rng(0)
    layer = small_layer(rng)
    router, gate, up, down, _ = layer_core_args(layer, 2)
    x = np.zeros((3, 64), dtype=np.float32)
    with pytest.raises(ModelFileError, match="ffn_up_exps holds 3 experts"):
        CUDA.moe_forward(x, router, gate, up[:3], down, 2)
    with pytest.raises(ModelFileError, match="top_k"):
        CUDA.moe_forward(x, router, gate, up, down, 5)
    with pytest.raises(ModelFileError, match="n_group"):
        CUDA.moe_forward(x, router, gate, up, down, 2, scoring="sigmoid", n_group=3)
    with pytest.raises(UnsupportedModelError, match="scoring"):
        CUDA.moe_forward(x, router, gate, up, down, 2, scoring="relu")
    with pytest.raises(UnsupportedModelError, match="exp_probs_b"):
        CUDA.moe_forward(x, router, gate, up, down, 2, score_bias=np.zeros(4, np.float32))
    with pytest.raises(InvalidRequestError, match="x must be"):
        CUDA.moe_forward(x[:, :32].copy(), router, gate, up, down, 2)
    with pytest.raises(ValueError, match="iters"):
        CUDA.moe_forward(x, router, gate, up, down, 2, iters=-1)


@needs_moe_kernels
def test_moe_workspace_bytes():
    size = CUDA.moe_workspace_bytes
    assert size(0, 64, 96, 0, 8, 2) >= 0
    # Monotone in every size, so one workspace for the largest step serves the smaller ones.
    base = size(17, 64, 96, 32, 8, 2)
    for grown in (
        size(18, 64, 96, 32, 8, 2),
        size(17, 96, 96, 32, 8, 2),
        size(17, 64, 160, 32, 8, 2),
        size(17, 64, 96, 64, 8, 2),
        size(17, 64, 96, 32, 64, 2),
        size(17, 64, 96, 32, 8, 8),
    ):
        assert grown >= base
    assert size(1000, 4096, 1024, 0, 128, 8) > size(1, 4096, 1024, 0, 128, 8)
    for bad in (
        (1, 0, 96, 0, 8, 2),
        (1, 64, 96, 0, 8, 9),
        (1, 64, 96, 0, 5000, 2),
        (-1, 64, 96, 0, 8, 2),
    ):
        assert size(*bad) == -1, bad


def test_moe_forward_without_a_device_raises_or_is_absent():
    """Runs in every build: without the CUDA kernels there is no cuda.moe_forward; with them but
    no device, a valid call fails with RuntimeError (not a crash) after the argument checks."""
    if not MOE_COMPILED:
        assert CUDA is None or not hasattr(CUDA, "moe_forward")
        return
    if _core.cuda_available():
        pytest.skip("a CUDA device is present")
    layer = small_layer(np.random.default_rng(1))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        CUDA.moe_forward(np.ones((2, 64), np.float32), *layer_core_args(layer, 2))
