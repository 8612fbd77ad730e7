"""MoE dispatch (cpp/lmengine/moe_dispatch.cpp) against a naive per-token numpy reference.

``_core.kernels.moe_forward`` runs the engine's own dispatch (router product, scoring, top-k,
histogram, grouping by expert, one product per expert, scatter-add) on its own thread pool. The
reference below loops over tokens and their chosen experts in float64 on the dequantized weights,
following HF transformers' routing: softmax (Mixtral / Qwen-MoE / OLMoE) or sigmoid plus a
selection-only bias with group-limited top-k (DeepSeek-V3), optional renormalisation, routed
scaling factor, and a shared expert that is either gated by sigmoid(w . x) (Qwen2-MoE) or not
(DeepSeek).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as G
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmengine import _core
from lmengine.errors import InvalidRequestError, ModelFileError, UnsupportedModelError

# ---------------------------------------------------------------------------------------------
# Tolerances: max |out - ref| <= TOL * max |ref| over the whole [T, d] output. The reference sees
# the same (dequantized) weights, so only activation rounding and fp32 summation remain:
#   F32/F16 weights: fp32 activations, fp32 sums over <= 160 terms through two products;
#     observed ~2e-7.
#   quantized weights, activation_bits=16: 16-bit activation blocks (~2^-16 relative per
#     element); observed ~5e-5. 8 bits: one 8-bit row per product (amax/254 per element);
#     observed ~1.4e-2.
# Routing is compared exactly (expert histogram) since the router stays F32: its logits differ
# from float64 by ~1e-7, far below the gaps between random scores.
TOL = {("F32", 16): 2e-6, ("F16", 16): 2e-6, ("Q8_0", 16): 5e-4, ("Q4_0", 16): 5e-4}
TOL_8BIT = 5e-2
# ---------------------------------------------------------------------------------------------

# The CPU tests use F32, F16, Q8_0 and Q4_0; tests/test_cuda_moe.py the rest too.
GTYPE = {
    "F32": G.F32,
    "F16": G.F16,
    "BF16": G.BF16,
    "Q8_0": G.Q8_0,
    "Q4_0": G.Q4_0,
    "Q4_1": G.Q4_1,
    "Q5_0": G.Q5_0,
}


def as_weight(w: np.ndarray, kind: str) -> tuple[tuple, np.ndarray]:
    """(core tuple, the float64 matrix the core actually holds)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    if kind == "F32":
        return (0, w.view(np.uint8).reshape(-1), rows, cols), w.astype(np.float64)
    if kind == "F16":
        h = w.astype(np.float16)
        return (1, h.view(np.uint8).reshape(-1), rows, cols), h.astype(np.float64)
    q = quants.quantize(w, GTYPE[kind])
    deq = quants.dequantize(q, GTYPE[kind]).reshape(rows, cols).astype(np.float64)
    return (int(GTYPE[kind]), np.ascontiguousarray(q).reshape(-1), rows, cols), deq


def silu(v):
    return v / (1.0 + np.exp(-v))


def route_reference(logits, top_k, scoring, norm, n_group, topk_group, rsf, bias):
    """HF's routing for one token: (chosen experts, their weights)."""
    E = logits.shape[0]
    if scoring == "softmax":
        s = np.exp(logits - logits.max())
        s /= s.sum()
        choice = s.copy()
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
        choice = s + (0.0 if bias is None else bias)
    if n_group > 1 and topk_group < n_group:
        groups = choice.reshape(n_group, E // n_group)
        gscore = np.sort(groups, axis=1)[:, ::-1][:, :2].sum(axis=1)
        keep = np.argsort(-gscore, kind="stable")[:topk_group]
        mask = np.full(n_group, -np.inf)
        mask[keep] = 0.0
        choice = (groups + mask[:, None]).reshape(E)
    sel = np.argsort(-choice, kind="stable")[:top_k]
    w = s[sel]
    if norm:
        w = w / (w.sum() + (1e-20 if scoring == "sigmoid" else 0.0))
    return sel, w * rsf


def moe_reference(
    x,
    router,
    gates,
    ups,
    downs,
    top_k,
    scoring="softmax",
    norm=False,
    n_group=1,
    topk_group=1,
    rsf=1.0,
    bias=None,
    shared=None,
    shared_gate_inp=None,
):
    """Per token, per chosen expert, in float64. Returns (out [T, d], counts [E])."""
    x = x.astype(np.float64)
    T, d = x.shape
    out = np.zeros((T, d))
    counts = np.zeros(len(gates), dtype=np.int64)
    for t in range(T):
        sel, w = route_reference(
            router @ x[t], top_k, scoring, norm, n_group, topk_group, rsf, bias
        )
        for e, we in zip(sel, w):
            counts[e] += 1
            out[t] += we * (downs[e] @ (silu(gates[e] @ x[t]) * (ups[e] @ x[t])))
        if shared is not None:
            sg, su, sd = shared
            y = sd @ (silu(sg @ x[t]) * (su @ x[t]))
            if shared_gate_inp is not None:
                y = y / (1.0 + np.exp(-(shared_gate_inp.astype(np.float64) @ x[t])))
            out[t] += y
    return out, counts


def make_layer(rng, E, d, ff, kind, shared_ff=0, router_gain=1.0):
    router = (rng.standard_normal((E, d)) * router_gain / np.sqrt(d)).astype(np.float32)
    layer = {"router": as_weight(router, "F32")}
    for name, shape in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff))):
        mats = [as_weight(rng.standard_normal(shape) / np.sqrt(shape[1]), kind) for _ in range(E)]
        layer[name] = mats
    if shared_ff:
        layer["shared"] = [
            as_weight(rng.standard_normal(s) / np.sqrt(s[1]), kind)
            for s in ((shared_ff, d), (shared_ff, d), (d, shared_ff))
        ]
    return layer


