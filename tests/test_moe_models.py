"""Mixture-of-Experts models: lmengine logits against Hugging Face transformers.

Tiny random-weight models of each MoE family are built from configs here (hidden 96, 6 heads of
16, 2 KV heads, vocab 301, 8 experts of width 64), saved as safetensors directories, and loaded
through ``LLM`` like any checkpoint:

* mixtral    softmax top-2, renormalised
* qwen2_moe  softmax top-3 without renormalisation, a shared expert gated by sigmoid(w . x),
             QKV biases, and layer 1 dense (``mlp_only_layers``) with its own width 160
* qwen3_moe  softmax top-3 renormalised, RMSNorm of each q/k head
* olmoe      softmax top-2 without renormalisation, RMSNorm over the whole q/k projections

DeepSeek-V3 routing on a standard attention block: HF's DeepseekV3 model uses MLA attention, which
the core does not run, so the reference is an HF ``LlamaForCausalLM`` whose MLP in layers >= 1 is
replaced by HF's own ``DeepseekV3MoE`` module (sigmoid scores, selection-only bias, group-limited
top-k, renormalisation, routed_scaling_factor, one ungated shared expert), layer 0 staying dense
(first_k_dense_replace = 1). Its state dict is saved with the fused 3-D expert tensors transformers
keeps in memory, which exercises the loader's fused-expert path, and run through ``_core.Engine``.

Reference: the HF model in fp32 with eager attention; error = max |engine - HF| / (HF logit range).
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from safetensors.numpy import save_file
from transformers import (
    DeepseekV3Config,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

import hf_convert as hc
from lmengine import LLM, _core
from lmengine.errors import ModelFileError, UnsupportedModelError
from lmengine.models.loader import _read_safetensors_file, load_checkpoint
from lmengine.models.moe import MoESpec
from lmengine.models.spec import ModelSpec

# ---------------------------------------------------------------------------------------------
# Tolerance: fp32 weights and fp32 activations, so only summation order separates engine and HF
# (as in test_model_parity.py); the routing itself is a float comparison the two agree on unless a
# token's k-th and (k+1)-th scores are within ~1e-7, which random weights do not produce here.
LOGIT_TOL = 1e-4
# ---------------------------------------------------------------------------------------------

SIZES = dict(
    vocab_size=301,
    hidden_size=96,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=hc.EOS_TOKEN_ID,
    eos_token_id=hc.EOS_TOKEN_ID,
    rms_norm_eps=1e-5,
)
KINDS = {
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(num_hidden_layers=2, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            num_hidden_layers=3,
            intermediate_size=160,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            num_hidden_layers=2,
            head_dim=16,
            intermediate_size=160,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
    ),
    "olmoe": (
        OlmoeConfig,
        OlmoeForCausalLM,
        dict(num_hidden_layers=2, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    ),
}
HF_KINDS = tuple(KINDS)
# kind -> (top_k, which layers are MoE)
ROUTING = {
    "mixtral": (2, [True, True]),
    "qwen2_moe": (3, [True, False, True]),
    "qwen3_moe": (3, [True, True]),
    "olmoe": (2, [True, True]),
    "deepseek": (3, [False, True, True]),
}
LENGTHS = (1, 17, 45)
DECODE_SPLITS = ((17, 0), (45, 16))
N_THREADS = 2


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(1000 * n + seed).integers(0, 301, n).astype(np.int32)


def randomize(model, seed: int) -> None:
    """hf_convert's scheme: unit-scale projections (N(0, 1/fan_in), fan_in = last axis, which
    also holds for the 3-D expert tensors), norms 1 + 0.2 N, biases 0.5 N, embedding N(0, 1),
    head gain 2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            elif name == "model.embed_tokens.weight":
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(2.0 * noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def build(kind: str, seed: int = 0):
    config_cls, model_cls, fields = KINDS[kind]
    config = config_cls(**SIZES, **fields, attn_implementation="eager", dtype="float32")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    return model


DS_FIRST_DENSE = 1


def build_deepseek_hybrid(seed: int = 0):
    """Llama attention blocks; layers >= DS_FIRST_DENSE use HF's DeepseekV3MoE."""
    llama_cfg = LlamaConfig(
        **SIZES,
        num_hidden_layers=3,
        intermediate_size=160,
        head_dim=16,
        attn_implementation="eager",
        dtype="float32",
    )
    ds_cfg = DeepseekV3Config(
        hidden_size=96,
        intermediate_size=160,
        moe_intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_cfg).eval()
    for layer in model.model.layers[DS_FIRST_DENSE:]:
        layer.mlp = DeepseekV3MoE(ds_cfg).eval()
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers[DS_FIRST_DENSE:]:
            # A bias the size of the score spread, so it changes choices.
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.3 * torch.randn(bias.shape, generator=gen))
    moe = MoESpec(
        n_experts=8,
        top_k=3,
        d_ff_expert=64,
        moe_layers=[layer >= DS_FIRST_DENSE for layer in range(3)],
        scoring="sigmoid",
        norm_topk_prob=True,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        d_ff_shared=64,
    )
    return model, llama_cfg, moe


