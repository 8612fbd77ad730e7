"""Query-tiled chunk attention (attention_chunk.h) and K/V import against float64 numpy.

The kernel runs through ``_core.kernels.attention_chunk``, which builds the engine's work plan
(tiles x KV heads x key segments, merged by log-sum-exp) over a paged one-layer cache whose
unused slots hold NaN. The reference sees K/V rounded to the cache dtype, so one bound (the
paged-attention one from test_cpu_kernels.py) serves f32, f16 and bf16.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmengine import _core
from lmengine.errors import ContextLengthError, InvalidRequestError
from test_cpu_kernels import ATTENTION_ABS, round_kv, shuffled_pages

kernels = _core.kernels


def chunk_attention_ref(q, k, v, positions, window, scale):
    """q (n, H, D), k/v (L, Hkv, D) -> (n, H, D): query i over keys [lo, positions[i]]."""
    n, H, D = q.shape
    group = H // k.shape[1]
    out = np.zeros((n, H, D))
    for i, p in enumerate(positions):
        lo = 0 if not window else max(0, p - window + 1)
        for h in range(H):
            kk = k[lo : p + 1, h // group].astype(np.float64)
            vv = v[lo : p + 1, h // group].astype(np.float64)
            s = scale * (kk @ q[i, h].astype(np.float64))
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vv
    return out


def chunk_case(n, L, group, n_kv=1, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    q = (2.0 * rng.standard_normal((n, n_kv * group, head_dim))).astype(np.float32)
    k = rng.standard_normal((L, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((L, n_kv, head_dim)).astype(np.float32)
    return q, k, v, rng


def run_and_check(
    q,
    k,
    v,
    positions,
    *,
    page_size=16,
    kv_dtype="f32",
    window=0,
    segment_keys=2048,
    order=None,
    rng=None,
    scale=None,
    logit_rel=0.0,
):
    """Runs the kernel and checks it against the reference. logit_rel: extra error allowed per
    unit of the largest |logit| (fp32 rounds a logit of size s by ~s * U; the output moves by up
    to twice the logit error times max|v|)."""
    L = k.shape[0]
    n_pages = -(-L // page_size)
    if order is None:
        order = (
            shuffled_pages(n_pages, rng) if rng is not None else np.arange(n_pages, dtype=np.int32)
        )
    positions = np.asarray(positions, np.int32)
    out = kernels.attention_chunk(
        q,
        k,
        v,
        positions,
        page_size,
        kv_dtype,
        order,
        sliding_window=window,
        scale=scale,
        segment_keys=segment_keys,
    )
    if scale is None:
        scale = float(np.float32(1.0) / np.sqrt(np.float32(q.shape[-1])))
    kr, vr = round_kv(k, kv_dtype), round_kv(v, kv_dtype)
    ref = chunk_attention_ref(q, kr, vr, positions, window, scale)
    assert out.shape == q.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    err = np.abs(out - ref).max()
    logits = (
        max(
            np.abs(scale * (q[i].astype(np.float64) @ kr[: p + 1].reshape(-1, q.shape[-1]).T)).max()
            for i, p in enumerate(positions)
        )
        if logit_rel
        else 0.0
    )
    bound = (ATTENTION_ABS + 2 * logit_rel * logits) * np.abs(vr).max()
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g}"
    return out


@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 17, 33])
@pytest.mark.parametrize("ctx_before", [0, 15, 16, 17, 47])
def test_chunk_at_end_of_context(ctx_before, n, group, kv_dtype):
    """A chunk of n tokens appended after ctx_before cached ones (page boundaries ± 1)."""
    L = ctx_before + n
    q, k, v, rng = chunk_case(n, L, group, n_kv=2, seed=L * 100 + group)
    run_and_check(q, k, v, np.arange(ctx_before, L), kv_dtype=kv_dtype, rng=rng)


@pytest.mark.parametrize("window", [1, 13, 40])
@pytest.mark.parametrize("n", [1, 17, 33])
def test_sliding_window(window, n):
    q, k, v, rng = chunk_case(n, 70 + n, 3, seed=window + n)
    run_and_check(q, k, v, np.arange(70, 70 + n), window=window, rng=rng, kv_dtype="f16")


@pytest.mark.parametrize("segment_keys", [1, 16, 48, 100])
@pytest.mark.parametrize("window", [0, 90])
def test_key_segments_merge(segment_keys, window):
    """Tiles split into key segments (merged by log-sum-exp) equal the reference, and the
    segmentation changes the result only at rounding level."""
    n, L = 33, 300
    q, k, v, rng = chunk_case(n, L, 3, n_kv=2, head_dim=128, seed=segment_keys)
    pos = np.arange(L - n, L)
    order = shuffled_pages(-(-L // 16), rng)
    split = run_and_check(q, k, v, pos, window=window, segment_keys=segment_keys, order=order)
    whole = run_and_check(q, k, v, pos, window=window, segment_keys=1 << 30, order=order)
    np.testing.assert_allclose(split, whole, rtol=0, atol=ATTENTION_ABS * np.abs(v).max())


@pytest.mark.parametrize("page_size", [1, 5, 8, 32])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_other_page_sizes_and_head_dims(page_size, head_dim):
    """Page sizes other than 16 and head_dim % 16 != 0 take the generic loops."""
    q, k, v, rng = chunk_case(19, 57, 3, head_dim=head_dim, seed=page_size)
    run_and_check(q, k, v, np.arange(38, 57), page_size=page_size, rng=rng, segment_keys=20)


def test_positions_need_not_be_the_tail():
    """Queries anywhere in the cache (as a ReSA rectification chunk re-run at earlier positions)
    see exactly their causal prefix, never later keys."""
    q, k, v, rng = chunk_case(20, 100, 4, seed=3)
    run_and_check(q, k, v, np.arange(50, 70), rng=rng)
    run_and_check(q, k, v, np.arange(50, 70), rng=rng, segment_keys=16)


@pytest.mark.parametrize("kv_dtype", ["f16", "bf16"])
def test_rectification_chunk_across_page_groups(kv_dtype):
    """A 33-token chunk (one 99-row tile) at the end of 1100 keys (3 pool page groups of 32
    pages), pages shuffled, as one tile and split into key segments."""
    q, k, v, rng = chunk_case(33, 1100, 3, n_kv=2, seed=9)
    positions = np.arange(1100 - 33, 1100)
    run_and_check(q, k, v, positions, kv_dtype=kv_dtype, rng=rng)
    run_and_check(q, k, v, positions, kv_dtype=kv_dtype, rng=rng, segment_keys=160)


def test_matches_single_token_kernel():
    """Each token of a chunk equals the decode kernel (kernels.attention_paged) for that token
    alone (to rounding)."""
    q, k, v, rng = chunk_case(17, 64, 3, seed=5)
    out = kernels.attention_chunk(
        q, k, v, np.arange(47, 64, dtype=np.int32), 16, "f32", shuffled_pages(4, rng)
    )
    for i, p in enumerate(range(47, 64)):
        n_pages = -(-(p + 1) // 16)
        one = kernels.attention_paged(
            np.ascontiguousarray(q[i]),
            np.ascontiguousarray(k[: p + 1, 0]),
            np.ascontiguousarray(v[: p + 1, 0]),
            0,
            16,
            "f32",
            np.arange(n_pages, dtype=np.int32),
        )
        np.testing.assert_allclose(out[i], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_rows_do_not_depend_on_their_tile(window, kv_dtype):
    """Unsegmented, a token's output is bit-identical however its chunk is cut into tiles (a
    prompt chunked differently, or sharing a step, gives the same attention)."""
    q, k, v, rng = chunk_case(45, 150, 3, n_kv=2, seed=21)
    pos = np.arange(105, 150, dtype=np.int32)
    order = shuffled_pages(10, rng)

    def run(lo, hi):
        return kernels.attention_chunk(
            np.ascontiguousarray(q[lo:hi]),
            k,
            v,
            pos[lo:hi],
            16,
            kv_dtype,
            order,
            sliding_window=window,
            segment_keys=1 << 30,
        )

    whole = run(0, 45)
    for cut in (1, 7, 16, 29):
        np.testing.assert_array_equal(np.concatenate([run(0, cut), run(cut, 45)]), whole)


def test_peaked_softmax_and_page_order():
    """A large scale makes the softmax nearly one-hot (logits ~1000): the running max must keep
    it finite, and the error is that of rounding the logits (the single-token kernel's too)."""
    q, k, v, rng = chunk_case(17, 49, 3, seed=9)
    pos = np.arange(32, 49)
    for scale in [0.01, 1.0, 30.0]:
        run_and_check(q, k, v, pos, scale=scale, logit_rel=8 * 2.0**-24)
    ident = kernels.attention_chunk(
        q, k, v, pos.astype(np.int32), 16, "bf16", np.arange(4, dtype=np.int32)
    )
    shuf = kernels.attention_chunk(
        q, k, v, pos.astype(np.int32), 16, "bf16", shuffled_pages(4, rng)
    )
    np.testing.assert_array_equal(ident, shuf)


def test_bad_arguments_raise():
    q, k, v, _ = chunk_case(3, 20, 2)
    good = dict(
        positions=np.arange(17, 20, dtype=np.int32),
        page_size=16,
        kv_dtype="f32",
        page_order=np.arange(2, dtype=np.int32),
    )
    cases = [
        (dict(positions=np.array([17, 18, 20], np.int32)), "positions"),
        (dict(positions=np.array([17, 18], np.int32)), "positions"),
        (dict(page_order=np.array([0, 0], np.int32)), "permutation"),
        (dict(kv_dtype="fp8"), "kv_dtype"),
        (dict(page_size=0), "page_size"),
    ]
    for change, word in cases:
        with pytest.raises(ValueError, match=word):
            kernels.attention_chunk(q, k, v, **{**good, **change})
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention_chunk(q[:, :1].copy(), k.repeat(2, axis=1), v.repeat(2, axis=1), **good)


# ---- through the engine -------------------------------------------------------------------------


def test_segmented_chunk_in_the_engine_matches_decode(tmp_path):
    """A 32-token chunk at 2.1K context (2 tiles: split into key segments and merged) gives the
    logits of feeding the same tokens one at a time through the decode kernel."""
    hc = pytest.importorskip("hf_convert")
    import torch

    from lmengine import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = hc.save_hf_dir(hc.build_hf_model("llama"), tmp_path / "llama")
    finally:
        torch.set_num_threads(threads)
    llm = LLM(path, n_threads=2, kv_cache_tokens=2 * 2112, max_context=2112)
    ids = np.random.default_rng(0).integers(0, 301, 2100).astype(np.int32)
    eng = llm._engine
    chunked, stepped = eng.seq_create(), eng.seq_create()
    try:
        for i in range(0, 2068, 512):
            part = ids[i : min(i + 512, 2068)]
            eng.step([chunked, stepped], [part, part], [False, False])
        out_chunk = eng.step([chunked], [ids[2068:]], [True])
        out_step = np.concatenate(
            [eng.step([stepped], [ids[i : i + 1]], [True]) for i in range(2068, 2100)]
        )
    finally:
        eng.seq_free(chunked)
        eng.seq_free(stepped)
    span = out_step.max() - out_step.min()
    assert np.abs(out_chunk - out_step).max() <= 1e-4 * span


def test_kv_import_round_trip_and_transfer(smollm2, english_text):
    """K/V read from a prefilled sequence and imported into a fresh one give bit-identical decode
    logits (a KV transfer); written rows read back exactly (fp32 cache)."""
    eng = smollm2._engine
    spec = smollm2.spec
    ids = np.asarray(smollm2.tokenizer.encode(english_text)[:41], np.int32)
    src, dst = eng.seq_create(), eng.seq_create()
    try:
        eng.step([src], [ids[:40]], [False])
        kv = [eng.seq_read_kv(src, layer, 0, 40) for layer in range(spec.n_layers)]
        k = np.stack([a for a, _ in kv])
        v = np.stack([b for _, b in kv])
        assert k.shape == (spec.n_layers, 40, spec.n_kv_heads, spec.head_dim)
        eng.seq_write_kv(dst, 0, k[:, :17], v[:, :17])  # 17 then 23: crosses a page boundary
        eng.seq_write_kv(dst, 17, k[:, 17:], v[:, 17:])
        assert eng.seq_length(dst) == 40
        a = eng.step([src], [ids[40:41]], [True])
        b = eng.step([dst], [ids[40:41]], [True])
        np.testing.assert_array_equal(a, b)

        rng = np.random.default_rng(1)
        new_k = rng.standard_normal((5, spec.n_kv_heads, spec.head_dim)).astype(np.float32)
        new_v = rng.standard_normal((5, spec.n_kv_heads, spec.head_dim)).astype(np.float32)
        eng.seq_write_kv(dst, 14, new_k, new_v, layer=3)  # one layer, inside the length
        rk, rv = eng.seq_read_kv(dst, 3, 14, 5)
        np.testing.assert_array_equal(rk, new_k)
        np.testing.assert_array_equal(rv, new_v)
        ok, ov = eng.seq_read_kv(dst, 2, 14, 5)  # other layers untouched
        np.testing.assert_array_equal(ok, k[2, 14:19])
        np.testing.assert_array_equal(ov, v[2, 14:19])
    finally:
        eng.seq_free(src)
        eng.seq_free(dst)


def test_kv_import_errors(smollm2):
    eng = smollm2._engine
    spec = smollm2.spec
    L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
    k = np.zeros((L, 4, H, D), np.float32)
    seq = eng.seq_create()
    try:
        cases = [
            (lambda: eng.seq_write_kv(seq, 1, k, k), "gap"),
            (lambda: eng.seq_write_kv(seq + 1000, 0, k, k), "unknown sequence"),
            (lambda: eng.seq_write_kv(seq, 0, k.astype(np.float64), k), "float32"),
            (lambda: eng.seq_write_kv(seq, 0, k[:, :, :1].copy(), k[:, :, :1].copy()), "shape"),
            (lambda: eng.seq_write_kv(seq, 0, k, k[:, :3].copy()), "shape"),
            (lambda: eng.seq_write_kv(seq, 0, k[0], k[0], layer=0), "every layer"),
            (lambda: eng.seq_write_kv(seq, 0, k[0], k[0], layer=L), "out of range"),
            (lambda: eng.seq_write_kv(seq, 0, k[0], k[0]), "4-D"),
            (lambda: eng.seq_read_kv(seq, 0, 0, 1), "range"),
        ]
        for call, word in cases:
            with pytest.raises(InvalidRequestError, match=word):
                call()
        too_long = np.zeros((L, 1, H, D), np.float32)
        with pytest.raises(ContextLengthError):
            eng.seq_write_kv(seq, smollm2.max_context, too_long, too_long)
        assert eng.seq_length(seq) == 0
    finally:
        eng.seq_free(seq)