def layer_core_args(layer, top_k):
    """The positional weight arguments of kernels.moe_forward (and its CUDA twin) for a layer."""
    return (
        layer["router"][0],
        [g[0] for g in layer["gate"]],
        [u[0] for u in layer["up"]],
        [w[0] for w in layer["down"]],
        top_k,
    )


def layer_shared(layer, i):
    """The shared expert's core weights (i = 0) or float weights (i = 1), or None."""
    shared = layer.get("shared")
    return None if shared is None else tuple(s[i] for s in shared)


def layer_reference(layer, x, top_k, **routing):
    """moe_reference over the layer's float weights, for kernels.moe_forward-style kwargs."""
    return moe_reference(
        x,
        layer["router"][1],
        [g[1] for g in layer["gate"]],
        [u[1] for u in layer["up"]],
        [w[1] for w in layer["down"]],
        top_k,
        scoring=routing.get("scoring", "softmax"),
        norm=routing.get("norm_topk_prob", False),
        n_group=routing.get("n_group", 1),
        topk_group=routing.get("topk_group", 1),
        rsf=routing.get("routed_scaling_factor", 1.0),
        bias=routing.get("score_bias"),
        shared=layer_shared(layer, 1),
        shared_gate_inp=routing.get("shared_gate_inp"),
    )


def run_both(layer, x, top_k, activation_bits=16, **routing):
    out, counts = _core.kernels.moe_forward(
        x,
        *layer_core_args(layer, top_k),
        shared=layer_shared(layer, 0),
        activation_bits=activation_bits,
        n_threads=2,
        **routing,
    )
    ref, ref_counts = layer_reference(layer, x, top_k, **routing)
    return out, counts, ref, ref_counts