class Zoo:
    def __init__(self, root):
        self.root = root
        self._models, self._llms, self._refs, self._engines = {}, {}, {}, {}

    def hf(self, kind):
        if kind not in self._models:
            self._models[kind] = build_deepseek_hybrid() if kind == "deepseek" else (build(kind),)
        return self._models[kind][0]

    def path(self, kind):
        d = self.root / kind
        if kind == "deepseek":
            if not d.exists():
                d.mkdir()
                state = {
                    k: v.detach().numpy().copy() for k, v in self.hf(kind).state_dict().items()
                }
                save_file(state, str(d / "model.safetensors"))
            return d
        if not d.exists():
            hc.save_hf_dir(self.hf(kind), d)
        return d

    def llm(self, kind) -> LLM:
        if kind not in self._llms:
            self._llms[kind] = LLM(self.path(kind), n_threads=N_THREADS, kv_cache_tokens=1024)
        return self._llms[kind]

    def engine(self, kind):
        """A fresh _core.Engine of the model (the DeepSeek hybrid has no config.json)."""
        if kind != "deepseek":
            ckpt = load_checkpoint(self.path(kind))
            return _core.Engine(
                ckpt.spec.core_config(), ckpt.tensors, kv_pages=32, n_threads=N_THREADS
            )
        self.hf(kind)
        _, llama_cfg, moe = self._models[kind]
        tensors, types = {}, {}
        spec = ModelSpec.from_hf_config(llama_cfg.to_dict())
        spec.moe = moe
        _read_safetensors_file(self.path(kind) / "model.safetensors", tensors, types, spec)
        return _core.Engine(spec.core_config(), tensors, kv_pages=32, n_threads=N_THREADS)

    def reference(self, kind, ids):
        key = (kind, ids.tobytes())
        if key not in self._refs:
            self._refs[key] = hc.hf_logits(self.hf(kind), ids)
        return self._refs[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Zoo(tmp_path_factory.mktemp("moe_models"))
    torch.set_num_threads(threads)


def relative_error(out, ref) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / (ref.max() - ref.min()))


def engine_logits(engine, ids: np.ndarray, prefill: int) -> np.ndarray:
    """LLM.logits on a bare engine: `prefill` tokens in one step, then one token per step."""
    seq = engine.seq_create()
    parts = []
    try:
        if prefill:
            parts.append(engine.step([seq], [ids[:prefill]], [True]))
        for i in range(prefill, len(ids)):
            parts.append(engine.step([seq], [ids[i : i + 1]], [True]))
    finally:
        engine.seq_free(seq)
    return np.concatenate(parts)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", HF_KINDS)
def test_prefill_logits_match_hf(zoo, kind, n):
    ids = token_ids(n)
    err = relative_error(zoo.llm(kind).logits(ids), zoo.reference(kind, ids))
    assert err <= LOGIT_TOL, f"{kind} n={n}: max error {err:.2e} x range"


@pytest.mark.parametrize("n, prefill", DECODE_SPLITS)
@pytest.mark.parametrize("kind", HF_KINDS)
def test_decode_logits_match_hf(zoo, kind, n, prefill):
    ids = token_ids(n)
    err = relative_error(zoo.llm(kind).logits(ids, prefill=prefill), zoo.reference(kind, ids))
    assert err <= LOGIT_TOL, f"{kind} n={n} prefill={prefill}: max error {err:.2e} x range"


