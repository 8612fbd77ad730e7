"""Architecture description of a model, from an HF config.json or from GGUF metadata.

``ModelSpec`` is the one place where checkpoint conventions (field names, RoPE variants, tied
heads, biases) are turned into the plain numbers the C++ core runs with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmengine.errors import LMEngineError, ModelFileError, UnsupportedModelError
from lmengine.models.moe import (
    MOE_GGUF_ARCHITECTURES,
    MOE_HF_ARCHITECTURES,
    MoESpec,
    moe_from_gguf_metadata,
    moe_from_hf_config,
)

__all__ = ["ModelSpec", "SUPPORTED_ARCHITECTURES"]

# HF model_type / GGUF general.architecture values the core runs (MoE ones: models/moe.py).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2") + MOE_HF_ARCHITECTURES


@dataclass
class ModelSpec:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    max_context: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    rope_interleaved: bool = False  # GGUF llama checkpoints rotate adjacent pairs
    rope_freq_factors: np.ndarray | None = None  # GGUF rope_freqs tensor (llama 3.1 scaling)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int = 0
    qk_norm: str = ""  # "head": RMSNorm of each q/k head (Qwen3); "full": of the whole projection
    moe: MoESpec | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        arch = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unknown architecture {arch!r} (model_type); supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            d = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            scaling = cfg.get("rope_scaling") or None
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = rope
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            window = cfg.get("sliding_window") if arch in ("mistral", "mixtral") else None
            if cfg.get("mlp_bias"):
                raise UnsupportedModelError(f"{arch} with mlp_bias=true is not supported")
            if cfg.get("clip_qkv") is not None:
                raise UnsupportedModelError(f"{arch} with clip_qkv is not supported")
            if arch in ("qwen2_moe", "qwen3_moe") and cfg.get("use_sliding_window"):
                raise UnsupportedModelError(f"{arch} with use_sliding_window=true is not supported")
            n_layers = int(cfg["num_hidden_layers"])
            moe = moe_from_hf_config(arch, cfg, n_layers) if arch in MOE_HF_ARCHITECTURES else None
            if arch != "qwen2" and cfg.get("attention_bias"):
                # HF's Llama puts a bias on o_proj too; the core has Q/K/V biases only.
                raise UnsupportedModelError(
                    f"{arch} with attention_bias=true (o_proj bias) is not supported"
                )
            if arch == "qwen2" and cfg.get("use_sliding_window"):
                raise UnsupportedModelError("qwen2 with use_sliding_window=true is not supported")
            return cls(
                arch=arch,
                n_layers=n_layers,
                d_model=d,
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or d // n_heads),
                d_ff=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings", 2048)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=dict(scaling) if scaling else None,
                rope_interleaved=False,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=arch == "qwen2"
                or (arch == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))
                or bool(cfg.get("attention_bias", False)),
                sliding_window=int(window or 0),
                qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(arch, ""),
                moe=moe,
            )
        except LMEngineError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"config.json is missing or has an invalid field: {e}") from e

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelSpec:
        arch = meta.get("general.architecture")
        gguf_archs = ("llama", "qwen2") + MOE_GGUF_ARCHITECTURES
        if arch not in gguf_archs:
            raise UnsupportedModelError(
                f"unknown architecture {arch!r} (general.architecture); supported in GGUF: "
                + ", ".join(gguf_archs)
            )

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelFileError(f"GGUF metadata is missing '{arch}.{key}'")
            return value

        d = int(get("embedding_length"))
        n_heads = int(get("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or d // n_heads)
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else None
        if vocab is None:
            raise ModelFileError("GGUF metadata gives no vocabulary size")
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type in ("linear",):
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        elif scaling_type not in (None, "none"):
            raise UnsupportedModelError(
                f"RoPE scaling type {scaling_type!r} is not supported in GGUF"
            )
        n_layers = int(get("block_count"))
        qk_norm = ""
        if "blk.0.attn_q_norm.weight" in tensor_names:
            qk_norm = "full" if arch == "olmoe" else "head"
        return cls(
            arch=arch,
            n_layers=n_layers,
            d_model=d,
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
            head_dim=head_dim,
            d_ff=int(get("feed_forward_length")),
            vocab_size=int(vocab),
            max_context=int(get("context_length", 2048)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            # llama.cpp's converter permutes Q/K of llama checkpoints so RoPE rotates adjacent
            # pairs; qwen2 keeps HF's layout (rotate halves).
            rope_interleaved=arch == "llama",
            tie_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm=qk_norm,
            moe=moe_from_gguf_metadata(arch, meta, n_layers, tensor_names),
        )

    # -- derived values -----------------------------------------------------------------------

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (head_dim/2,), float32, computed as HF transformers does."""
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            pass
        elif kind == "linear":
            inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low = float(scaling["low_freq_factor"])
            high = float(scaling["high_freq_factor"])
            old_ctx = float(scaling["original_max_position_embeddings"])
            low_wavelen = old_ctx / low
            high_wavelen = old_ctx / high
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
        else:
            raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported")
        if self.rope_freq_factors is not None:
            inv_freq = (inv_freq / self.rope_freq_factors.astype(np.float32)).astype(np.float32)
        return inv_freq

    def core_config(self, max_context: int | None = None) -> dict[str, Any]:
        """The config dict lmengine._core.Engine takes."""
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_ff": self.d_ff,
            "vocab_size": self.vocab_size,
            "max_context": int(max_context or self.max_context),
            "rms_eps": self.rms_eps,
            "rope_interleaved": self.rope_interleaved,
            "rope_inv_freq": self.rope_inv_freq().tolist(),
            "sliding_window": self.sliding_window,
            "qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
            **(self.moe.core_config() if self.moe else {}),
        }

    @property
    def n_params(self) -> int:
        """Parameters of the weights a forward pass multiplies per token (embedding lookup
        excluded; in MoE layers the router, top_k routed experts and the shared expert)."""
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        attn = self.d_model * (q + 2 * kv) + q * self.d_model
        total = self.vocab_size * self.d_model
        for layer in range(self.n_layers):
            if self.moe is not None and self.moe.moe_layers[layer]:
                # Per token: the router, top_k routed experts and the shared expert.
                expert, shared = self.moe.params_per_layer(self.d_model)
                ffn = self.moe.n_experts * self.d_model + self.moe.top_k * expert + shared
            else:
                ffn = 3 * self.d_model * self.d_ff
            total += attn + ffn
        return total
