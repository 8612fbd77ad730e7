"""Tiny random-weight HF models, and their GGUF conversions, for the model-parity tests.

Each model kind is a transformers config at awkward sizes (vocab 301, hidden 96, 6 heads of 16,
2 or 3 KV heads, FFN 160; row lengths are multiples of 32 so Q8_0 applies to every matrix). The
weights are drawn so that activations stay O(1) through the layers and the logits span a range of
~10-30, i.e. errors are measured against numbers that matter.

Writers:
* ``save_hf_dir``: ``save_pretrained`` (fp32 safetensors) + a byte-level BPE ``tokenizer.json``
  of exactly ``vocab_size`` tokens + ``tokenizer_config.json``.
* ``write_gguf``: what llama.cpp's ``convert_hf_to_gguf.py`` writes for these architectures:
  llama and mistral as GGUF arch ``llama`` with Q and K rows permuted so RoPE rotates adjacent
  pairs, qwen2 as ``qwen2`` unpermuted; Llama-3.1 RoPE scaling as a ``rope_freqs.weight`` tensor
  of per-frequency divisors; 1-D tensors (norms, biases) always F32, matrices F32, F16 or Q8_0.
* ``gguf_to_hf_state_dict``: reads a GGUF back, dequantizes it and undoes the permutation, so an
  HF model can run on exactly the weights the engine sees.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as G
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "MODEL_KINDS",
    "GGUF_KINDS",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "make_config",
    "build_hf_model",
    "save_hf_dir",
    "rounded_state_dict",
    "write_gguf",
    "gguf_to_hf_state_dict",
    "hf_model_from_state_dict",
    "hf_logits",
    "llama3_rope_freq_factors",
]

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 300  # the last of the 301 tokens

_SIZES = dict(
    vocab_size=301,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=6,
    max_position_embeddings=256,
    bos_token_id=EOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
)

# kind -> (HF config class, model class, config overrides)
_KIND_TABLE: dict[str, tuple[type, type, dict]] = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5),
    ),
    # Llama's attention_bias puts a bias on q, k, v *and* o_proj.
    "llama_bias": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=3, head_dim=16, rms_norm_eps=1e-5, attention_bias=True),
    ),
    # mlp_bias puts a bias on gate, up and down.
    "llama_mlp_bias": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, mlp_bias=True),
    ),
    # Llama 3.1 scaling with a small original context so all three bands (kept, smoothed,
    # divided by factor) hold some of the 8 frequencies of a 16-wide head.
    "llama3_rope": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # Qwen2: q/k/v biases, tied embeddings (as the small Qwen2 checkpoints), theta 1e6.
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            num_key_value_heads=3,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="default", rope_theta=1e6),
        ),
    ),
    # Mistral with a window longer than any test sequence: same math as Llama.
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            sliding_window=4096,
            rope_parameters=dict(rope_type="default", rope_theta=1e6),
        ),
    ),
    # Mistral with a window shorter than the test sequences (HF eager masks kv > q - window).
    "mistral_swa": (
        MistralConfig,
        MistralForCausalLM,
        dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, sliding_window=8),
    ),
    # Gemma 3: q/k norms, four norms per layer stored as w (applied as 1 + w), GELU-tanh MLP,
    # scaled embeddings, tied head, and layers 0-4 windowed (window 8, shorter than the test
    # sequences) on their own RoPE base while layer 5 is global: the layout of llama.cpp's
    # every-6th-layer pattern, so the GGUF conversion describes the same model.
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            num_hidden_layers=6,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            rms_norm_eps=1e-6,
            sliding_window=8,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
            tie_word_embeddings=True,
        ),
    ),
}
MODEL_KINDS = tuple(_KIND_TABLE)
# llama.cpp converts Mistral as arch "llama" and drops the sliding window, so a GGUF of
# mistral_swa would be a different model; MLP biases have no llama.cpp tensor names here.
GGUF_KINDS = tuple(k for k in MODEL_KINDS if k not in ("mistral_swa", "llama_mlp_bias"))

_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
_FILE_TYPE = {
    G.F32: gguf.LlamaFileType.ALL_F32,
    G.F16: gguf.LlamaFileType.MOSTLY_F16,
    G.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}

_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# Gemma 3 names that differ from the table above; llama.cpp also stores every norm as 1 + w.
_HF_TO_GGUF_GEMMA3 = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def _layer_names(arch: str) -> dict[str, str]:
    return {**_HF_TO_GGUF_LAYER, **_HF_TO_GGUF_GEMMA3} if arch == "gemma3" else _HF_TO_GGUF_LAYER


_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


# -- models -----------------------------------------------------------------------------------


def make_config(kind: str, **changes) -> PretrainedConfig:
    """The HF config of ``kind``; ``changes`` override its fields (for negative controls)."""
    config_cls, _, overrides = _KIND_TABLE[kind]
    fields = {**_SIZES, **overrides, **changes}
    return config_cls(**fields, attn_implementation="eager", dtype="float32")


def build_hf_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A random-weight fp32 model in eval mode, eager attention.

    Matrices are N(0, 1/fan_in) so each projection keeps unit scale; norm weights are 1 + 0.2 N so
    a wrong norm weight shows; biases are 0.5 N so they move q/k/v visibly; the embedding is N(0, 1)
    and the head has gain 2, which gives logits a range of ~10-30.
    """
    config = make_config(kind)
    model_cls = _KIND_TABLE[kind][1]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
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
                p.copy_(2.0 * noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    if config.tie_word_embeddings:
        # The tied head reads the N(0, 1) embedding: scale it down to the same gain as above.
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(2.0 / math.sqrt(config.hidden_size))
    return model


def hf_model_from_state_dict(
    kind: str, state_dict: dict[str, np.ndarray], **changes
) -> PreTrainedModel:
    """An HF model of ``kind`` holding exactly ``state_dict`` (every weight must be given);
    ``changes`` override config fields."""
    model = _KIND_TABLE[kind][1](make_config(kind, **changes)).eval()
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        for k, v in state_dict.items()
    }
    if model.config.tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


