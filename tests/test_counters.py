"""Per-pass work counters of the core against hand-computed FLOPs and bytes.

The tiny model below is small enough to count by hand: 2 layers, d_model 64, 4 query heads and 2
KV heads of 16, FFN 96, vocab 128, tied embeddings. Q, K, V, O and down are Q8_0 (34 bytes per
32 weights), gate and up F32, so the dtype split is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmengine import _core
from lmengine.errors import InvalidRequestError

Q8_0, F32 = 8, 0
L, D, H, KVH, HD, FF, V = 2, 64, 4, 2, 16, 96, 128


def q8_0_rows(rows: int, cols: int, rng) -> np.ndarray:
    """Valid Q8_0 rows: fp16 scale 2**-7 then 32 int8 per block."""
    blocks = np.zeros((rows, cols // 32, 34), dtype=np.uint8)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(2**-7).tobytes(), dtype=np.uint8)
    blocks[:, :, 2:] = rng.integers(0, 256, size=(rows, cols // 32, 32), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def tiny_engine(sliding_window: int = 0, kv_dtype: str = "f32", layer_windows=None):
    rng = np.random.default_rng(0)

    def f32(rows, cols):
        return (F32, (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32), rows, cols)

    def q8(rows, cols):
        return (Q8_0, q8_0_rows(rows, cols, rng), rows, cols)

    tensors = {"token_embd": f32(V, D), "output_norm": (F32, np.ones((1, D), np.float32), 1, D)}
    for layer in range(L):
        p = f"blk.{layer}."
        tensors.update(
            {
                p + "attn_norm": (F32, np.ones((1, D), np.float32), 1, D),
                p + "ffn_norm": (F32, np.ones((1, D), np.float32), 1, D),
                p + "attn_q": q8(H * HD, D),
                p + "attn_k": q8(KVH * HD, D),
                p + "attn_v": q8(KVH * HD, D),
                p + "attn_output": q8(D, H * HD),
                p + "ffn_gate": f32(FF, D),
                p + "ffn_up": f32(FF, D),
                p + "ffn_down": q8(D, FF),
            }
        )
    config = {
        "n_layers": L, "d_model": D, "n_heads": H, "n_kv_heads": KVH, "head_dim": HD, "d_ff": FF,
        "vocab_size": V, "max_context": 256, "rms_eps": 1e-5, "rope_interleaved": False,
        "rope_inv_freq": [10000 ** (-2 * i / HD) for i in range(HD // 2)],
        "sliding_window": sliding_window, "layer_sliding_window": layer_windows or [],
    }  # fmt: skip
    return _core.Engine(config, tensors, kv_pages=8, page_size=16, kv_dtype=kv_dtype, n_threads=2)


# Hand counts for the tiny model (Q8_0 rows: 64 cols = 2 blocks = 68 B, 96 cols = 102 B).
ATTN_BYTES = L * (64 * 68 + 32 * 68 + 32 * 68 + 64 * 68)  # wq, wk, wv, wo = 26112
FFN_BYTES = L * (96 * 64 * 4 * 2 + 64 * 102)  # gate + up F32, down Q8_0 = 111360
NORM_BYTES = (2 * L + 1) * D * 4  # 1280
HEAD_BYTES = V * D * 4  # tied to the F32 embedding: 32768
EMBED_ROW = D * 4
ATTN_PROJ_FLOPS_PER_TOKEN = 2 * L * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)  # 49152
FFN_FLOPS_PER_TOKEN = 2 * L * 3 * 64 * 96  # 73728
KV_ROW = L * KVH * HD * 4  # one K (or V) vector over layers and heads, f32: 256 B

# Two passes: A prefills 20 tokens and B 5 (positions 0..19 and 0..4), then each decodes one
# token (positions 20 and 5). Keys attended and K slots read (whole 16-slot pages):
#   full context: pass 1 keys = (1 + ... + 20) + (1 + ... + 5) = 225, unique 25;
#                 K slots: A 16 x 16 + 4 x 32 = 384, B 5 x 16 = 80 -> 464
#                 pass 2 keys = 21 + 6 = 27, unique 27, K slots 32 + 16 = 48
#   window 8:     pass 1 keys = (1+..+8 + 12 x 8) + 15 = 147, unique 25, K slots 464
#                 pass 2 keys = 8 + 6 = 14 (A at 20 sees 13..20: pages 0 and 1), K slots 48
EXPECTED_ATTENTION = {
    0: [(225, 25, 464), (27, 27, 48)],
    8: [(147, 25, 464), (14, 14, 48)],
}


@pytest.mark.parametrize("window", [0, 8])
def test_dense_counts_match_hand_values(window):
    engine = tiny_engine(sliding_window=window)
    a, b = engine.seq_create(), engine.seq_create()
    ids = np.arange(1, 21, dtype=np.int32)
    engine.step([a, b], [ids, ids[:5]], [False, False])
    engine.step([a, b], [ids[:1], ids[:1]], [False, True])
    out = engine.counters()
    recs = out["records"]
    assert out["dropped"] == 0 and [r["index"] for r in recs] == [0, 1]
    assert [r["mode"] for r in recs] == ["prefill", "decode"]
    for r, tokens, (keys, unique, k_slots) in zip(recs, (25, 2), EXPECTED_ATTENTION[window]):
        assert r["n_sequences"] == 2 and r["n_tokens"] == tokens and r["n_output_rows"] == 2
        assert r["context_attended"] == keys and r["context_unique"] == unique
        assert r["kv_bytes_read"] == KV_ROW * (k_slots + keys)
        assert r["kv_bytes_unique"] == 2 * KV_ROW * unique
        assert r["kv_bytes_written"] == 2 * KV_ROW * tokens
        assert r["flops_attn_scores"] == 4 * L * H * HD * keys
        assert r["flops_attn_proj"] == tokens * ATTN_PROJ_FLOPS_PER_TOKEN
        assert r["flops_dense_ffn"] == tokens * FFN_FLOPS_PER_TOKEN
        assert r["flops_lm_head"] == 2 * 2 * V * D  # two output rows
        assert r["flops_norm"] == tokens * 4 * 2 * L * D + 2 * 4 * D
        assert r["weight_bytes_attn"] == ATTN_BYTES
        assert r["weight_bytes_dense_ffn"] == FFN_BYTES
        assert r["weight_bytes_norm"] == NORM_BYTES
        assert r["weight_bytes_lm_head"] == HEAD_BYTES
        assert r["weight_bytes_embed"] == tokens * EMBED_ROW
        assert (
            r["weight_bytes_dtype_q8_0"]
            == L * (4 * 68 * 48 + 64 * 102)
            == ATTN_BYTES + L * 64 * 102
        )
        assert (
            r["weight_bytes_dtype_f32"]
            == L * 2 * 96 * 64 * 4 + NORM_BYTES + HEAD_BYTES + tokens * EMBED_ROW
        )
        for term in ("router", "experts", "shared_experts"):
            assert r[f"flops_{term}"] == 0 and r[f"weight_bytes_{term}"] == 0
        assert r["moe_layers"] == 0 and r["seconds"] > 0
    assert recs[1]["t_end"] >= recs[0]["t_end"]
    engine.reset_counters()
    assert engine.counters()["records"] == []


def test_per_layer_windows_count_each_layer_with_its_own_window():
    # Gemma-style: layer 0 windowed (8), layer 1 global; the pass-1 figures above, per layer.
    engine = tiny_engine(layer_windows=[8, 0])
    a, b = engine.seq_create(), engine.seq_create()
    ids = np.arange(1, 21, dtype=np.int32)
    engine.step([a, b], [ids, ids[:5]], [False, False])
    r = engine.counters()["records"][0]
    (keys_w, unique, slots), (keys_full, _, _) = EXPECTED_ATTENTION[8][0], EXPECTED_ATTENTION[0][0]
    per_layer_row = KV_ROW // L
    assert r["kv_bytes_read"] == per_layer_row * (slots + keys_w + slots + keys_full)
    assert r["flops_attn_scores"] == 4 * H * HD * (keys_w + keys_full)
    assert r["context_attended"] == (keys_w + keys_full) // L
    assert r["kv_bytes_unique"] == 2 * KV_ROW * unique
    assert r["kv_bytes_written"] == 2 * KV_ROW * 25


def test_kv_bytes_follow_the_cache_dtype():
    engine = tiny_engine(kv_dtype="f16")
    s = engine.seq_create()
    engine.step([s], [np.arange(1, 4, dtype=np.int32)], [False])
    r = engine.counters()["records"][0]
    assert r["kv_bytes_written"] == 2 * (KV_ROW // 2) * 3
    assert r["kv_bytes_unique"] == 2 * (KV_ROW // 2) * 3


def test_dense_attention_formula_matches_the_engine():
    t = _core.counters.dense_attention_terms(
        [(0, 20), (0, 5)], n_layers=L, n_heads=H, n_kv_heads=KVH, head_dim=HD, page_size=16,
        kv_elem_bytes=4, sliding_window=8,
    )  # fmt: skip
    assert (t["context_attended"], t["context_unique"]) == (147, 25)
    assert t["kv_bytes_read"] == KV_ROW * (464 + 147)


def test_ring_buffer_keeps_the_newest_passes():
    engine = tiny_engine()
    s = engine.seq_create()
    engine.step([s], [np.array([1], np.int32)], [False])
    assert engine.counters()["records"][0]["mode"] == "prefill"  # position 0: no context yet
    for _ in range(3):
        engine.step([s], [np.array([2], np.int32)], [False])
    recs = engine.counters()["records"]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert [r["mode"] for r in recs[1:]] == ["decode"] * 3


def test_moe_layer_terms_hand_values():
    # 4 experts, top-2 over 4 tokens: hits [3, 0, 5, 0] -> 2 distinct experts, 8 (token, slot)s.
    # Expert: SwiGLU 3 x d 8 x ff 16 = 384 params; router 8 x 4 = 32; shared expert 384.
    t = _core.counters.moe_layer_terms(
        [3, 0, 5, 0], n_tokens=4, top_k=2, d_model=8, expert_params=384,
        expert_bytes={"q8_0": 408}, router_params=32, router_bytes={"f32": 128},
        shared_params=384, shared_bytes={"f16": 768},
    )  # fmt: skip
    assert t["experts_active"] == 2
    assert t["flops_experts"] == 2 * 8 * 384
    assert t["flops_router"] == 2 * 4 * 32
    assert t["flops_shared_experts"] == 2 * 4 * 384
    assert t["weight_bytes_experts"] == 2 * 408
    assert t["weight_bytes_router"] == 128 and t["weight_bytes_shared_experts"] == 768
    assert (
        t["weight_bytes_dtype_q8_0"],
        t["weight_bytes_dtype_f32"],
        t["weight_bytes_dtype_f16"],
    ) == (
        816,
        128,
        768,
    )
    assert t["flops_dense_ffn"] == 0 and t["flops_attn_proj"] == 0
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        _core.counters.moe_layer_terms([1], 1, 1, 8, 1, {"q9": 1}, 1, {})


def test_block_sparse_attention_terms_hand_values():
    # 2 layers, 4 query heads over 2 KV heads (group 2), head_dim 16, pages of 16, f16 KV.
    # Selected blocks (over query tokens x KV heads): 10 and 6; 20 summaries of 64 B per layer.
    t = _core.counters.block_sparse_attention_terms(
        3, [10, 6], [20, 20], 64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        page_size=16, kv_elem_bytes=2,
    )  # fmt: skip
    block = 2 * 16 * 16 * 2  # K and V of one block
    assert t["kv_bytes_read"] == 16 * block + 40 * 64
    assert t["flops_attn_scores"] == 16 * 16 * 4 * 16 * 2 + 40 * 2 * 16 * 2
    assert t["context_attended"] == 16 * 16 // (2 * 2)
    assert t["kv_bytes_written"] == 2 * 3 * 2 * 2 * 16 * 2
    assert t["attention_blocks_selected"] == 16
    with pytest.raises(InvalidRequestError, match="one entry per layer"):
        _core.counters.block_sparse_attention_terms(3, [1], [1], 64, 2, 4, 2, 16, 16, 2)
