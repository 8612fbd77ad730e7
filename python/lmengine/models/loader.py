"""Checkpoint loading: GGUF files and HF-style safetensors directories, memory-mapped.

Big weights are handed to the core as views of one read-only memory map of the file: nothing is
dequantized or copied, so loading costs page-table set-up, and RSS grows only with what a forward
pass touches. Small 1-D tensors (norm weights, biases) are converted to float32 copies.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmengine.errors import ModelFileError, ModelNotFoundError, UnsupportedModelError
from lmengine.models.moe import VECTOR_TENSORS, hf_moe_tensor_name
from lmengine.models.spec import ModelSpec

__all__ = ["LoadedCheckpoint", "load_checkpoint", "GGML_TYPE_LAYOUT"]

# ggml type id -> (elements per block, bytes per block) for the types the core multiplies.
GGML_TYPE_LAYOUT = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    30: (1, 2),  # BF16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    14: (256, 210),  # Q6_K
}
_F32, _F16, _BF16 = 0, 1, 30


def _ggml_type_name(type_id: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type {type_id}"


@dataclass
class LoadedCheckpoint:
    spec: ModelSpec
    # core tensor name -> (ggml type, array, rows, cols), as lmengine._core.Engine takes them
    tensors: dict[str, tuple[int, np.ndarray, int, int]]
    metadata: dict[str, Any]  # GGUF key/values, or config.json
    source: Path
    format: str  # "gguf" or "safetensors"
    tokenizer_dir: Path | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return sum(int(a.nbytes) for _, a, _, _ in self.tensors.values())


def _to_f32_vector(name: str, type_id: int, raw: np.ndarray) -> np.ndarray:
    if type_id == _F32:
        return raw.view(np.float32)
    if type_id == _F16:
        return raw.view(np.float16).astype(np.float32)
    if type_id == _BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise UnsupportedModelError(
        f"1-D tensor {name!r} has type {_ggml_type_name(type_id)}; expected F32/F16/BF16"
    )


def _tensor_entry(
    name: str, type_id: int, raw: np.ndarray, shape_rows_cols: tuple[int, int], one_d: bool
):
    if type_id not in GGML_TYPE_LAYOUT:
        raise UnsupportedModelError(
            f"tensor {name!r} has type {_ggml_type_name(type_id)}, which lmengine does not support "
            f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K)"
        )
    rows, cols = shape_rows_cols
    if one_d:
        return (_F32, np.ascontiguousarray(_to_f32_vector(name, type_id, raw)), 1, cols)
    return (type_id, raw, rows, cols)


def _tensor_nbytes(name: str, type_id: int, n_elements: int, cols: int) -> int:
    if type_id not in GGML_TYPE_LAYOUT:
        raise UnsupportedModelError(
            f"tensor {name!r} has type {_ggml_type_name(type_id)}, which lmengine does not support "
            f"(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K)"
        )
    block, block_bytes = GGML_TYPE_LAYOUT[type_id]
    if cols % block:
        raise ModelFileError(
            f"tensor {name!r}: row length {cols} is not a multiple of its block size {block}"
        )
    return n_elements // block * block_bytes


def _split_experts(
    core_name: str,
    type_id: int,
    raw: np.ndarray,
    n_expert: int,
    rows: int,
    cols: int,
    tensors: dict,
) -> None:
    """Per-expert views "<name>.<e>" of a 3-D expert tensor [n_expert, rows, cols] (no copy)."""
    if not core_name.endswith("_exps"):
        raise UnsupportedModelError(
            f"3-D tensor {core_name!r} is not an expert tensor lmengine knows"
        )
    per = raw.nbytes // n_expert
    for e in range(n_expert):
        tensors[f"{core_name}.{e}"] = _tensor_entry(
            f"{core_name}.{e}", type_id, raw[e * per : (e + 1) * per], (rows, cols), False
        )


# GGUF names that are not matrices the core multiplies.
_GGUF_SKIP = {"rope_freqs.weight"}


def load_gguf(path: Path) -> LoadedCheckpoint:
    from lmengine.models.gguf_metadata import read_gguf_header

    header = read_gguf_header(path)
    names = {t.name for t in header.tensors}
    spec = ModelSpec.from_gguf_metadata(header.metadata, names)
    file_size = path.stat().st_size
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, tuple[int, np.ndarray, int, int]] = {}
    types: dict[str, str] = {}
    for info in header.tensors:
        shape = tuple(int(x) for x in info.shape)
        n_elements = int(np.prod(shape)) if shape else 1
        cols = shape[0]
        rows = n_elements // cols if cols else 0
        start = header.data_offset + int(info.offset)
        if info.name in _GGUF_SKIP:
            if info.ggml_type == _F32 and start + 4 * n_elements <= file_size:
                spec.rope_freq_factors = np.array(
                    mm[start : start + 4 * n_elements].view(np.float32)
                )
            continue
        nbytes = _tensor_nbytes(info.name, info.ggml_type, n_elements, cols)
        if start + nbytes > file_size:
            raise ModelFileError(
                f"{path} is truncated: tensor {info.name!r} needs bytes {start}..{start + nbytes}, "
                f"the file has {file_size}"
            )
        raw = mm[start : start + nbytes]
        core_name = info.name[: -len(".weight")] if info.name.endswith(".weight") else info.name
        if core_name.endswith(".exp_probs_b.bias"):
            core_name = core_name[: -len(".bias")]
        if len(shape) == 3:
            # Expert tensors [n_expert, rows, cols] (ggml order reversed): one view per expert.
            _split_experts(core_name, info.ggml_type, raw, shape[2], shape[1], cols, tensors)
            for e in range(shape[2]):
                types[f"{core_name}.{e}"] = _ggml_type_name(info.ggml_type)
            continue
        tensors[core_name] = _tensor_entry(
            info.name, info.ggml_type, raw, (rows, cols), len(shape) == 1
        )
        types[core_name] = _ggml_type_name(info.ggml_type)
    return LoadedCheckpoint(spec, tensors, header.metadata, path, "gguf", None, types)


_SAFETENSORS_DTYPES = {"F32": _F32, "F16": _F16, "BF16": _BF16}


# Layer tensors whose HF name means something else in Gemma 3 (four norms per layer).
_GEMMA3_LAYER_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm",
    "post_feedforward_layernorm.weight": "post_ffw_norm",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
}


def _hf_to_core_name(name: str, arch: str = "llama") -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd"
    if name == "model.norm.weight":
        return "output_norm"
    if name == "lm_head.weight":
        return "output"
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
        return None
    layer = parts[2]
    rest = ".".join(parts[3:])
    mapping = {
        "input_layernorm.weight": "attn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "post_attention_layernorm.weight": "ffn_norm",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }
    if arch == "gemma3_text":
        mapping.update(_GEMMA3_LAYER_NAMES)
    core = mapping.get(rest) or hf_moe_tensor_name(rest)
    if core is None:
        return None
    return f"blk.{layer}.{core}"


def _read_safetensors_file(path: Path, tensors: dict, types: dict, spec: ModelSpec) -> None:
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelFileError(f"{path} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(file_size - 8, 100 * 2**20):
            raise ModelFileError(f"{path}: safetensors header length {header_len} is invalid")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{path}: safetensors header is not valid JSON ({e})") from e
    data_start = 8 + header_len
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        core = _hf_to_core_name(name, spec.arch)
        if core is None:
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise UnsupportedModelError(
                f"tensor {name!r} in {path.name} has dtype {dtype}; supported: F32, F16, BF16"
            )
        type_id = _SAFETENSORS_DTYPES[dtype]
        shape = [int(x) for x in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        n_elements = int(np.prod(shape)) if shape else 1
        if end - begin != n_elements * GGML_TYPE_LAYOUT[type_id][1] or data_start + end > file_size:
            raise ModelFileError(f"{path} is truncated or inconsistent at tensor {name!r}")
        raw = mm[data_start + begin : data_start + end]
        one_d = len(shape) == 1 or (
            core.rsplit(".", 1)[-1] in VECTOR_TENSORS and int(np.prod(shape)) == shape[-1]
        )
        if one_d:
            entry = _tensor_entry(name, type_id, raw, (1, shape[-1]), True)
            if spec.norm_offset and core.endswith("norm"):
                entry = (entry[0], entry[1] + np.float32(spec.norm_offset), *entry[2:])
            tensors[core] = entry
        elif len(shape) == 3 and core.endswith("ffn_gate_up_exps"):
            # transformers >= 5 fused experts: [E, 2*ff, d], gate rows first, then up.
            n_expert, two_ff, d = shape
            if two_ff % 2:
                raise ModelFileError(f"tensor {name!r} has an odd fused gate/up width {two_ff}")
            halves = raw.reshape(n_expert, 2, -1)
            for role, half in (("ffn_gate_exps", 0), ("ffn_up_exps", 1)):
                base = core[: -len("ffn_gate_up_exps")] + role
                for e in range(n_expert):
                    tensors[f"{base}.{e}"] = _tensor_entry(
                        name, type_id, halves[e, half], (two_ff // 2, d), False
                    )
                    types[f"{base}.{e}"] = dtype
            continue
        elif len(shape) == 3 and core.endswith("_exps"):
            _split_experts(core, type_id, raw, shape[0], shape[1], shape[2], tensors)
            for e in range(shape[0]):
                types[f"{core}.{e}"] = dtype
            continue
        elif len(shape) == 2:
            tensors[core] = _tensor_entry(name, type_id, raw, (shape[0], shape[1]), False)
        else:
            raise ModelFileError(f"tensor {name!r} has {len(shape)} dimensions, expected 1 or 2")
        types[core] = dtype


def load_safetensors_dir(path: Path) -> LoadedCheckpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{config_path} is not valid JSON: {e}") from e
    spec = ModelSpec.from_hf_config(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors files")
    tensors: dict[str, tuple[int, np.ndarray, int, int]] = {}
    types: dict[str, str] = {}
    for f in files:
        _read_safetensors_file(f, tensors, types, spec)
    if "output" not in tensors:
        spec.tie_embeddings = True
    return LoadedCheckpoint(spec, tensors, config, path, "safetensors", path, types)


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Loads a .gguf file or a directory with config.json + *.safetensors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").is_file():
            return load_safetensors_dir(p)
        if len(ggufs) == 1:
            return load_gguf(ggufs[0])
        raise ModelNotFoundError(
            f"{p} holds neither config.json + *.safetensors nor a single .gguf file"
        )
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return load_gguf(p)
    raise ModelFileError(f"{p} is not a GGUF file (magic {magic!r}) and not a model directory")