@torch.no_grad()
def hf_logits(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """Logits (len(ids), vocab) float32 of one sequence, full causal forward."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    return model(input_ids=x, use_cache=False).logits[0].float().numpy()


# -- tokenizer --------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_vocabulary(vocab_size: int) -> tuple[list[str], list[str]]:
    """(tokens, merges): 256 byte tokens, vocab_size - 257 merges of letter pairs, then EOS."""
    tokens = _byte_level_alphabet()
    merges = []
    letters = "etaoinshrdlcumwfgypb"
    pairs = ((a, b) for a in letters for b in letters)
    while len(tokens) < vocab_size - 1:
        a, b = next(pairs)
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens.append(EOS_TOKEN)
    assert len(tokens) == vocab_size and len(set(tokens)) == vocab_size
    return tokens, merges


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    tokens, merges = tiny_vocabulary(vocab_size)
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
    )
    tok = BackendTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    assert tok.token_to_id(EOS_TOKEN) == vocab_size - 1
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 256,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_hf_dir(
    model: PreTrainedModel, directory: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """config.json + model.safetensors in ``dtype`` + tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    _write_tokenizer(directory, model.config.vocab_size)
    return directory


def rounded_state_dict(model: PreTrainedModel, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """The model's weights rounded to ``dtype`` and widened back to fp32."""
    return {k: v.to(dtype).float().numpy() for k, v in model.state_dict().items()}


# -- GGUF -------------------------------------------------------------------------------------


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: within each head, rows [x0..x_{d/2-1}, y0..] (HF's
    rotate-halves order) become [x0, y0, x1, y1, ...] so RoPE rotates adjacent pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rope_params(config: PretrainedConfig) -> dict:
    return dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )


def llama3_rope_freq_factors(config: PretrainedConfig) -> np.ndarray | None:
    """The rope_freqs tensor llama.cpp writes for rope_type llama3: per frequency a divisor,
    1 for short wavelengths, ``factor`` for long ones, smooth in between, so that
    inv_freq / divisor equals HF's scaled inv_freq."""
    rope = _rope_params(config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = config.head_dim
    base = float(rope["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    # llama.cpp reads original_max_position_embeddings from the top-level config with a
    # default of 8192 (Llama 3.1's value); the number that belongs here is rope_scaling's.
    old_ctx = float(rope["original_max_position_embeddings"])
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _gguf_tensors(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array in the layout llama.cpp's converter writes."""
    config = model.config
    arch = _GGUF_ARCH[config.model_type]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = t.detach().float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        if name in _HF_TO_GGUF_GLOBAL:
            out[_HF_TO_GGUF_GLOBAL[name]] = w
            continue
        _, _, layer, rest = name.split(".", 3)
        if arch == "llama" and rest.startswith("self_attn.q_proj."):
            w = permute_for_gguf(w, n_head)
        elif arch == "llama" and rest.startswith("self_attn.k_proj."):
            w = permute_for_gguf(w, n_kv)
        out[f"blk.{layer}.{_layer_names(arch)[rest]}"] = w
    return out


def write_gguf(model: PreTrainedModel, path: Path, weight_type: G = G.F32) -> Path:
    """Writes ``model`` as a GGUF file with matrices in ``weight_type`` (F32, F16 or Q8_0)."""
    config = model.config
    if (
        config.model_type == "mistral"
        and config.sliding_window
        and config.sliding_window < config.max_position_embeddings
    ):
        raise ValueError(
            "llama.cpp drops Mistral's sliding window; a GGUF of this model would differ"
        )
    arch = _GGUF_ARCH[config.model_type]
    rope = _rope_params(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch != "gemma3":
        writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPE[weight_type])
    if arch == "gemma3":
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base(float(config.rope_parameters["full_attention"]["rope_theta"]))

    tokens, merges = tiny_vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)

    factors = llama3_rope_freq_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for name, w in _gguf_tensors(model).items():
        if w.ndim == 1 or weight_type == G.F32:
            writer.add_tensor(name, w.astype(np.float32))
        elif weight_type == G.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, weight_type), raw_dtype=weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_to_hf_state_dict(path: Path, kind: str) -> dict[str, np.ndarray]:
    """The weights a GGUF file holds, dequantized to fp32, in HF names and layout."""
    config = make_config(kind)
    arch = _GGUF_ARCH[config.model_type]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    to_hf = {v: k for k, v in _HF_TO_GGUF_GLOBAL.items()}
    to_hf_layer = {v: k for k, v in _layer_names(arch).items()}
    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml order -> numpy order
        w = (
            gguf.quants.dequantize(np.asarray(t.data), G(t.tensor_type))
            .reshape(shape)
            .astype(np.float32)
        )
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        if t.name in to_hf:
            out[to_hf[t.name]] = w
            continue
        _, layer, rest = t.name.split(".", 2)
        if arch == "llama" and rest.startswith("attn_q."):
            w = unpermute_from_gguf(w, n_head)
        elif arch == "llama" and rest.startswith("attn_k."):
            w = unpermute_from_gguf(w, n_kv)
        out[f"model.layers.{layer}.{to_hf_layer[rest]}"] = w
    return out
