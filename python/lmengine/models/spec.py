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
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3_text") + MOE_HF_ARCHITECTURES
GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3") + MOE_GGUF_ARCHITECTURES

# Gemma 3: every 6th layer attends globally, the others through a sliding window with their own
# RoPE base (HF's default layer_types; llama.cpp's set_swa_pattern(6) and rope base 10000).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


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
    qk_norm: str = ""  # "head": RMSNorm of each q/k head (Qwen3, Gemma 3); "full": whole projection
    moe: MoESpec | None = None
    # Gemma-style options (see ModelConfig in cpp/lmengine/model.h).
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    embed_scale: float = 0.0  # 0: embeddings unscaled
    ffn_activation: str = "silu"  # or "gelu_tanh"
    post_norms: bool = False
    layer_sliding_window: list[int] | None = None  # per layer, 0 = global; None: sliding_window
    rope_local_theta: float | None = None  # RoPE base of the windowed layers, if different
    norm_offset: float = 0.0  # added to RMSNorm weights at load (HF Gemma applies 1 + w)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        arch = cfg.get("model_type")
        if arch == "gemma3" and isinstance(cfg.get("text_config"), dict):
            raise UnsupportedModelError(
                "gemma3 multimodal checkpoints are not supported; use a text-only gemma3_text model"
            )
        if arch == "gemma3_text":
            return cls._from_gemma3_hf_config(cfg)
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
    def _from_gemma3_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise UnsupportedModelError(f"gemma3_text with {key}={cfg[key]} is not supported")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError("gemma3_text with bidirectional attention is not supported")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"gemma3_text activation {act!r} is not supported")
        try:
            n_layers = int(cfg["num_hidden_layers"])
            d = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or 256)
            window = int(cfg.get("sliding_window") or 0)
            types = cfg.get("layer_types")
            if types is None:
                pattern = int(cfg.get("sliding_window_pattern") or GEMMA3_SWA_PATTERN)
                types = [
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(n_layers)
                ]
            if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
                raise ModelFileError(f"gemma3_text layer_types is invalid: {types}")
            rope = dict(cfg.get("rope_parameters") or {})
            if "full_attention" in rope:  # transformers >= 5: one entry per layer type
                full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention", {}))
            else:
                full = dict(cfg.get("rope_scaling") or {})
                full.setdefault("rope_theta", cfg.get("rope_theta", 1e6))
                local = {"rope_theta": cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_THETA)}
            if local.get("rope_type", "default") != "default":
                raise UnsupportedModelError(
                    "RoPE scaling on gemma3 sliding layers is not supported"
                )
            scaling = (
                full if full.get("rope_type", full.get("type", "default")) != "default" else None
            )
            return cls(
                arch="gemma3_text",
                n_layers=n_layers,
                d_model=d,
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=head_dim,
                d_ff=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings", 32768)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(full.get("rope_theta", 1e6)),
                rope_scaling=scaling,
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                embed_scale=float(np.float32(math.sqrt(d))),
                ffn_activation="gelu_tanh",
                qk_norm="head",
                post_norms=True,
                layer_sliding_window=[window if t == "sliding_attention" else 0 for t in types],
                rope_local_theta=float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_THETA)),
                norm_offset=1.0,
            )
        except LMEngineError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"config.json is missing or has an invalid field: {e}") from e

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelSpec:
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unknown architecture {arch!r} (general.architecture); supported in GGUF: "
                + ", ".join(GGUF_ARCHITECTURES)
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
        gemma = {}
        if arch == "gemma3":
            # llama.cpp's conventions for gemma3 GGUF files: norm weights already hold 1 + w,
            # Q/K unpermuted (RoPE on halves), scale 1/sqrt(head_dim) (all sizes but 27B),
            # local layers on base 10000 with the window, every 6th layer global.
            window = int(meta.get(f"{arch}.attention.sliding_window") or 0)
            pattern = int(
                meta.get(f"{arch}.attention.sliding_window_pattern") or GEMMA3_SWA_PATTERN
            )
            gemma = dict(
                embed_scale=float(np.float32(math.sqrt(d))),
                ffn_activation="gelu_tanh",
                post_norms=True,
                layer_sliding_window=[
                    0 if (i + 1) % pattern == 0 else window for i in range(n_layers)
                ],
                rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
            )
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
            **gemma,
        )

    # -- derived values -----------------------------------------------------------------------

    def rope_inv_freq_local(self) -> np.ndarray | None:
        """The unscaled frequencies of the windowed layers, when they have their own base."""
        if self.rope_local_theta is None:
            return None
        return _default_inv_freq(self.head_dim, self.rope_local_theta)

    def rope_inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (head_dim/2,), float32, computed as HF transformers does."""
        inv_freq = _default_inv_freq(self.head_dim, self.rope_theta)
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
            "attn_scale": self.attn_scale,
            "embed_scale": self.embed_scale,
            "ffn_activation": self.ffn_activation,
            "post_norms": self.post_norms,
            "layer_sliding_window": list(self.layer_sliding_window or []),
            "rope_inv_freq_local": (
                [] if self.rope_local_theta is None else self.rope_inv_freq_local().tolist()
            ),
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


def _default_inv_freq(dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