@pytest.mark.parametrize("n, prefill", [(17, 17), (45, 45), (45, 16)])
def test_deepseek_routing_block_matches_hf(zoo, n, prefill):
    ids = token_ids(n)
    err = relative_error(
        engine_logits(zoo.engine("deepseek"), ids, prefill), zoo.reference("deepseek", ids)
    )
    assert err <= LOGIT_TOL, f"deepseek n={n} prefill={prefill}: max error {err:.2e} x range"


@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe", "deepseek"])
def test_mixed_length_batch_matches_hf(zoo, kind):
    """Three sequences share each step at their own positions and chunk sizes, so experts see
    tokens of several sequences at once; each row must still equal HF's."""
    engine = zoo.engine(kind)
    seqs = [token_ids(18, seed=1), token_ids(17, seed=2), token_ids(45, seed=3)]
    refs = [zoo.reference(kind, ids) for ids in seqs]
    sids = [engine.seq_create() for _ in seqs]
    cuts = [(0, 17, 18), (0, 1, 17), (0, 30, 45)]
    rows1 = engine.step(sids, [s[c[0] : c[1]] for s, c in zip(seqs, cuts)], [True] * 3)
    rows2 = engine.step(sids, [s[c[1] : c[2]] for s, c in zip(seqs, cuts)], [True] * 3)
    at1 = at2 = 0
    for ref, c in zip(refs, cuts):
        got = np.concatenate([rows1[at1 : at1 + c[1]], rows2[at2 : at2 + c[2] - c[1]]])
        at1 += c[1]
        at2 += c[2] - c[1]
        err = relative_error(got, ref[: c[2]])
        assert err <= LOGIT_TOL, f"{kind}: max error {err:.2e} x range"
    # The last step ran 1 + 16 + 15 tokens: each MoE layer routed top_k pairs per token.
    top_k, moe_layers = ROUTING[kind]
    counts = engine.expert_counts(last=True)
    assert counts.sum(axis=1).tolist() == [32 * top_k if m else 0 for m in moe_layers]


def test_moe_changes_logits(zoo):
    """Negative control: renormalising Qwen2-MoE's top-k weights (which it does not do) or dropping
    its shared-expert gate moves HF's logits by far more than LOGIT_TOL."""
    ids = token_ids(17)
    ref = zoo.reference("qwen2_moe", ids)
    state = zoo.hf("qwen2_moe").state_dict()
    config_cls, model_cls, fields = KINDS["qwen2_moe"]
    changed = model_cls(
        config_cls(**SIZES, **{**fields, "norm_topk_prob": True}, attn_implementation="eager")
    ).eval()
    changed.load_state_dict(state)
    assert relative_error(hc.hf_logits(changed, ids), ref) > 100 * LOGIT_TOL


def test_expert_stats(zoo):
    llm = zoo.llm("qwen2_moe")
    llm.expert_stats(reset=True)
    ids = token_ids(45)
    llm.logits(ids, prefill=40)
    records = llm.expert_stats()
    moe_layers = [0, 2]  # layer 1 is dense (mlp_only_layers)
    assert {r["layer"] for r in records} == set(moe_layers)
    assert len(records) == len(moe_layers) * 8
    for layer in moe_layers:
        assert sum(r["tokens"] for r in records if r["layer"] == layer) == 45 * 3
    # Last pass: one decode token, 3 experts per MoE layer.
    active = llm._engine.experts_active()
    assert active.tolist() == [3, 0, 3]
    assert llm._engine.expert_counts(last=True).sum() == 2 * 3
    llm.expert_stats(reset=True)
    assert all(r["tokens"] == 0 for r in llm.expert_stats())
    import pandas as pd

    frame = pd.DataFrame(records)
    assert list(frame.columns) == ["layer", "expert", "tokens"]


