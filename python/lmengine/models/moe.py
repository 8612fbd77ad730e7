"""Mixture-of-Experts conventions: routing fields from HF config.json and GGUF metadata, checkpoint
tensor names, and the expert-count records of ``LLM.expert_stats``.

Routing per family (HF transformers' modeling files are the reference):

=============  ===========  ================================  ==============  =====================
family         scores       selection                         renormalise     extras
=============  ===========  ================================  ==============  =====================
Mixtral        softmax      top-k                             yes             --
Qwen2-MoE      softmax      top-k                             norm_topk_prob  shared expert, gated
                                                                              by sigmoid(w . x)
Qwen3-MoE      softmax      top-k                             norm_topk_prob  q/k RMSNorm per head
OLMoE          softmax      top-k                             norm_topk_prob  q/k RMSNorm over the
                                                                              whole projection
DeepSeek-V3    sigmoid      + selection bias, top topk_group  yes, then       shared experts
routing                     groups (sum of their best two)    x routed_       (ungated), first k
                                                              scaling_factor  layers dense
=============  ===========  ================================  ==============  =====================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmengine.errors import UnsupportedModelError

__all__ = [
    "MoESpec",
    "MOE_HF_ARCHITECTURES",
    "MOE_GGUF_ARCHITECTURES",
    "moe_from_hf_config",
    "moe_from_gguf_metadata",
    "hf_moe_tensor_name",
    "expert_count_records",
]

MOE_HF_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# GGUF general.architecture values with expert tensors (Mixtral is "llama" with expert_count).
MOE_GGUF_ARCHITECTURES = ("qwen2moe", "qwen3moe", "olmoe")


@dataclass
class MoESpec:
    n_experts: int
    top_k: int
    d_ff_expert: int
    moe_layers: list[bool]
    scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    d_ff_shared: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    extra: dict[str, Any] = field(default_factory=dict)

    def core_config(self) -> dict[str, Any]:
        return {
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "moe_scoring": self.scoring,
            "norm_topk_prob": self.norm_topk_prob,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "d_ff_expert": self.d_ff_expert,
            "d_ff_shared": self.d_ff_shared,
            "shared_gate": self.shared_gate,
            "moe_layers": list(self.moe_layers),
        }

    def params_per_layer(self, d_model: int) -> tuple[int, int]:
        """(parameters of one routed expert, of the shared expert) for SwiGLU experts."""
        return 3 * d_model * self.d_ff_expert, 3 * d_model * self.d_ff_shared


def _sparse_layers(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    """Qwen-MoE's rule: layer l is sparse unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer."""
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return [(i not in dense) and (i + 1) % step == 0 for i in range(n_layers)]


def _n_experts(cfg: dict[str, Any]) -> int:
    """Expert count under any of the names configs use (transformers 5 may write
    num_local_experts for Qwen3-MoE, whose checkpoints say num_experts)."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            return int(cfg[key])
    raise KeyError("num_experts")


def moe_from_hf_config(arch: str, cfg: dict[str, Any], n_layers: int) -> MoESpec:
    """The MoE part of an HF config of one of MOE_HF_ARCHITECTURES."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"{arch} with hidden_act={cfg.get('hidden_act')!r} is not supported"
        )
    if arch == "mixtral":
        return MoESpec(
            n_experts=_n_experts(cfg),
            top_k=int(cfg["num_experts_per_tok"]),
            d_ff_expert=int(cfg["intermediate_size"]),
            moe_layers=[True] * n_layers,
            norm_topk_prob=True,
        )
    if arch in ("qwen2_moe", "qwen3_moe"):
        shared = int(cfg.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
        return MoESpec(
            n_experts=_n_experts(cfg),
            top_k=int(cfg["num_experts_per_tok"]),
            d_ff_expert=int(cfg["moe_intermediate_size"]),
            moe_layers=_sparse_layers(cfg, n_layers),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            d_ff_shared=shared,
            shared_gate=shared > 0,
        )
    if arch == "olmoe":
        return MoESpec(
            n_experts=_n_experts(cfg),
            top_k=int(cfg["num_experts_per_tok"]),
            d_ff_expert=int(cfg["intermediate_size"]),
            moe_layers=[True] * n_layers,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        )
    raise UnsupportedModelError(f"{arch!r} is not a Mixture-of-Experts architecture lmengine knows")


def moe_from_gguf_metadata(
    arch: str, meta: dict[str, Any], n_layers: int, tensor_names: set[str]
) -> MoESpec | None:
    """The MoE part of GGUF metadata, following llama.cpp: llama (Mixtral) and qwen3moe
    renormalise the top-k weights, qwen2moe and olmoe do not; None for a dense model."""
    n_experts = int(meta.get(f"{arch}.expert_count") or 0)
    if n_experts == 0:
        return None
    d_ff = meta.get(f"{arch}.expert_feed_forward_length") or meta.get(f"{arch}.feed_forward_length")
    shared = int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0)
    if shared == 0 and "blk.0.ffn_gate_shexp.weight" in tensor_names:
        shared = int(meta.get(f"{arch}.feed_forward_length") or 0)
    layers = [f"blk.{i}.ffn_gate_inp.weight" in tensor_names for i in range(n_layers)]
    return MoESpec(
        n_experts=n_experts,
        top_k=int(meta[f"{arch}.expert_used_count"]),
        d_ff_expert=int(d_ff),
        moe_layers=layers,
        norm_topk_prob=arch in ("llama", "qwen3moe"),
        d_ff_shared=shared,
        shared_gate="blk.0.ffn_gate_inp_shexp.weight" in tensor_names
        or any(f"blk.{i}.ffn_gate_inp_shexp.weight" in tensor_names for i in range(n_layers)),
    )


# HF per-layer names (after "model.layers.N.") -> core names; {e} is the expert index.
_HF_EXPERT = re.compile(
    r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight"
)
_HF_EXPERT_ROLE = {
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}
_HF_MOE_NAMES = {
    "block_sparse_moe.gate.weight": "ffn_gate_inp",
    "mlp.gate.weight": "ffn_gate_inp",
    "mlp.gate.e_score_correction_bias": "exp_probs_b",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
    # transformers >= 5 in memory (and checkpoints saved that way): 3-D fused experts
    "mlp.experts.gate_up_proj": "ffn_gate_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}
# Core tensors that are vectors even when a checkpoint stores them as [1, d].
VECTOR_TENSORS = ("ffn_gate_inp_shexp", "exp_probs_b", "attn_q_norm", "attn_k_norm")


def hf_moe_tensor_name(rest: str) -> str | None:
    """Core name (without "blk.N.") of an MoE or q/k-norm tensor, or None."""
    m = _HF_EXPERT.fullmatch(rest)
    if m:
        return f"{_HF_EXPERT_ROLE[m.group(2)]}.{m.group(1)}"
    return _HF_MOE_NAMES.get(rest)


def expert_count_records(counts: np.ndarray, moe_layers: list[bool]) -> list[dict[str, int]]:
    """[{layer, expert, tokens}] for every expert of every MoE layer: pandas.DataFrame(records)."""
    return [
        {"layer": layer, "expert": e, "tokens": int(counts[layer, e])}
        for layer in range(counts.shape[0])
        if moe_layers[layer]
        for e in range(counts.shape[1])
    ]