def rel_err(out, ref):
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(1, 40),
    E=st.integers(1, 12),
    k_frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["F32", "F16", "Q8_0", "Q4_0"]),
    d_blocks=st.integers(1, 4),
    ff_blocks=st.integers(1, 3),
    norm=st.booleans(),
    shared=st.sampled_from([None, "gated", "plain"]),
)
def test_softmax_dispatch_matches_reference(
    seed, T, E, k_frac, kind, d_blocks, ff_blocks, norm, shared
):
    rng = np.random.default_rng(seed)
    # Float weights take any width; block formats need multiples of 32. Odd widths for floats.
    d = 32 * d_blocks + (0 if kind in ("Q8_0", "Q4_0") else 5)
    ff = 32 * ff_blocks + (0 if kind in ("Q8_0", "Q4_0") else 3)
    top_k = 1 + int(k_frac * (E - 1))
    shared_ff = 64 if shared and kind in ("Q8_0", "Q4_0") else (37 if shared else 0)
    layer = make_layer(rng, E, d, ff, kind, shared_ff, router_gain=3.0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    routing = dict(norm_topk_prob=norm)
    if shared == "gated":
        routing["shared_gate_inp"] = (rng.standard_normal(d) / np.sqrt(d)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, top_k, **routing)
    np.testing.assert_array_equal(counts, ref_counts)
    assert counts.sum() == T * top_k
    err = rel_err(out, ref)
    assert err <= TOL[(kind, 16)], f"{kind} T={T} E={E} k={top_k}: {err:.2e}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(1, 24),
    groups=st.sampled_from([(8, 4, 2), (8, 2, 1), (12, 4, 3), (16, 8, 4), (6, 1, 1), (4, 4, 2)]),
    k=st.integers(1, 4),
    norm=st.booleans(),
    rsf=st.sampled_from([1.0, 2.5]),
    with_bias=st.booleans(),
    shared=st.booleans(),
)
def test_sigmoid_group_routing_matches_reference(seed, T, groups, k, norm, rsf, with_bias, shared):
    """DeepSeek-V3: sigmoid scores, the bias only for choosing, top topk_group groups by the sum
    of their two best, renormalised, times routed_scaling_factor; plain (ungated) shared expert."""
    E, n_group, topk_group = groups
    top_k = min(k, topk_group * (E // n_group))
    rng = np.random.default_rng(seed)
    d, ff = 64, 32
    layer = make_layer(rng, E, d, ff, "F32", 32 if shared else 0, router_gain=2.0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    routing = dict(
        scoring="sigmoid",
        norm_topk_prob=norm,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=rsf,
    )
    if with_bias:
        # Large enough to change the choice, which the reference then must agree with.
        routing["score_bias"] = (0.5 * rng.standard_normal(E)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, top_k, **routing)
    np.testing.assert_array_equal(counts, ref_counts)
    assert rel_err(out, ref) <= TOL[("F32", 16)]


def all_to_expert_2(rng, T, E, d, ff, kind, **layer_kwargs):
    """(layer, x) whose router row 2 is aligned with a constant input feature, so that every
    token picks expert 2 first."""
    layer = make_layer(rng, E, d, ff, kind, **layer_kwargs)
    router = (rng.standard_normal((E, d)) / np.sqrt(d)).astype(np.float32)
    router[2, 0] = 4.0
    layer["router"] = as_weight(router, "F32")
    x = rng.standard_normal((T, d)).astype(np.float32)
    x[:, 0] = 5.0
    return layer, x


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_all_tokens_to_one_expert(kind, top_k):
    """A router row aligned with a constant input feature sends every token to expert 2 (first
    choice); with top_k=1 the other experts get nothing."""
    T = 45
    layer, x = all_to_expert_2(np.random.default_rng(5), T, 6, 64, 96, kind)
    out, counts, ref, ref_counts = run_both(layer, x, top_k)
    np.testing.assert_array_equal(counts, ref_counts)
    assert counts[2] == T
    if top_k == 1:
        assert counts.sum() == counts[2]
    assert rel_err(out, ref) <= TOL[(kind, 16)]


@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_0"])
def test_many_tokens_per_expert(kind):
    """Prefill-sized step: 300 tokens over 8 experts, top-2 (~75 rows per expert, the 16-row
    chunking), and some experts much busier than others."""
    rng = np.random.default_rng(11)
    T, E, d, ff = 300, 8, 96, 64
    layer = make_layer(rng, E, d, ff, kind, shared_ff=32, router_gain=4.0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, 2, norm_topk_prob=True)
    np.testing.assert_array_equal(counts, ref_counts)
    assert rel_err(out, ref) <= TOL[(kind, 16)]


def test_8bit_activations_stay_close():
    rng = np.random.default_rng(3)
    layer = make_layer(rng, 8, 128, 64, "Q8_0")
    x = rng.standard_normal((17, 128)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(layer, x, 2, activation_bits=8)
    np.testing.assert_array_equal(counts, ref_counts)
    assert rel_err(out, ref) <= TOL_8BIT


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "F16"])
def test_prompt_chunk_rows_take_fp32_activations(kind):
    """With fp32_prompt_min_tokens=8 (the engine's default prompt-chunk rule) an MoE chunk of
    >= 8 * E / k rows (here 8 * 8 / 2 = 32: ~8 rows per expert) skips activation quantization in
    every product (router, experts, shared expert): even with activation_bits=8 the error is fp32
    summation only. A shorter chunk (31 rows) keeps the 8-bit rows, which the second check sees
    (so the rule really switches the path, at the documented length)."""
    rng = np.random.default_rng(21)
    layer = make_layer(rng, 8, 96, 64, kind, shared_ff=32)
    x = rng.standard_normal((32, 96)).astype(np.float32)
    out, counts, ref, ref_counts = run_both(
        layer, x, 2, activation_bits=8, fp32_prompt_min_tokens=8
    )
    np.testing.assert_array_equal(counts, ref_counts)
    assert rel_err(out, ref) <= 2e-6
    if kind != "F16":  # float weights always take fp32 activations
        out, _, ref, _ = run_both(layer, x[:31], 2, activation_bits=8, fp32_prompt_min_tokens=8)
        assert rel_err(out, ref) > 1e-4


def test_result_does_not_depend_on_threads_or_batch():
    """Each token's output is the same alone, in a batch, and with 1 or 2 threads (bitwise)."""
    rng = np.random.default_rng(8)
    layer = make_layer(rng, 8, 64, 64, "Q8_0", shared_ff=32)
    x = rng.standard_normal((20, 64)).astype(np.float32)
    args = (
        layer["router"][0],
        [g[0] for g in layer["gate"]],
        [u[0] for u in layer["up"]],
        [w[0] for w in layer["down"]],
        2,
    )
    shared = tuple(s[0] for s in layer["shared"])
    full2, _ = _core.kernels.moe_forward(x, *args, shared=shared, n_threads=2)
    full1, _ = _core.kernels.moe_forward(x, *args, shared=shared, n_threads=1)
    np.testing.assert_array_equal(full1, full2)
    for t in (0, 7, 19):
        alone, _ = _core.kernels.moe_forward(x[t : t + 1], *args, shared=shared, n_threads=2)
        np.testing.assert_array_equal(alone[0], full2[t])


def test_bad_expert_tensors_are_named():
    rng = np.random.default_rng(0)
    layer = make_layer(rng, 4, 64, 32, "F32")
    x = rng.standard_normal((3, 64)).astype(np.float32)
    gate = [g[0] for g in layer["gate"]]
    up = [u[0] for u in layer["up"]]
    down = [w[0] for w in layer["down"]]
    router = layer["router"][0]
    with pytest.raises(ModelFileError, match="ffn_up_exps holds 3 experts"):
        _core.kernels.moe_forward(x, router, gate, up[:3], down, 2)
    bad = list(down)
    bad[2] = layer["gate"][2][0]  # [ff, d] where [d, ff] belongs
    with pytest.raises(ModelFileError, match=r"ffn_down_exps\.2 has shape \[32, 64\]"):
        _core.kernels.moe_forward(x, router, gate, up, bad, 2)
    mixed = list(gate)
    mixed[1] = as_weight(rng.standard_normal((32, 64)), "Q8_0")[0]
    with pytest.raises(UnsupportedModelError, match=r"ffn_gate_exps\.1 has type Q8_0"):
        _core.kernels.moe_forward(x, router, mixed, up, down, 2)
    with pytest.raises(ModelFileError, match="top_k"):
        _core.kernels.moe_forward(x, router, gate, up, down, 5)
    with pytest.raises(ModelFileError, match="n_group"):
        _core.kernels.moe_forward(x, router, gate, up, down, 2, scoring="sigmoid", n_group=3)
    with pytest.raises(UnsupportedModelError, match="scoring"):
        _core.kernels.moe_forward(x, router, gate, up, down, 2, scoring="relu")
    with pytest.raises(InvalidRequestError, match="x must be"):
        _core.kernels.moe_forward(x[0], router, gate, up, down, 2)
    with pytest.raises(InvalidRequestError, match="fp32_prompt_min_tokens"):
        _core.kernels.moe_forward(x, router, gate, up, down, 2, fp32_prompt_min_tokens=-1)


def test_layer_reuses_scratch_across_sizes():
    """One MoELayer called at growing and shrinking token counts (scratch grown once, reused)
    gives what a fresh layer gives for each call."""
    rng = np.random.default_rng(21)
    layer = make_layer(rng, 8, 64, 64, "Q4_0", shared_ff=64)
    args = (
        layer["router"][0],
        [g[0] for g in layer["gate"]],
        [u[0] for u in layer["up"]],
        [w[0] for w in layer["down"]],
        3,
    )
    shared = tuple(s[0] for s in layer["shared"])
    held = _core.kernels.MoELayer(*args, shared=shared, n_threads=2)
    for T in (1, 33, 5, 70, 1):
        x = rng.standard_normal((T, 64)).astype(np.float32)
        out, counts = held.forward(x)
        fresh, fresh_counts = _core.kernels.moe_forward(x, *args, shared=shared, n_threads=2)
        np.testing.assert_array_equal(out, fresh)
        np.testing.assert_array_equal(counts, fresh_counts)