def test_counters_count_the_experts_each_pass_hit(zoo):
    """S-MBU / S-MFU inputs of an MoE pass: E_act from the pass's own histogram, top_k expert
    products per token, the router and the gated shared expert (qwen2_moe: 8 experts of
    3 x 96 x 64, top 3, shared 3 x 96 x 96 + gate 96, two MoE layers of three)."""
    llm = zoo.llm("qwen2_moe")
    llm.reset_counters()
    ids = token_ids(17)
    llm.logits(ids, prefill=16)  # a 16-token prefill pass, then one decode pass
    prefill, decode = llm.counters()[-2:]
    d, expert, shared = 96, 3 * 96 * 64, 3 * 96 * 96 + 96
    for record, tokens in ((prefill, 16), (decode, 1)):
        assert record["moe_layers"] == 2
        assert record["flops_experts"] == 2 * tokens * 3 * 2 * expert
        assert record["flops_router"] == 2 * tokens * 2 * d * 8
        assert record["flops_shared_experts"] == 2 * tokens * 2 * shared
    # The decode pass hit exactly top_k = 3 distinct experts in each MoE layer.
    assert decode["experts_active_sum"] == 2 * 3
    assert decode["weight_bytes_experts"] == 2 * 3 * expert * 4  # fp32 weights
    assert 2 * 3 <= prefill["experts_active_sum"] <= 2 * 8


# -- bad input --------------------------------------------------------------------------------


def test_missing_or_extra_expert_is_named(zoo):
    ckpt = load_checkpoint(zoo.path("mixtral"))
    cfg = ckpt.spec.core_config()
    tensors = dict(ckpt.tensors)
    del tensors["blk.1.ffn_up_exps.7"]
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_up_exps\.7"):
        _core.Engine(cfg, tensors, kv_pages=4)
    tensors = dict(ckpt.tensors)
    tensors["blk.0.ffn_gate_exps.8"] = tensors["blk.0.ffn_gate_exps.0"]
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_gate_exps\.8"):
        _core.Engine(cfg, tensors, kv_pages=4)


def test_wrong_expert_shape_is_named(zoo):
    ckpt = load_checkpoint(zoo.path("olmoe"))
    tensors = dict(ckpt.tensors)
    tensors["blk.1.ffn_down_exps.3"] = tensors["blk.1.ffn_gate_exps.3"]  # [64, 96] for [96, 64]
    with pytest.raises(ModelFileError, match=r"blk\.1\.ffn_down_exps\.3 has shape \[64, 96\]"):
        _core.Engine(ckpt.spec.core_config(), tensors, kv_pages=4)
    tensors = dict(ckpt.tensors)
    t, arr, rows, cols = tensors["blk.0.ffn_gate_inp"]
    tensors["blk.0.ffn_gate_inp"] = (t, arr[: (rows - 1) * cols * 4], rows - 1, cols)
    with pytest.raises(ModelFileError, match=r"blk\.0\.ffn_gate_inp has shape \[7, 96\]"):
        _core.Engine(ckpt.spec.core_config(), tensors, kv_pages=4)


def test_config_expert_count_must_match_checkpoint(zoo, tmp_path):
    src = zoo.path("mixtral")
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = 6
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"ffn_\w+_exps\.[67]"):
        LLM(tmp_path, n_threads=1, kv_cache_tokens=64)


@pytest.mark.parametrize("change", ["no_bias", "no_groups", "no_scaling"])
def test_deepseek_routing_features_matter(zoo, change):
    """Negative control: the engine without the selection bias, the group limit or the routed
    scaling factor is far from HF, so the parity above is sensitive to each."""
    zoo.hf("deepseek")
    _, llama_cfg, moe = zoo._models["deepseek"]
    tensors, types = {}, {}
    spec = ModelSpec.from_hf_config(llama_cfg.to_dict())
    spec.moe = MoESpec(**{**moe.__dict__, "extra": {}})
    _read_safetensors_file(zoo.path("deepseek") / "model.safetensors", tensors, types, spec)
    if change == "no_bias":
        tensors = {k: v for k, v in tensors.items() if not k.endswith("exp_probs_b")}
    elif change == "no_groups":
        spec.moe.n_group = spec.moe.topk_group = 1
    else:
        spec.moe.routed_scaling_factor = 1.0
    engine = _core.Engine(spec.core_config(), tensors, kv_pages=8, n_threads=N_THREADS)
    ids = token_ids(45)
    err = relative_error(engine_logits(engine, ids, 45), zoo.reference("deepseek", ids))
    assert err > 100 * LOGIT_TOL, f"{change}: error only {err:.2e} x range"


# -- GGUF: 3-D expert tensors as llama.cpp writes them ------------------------------------------

_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe"}
_GGUF_SHARED = {
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}


def _roundtrip(w: np.ndarray, wtype: G) -> np.ndarray:
    if wtype == G.F32:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, wtype), wtype).reshape(w.shape)


def write_moe_gguf(model, path, wtype: G) -> dict[str, np.ndarray]:
    """Writes ``model`` with llama.cpp's MoE tensor names (ffn_{gate,up,down}_exps as one 3-D
    tensor per layer, ffn_gate_inp router in F32, *_shexp shared expert, a 1-D shared gate) and
    returns the HF state dict holding exactly what the file holds."""
    cfg = model.config
    arch = _GGUF_ARCH[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_expert_count(cfg.num_local_experts if arch == "llama" else cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen2moe":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    reference = {}

    def put(name: str, w: np.ndarray, quantize: bool) -> np.ndarray:
        if w.ndim == 1 or not quantize or wtype == G.F32:
            writer.add_tensor(name, w.astype(np.float32))
            return w
        writer.add_tensor(name, gguf.quants.quantize(w, wtype), raw_dtype=wtype)
        return _roundtrip(w, wtype)

    for key, t in model.state_dict().items():
        w = t.detach().float().numpy()
        if key in hc._HF_TO_GGUF_GLOBAL:
            reference[key] = put(hc._HF_TO_GGUF_GLOBAL[key], w, True)
            continue
        _, _, layer, rest = key.split(".", 3)
        p = f"blk.{layer}."
        if rest in hc._HF_TO_GGUF_LAYER:
            is_q, is_k = rest.startswith("self_attn.q_proj."), rest.startswith("self_attn.k_proj.")
            if arch == "llama" and (is_q or is_k):
                heads = cfg.num_attention_heads if is_q else cfg.num_key_value_heads
                put(p + hc._HF_TO_GGUF_LAYER[rest], hc.permute_for_gguf(w, heads), True)
                reference[key] = _roundtrip(w, wtype) if w.ndim == 2 else w
            else:
                reference[key] = put(p + hc._HF_TO_GGUF_LAYER[rest], w, True)
        elif rest == "mlp.gate.weight":
            reference[key] = put(p + "ffn_gate_inp.weight", w, False)
        elif rest == "mlp.experts.gate_up_proj":
            ff = w.shape[1] // 2
            gate = put(p + "ffn_gate_exps.weight", np.ascontiguousarray(w[:, :ff]), True)
            up = put(p + "ffn_up_exps.weight", np.ascontiguousarray(w[:, ff:]), True)
            reference[key] = np.concatenate([gate, up], axis=1)
        elif rest == "mlp.experts.down_proj":
            reference[key] = put(p + "ffn_down_exps.weight", w, True)
        elif rest in _GGUF_SHARED:
            reference[key] = put(p + _GGUF_SHARED[rest], w, True)
        elif rest == "mlp.shared_expert_gate.weight":
            put(p + "ffn_gate_inp_shexp.weight", w.reshape(-1), False)
            reference[key] = w
        else:
            raise KeyError(key)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


# Q8_0 weights with 16-bit activations (8-bit rows plus residual rows), against HF holding the
# file's dequantized weights: observed ~3e-5 x range (against the unrounded fp32 weights ~5e-2,
# so the bound is sensitive to which weights the reference holds).
GGUF_TOL = {G.F32: LOGIT_TOL, G.Q8_0: 5e-4}


@pytest.mark.parametrize("wtype", [G.F32, G.Q8_0])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_gguf_experts_match_hf(zoo, tmp_path, kind, wtype):
    path = tmp_path / f"{kind}.gguf"
    state = write_moe_gguf(zoo.hf(kind), path, wtype)
    ckpt = load_checkpoint(path)
    assert ckpt.spec.moe is not None and ckpt.spec.moe.n_experts == 8
    assert ckpt.spec.moe.norm_topk_prob == (kind == "mixtral")
    config_cls, model_cls, fields = KINDS[kind]
    ref_model = model_cls(
        config_cls(**SIZES, **fields, attn_implementation="eager", dtype="float32")
    ).eval()
    ref_model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    )
    llm = LLM(path, n_threads=N_THREADS, kv_cache_tokens=256)
    ids = token_ids(45)
    ref = hc.hf_logits(ref_model, ids)
    for prefill in (45, 16):
        err = relative_error(llm.logits(ids, prefill=prefill), ref)
        assert err <= GGUF_TOL[wtype], f"{kind} {wtype.name} prefill={prefill}: {err:.2e} x range"
