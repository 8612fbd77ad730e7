"""Shared fixtures: the real default model, real English text, and thread settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The shipped default model (SmolLM2-135M-Instruct Q4_1), pulled into the cache if needed."""
    env = os.environ.get("LMENGINE_TEST_SMOLLM2")
    if env and Path(env).is_file():
        return Path(env)
    from lmengine.registry import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def english_text() -> str:
    """Real English prose: the license texts shipped with the OS, concatenated."""
    names = ["Apache-2.0", "GPL-3", "LGPL-3", "MPL-2.0", "Artistic", "BSD", "GFDL-1.3", "CC0-1.0"]
    parts = [(LICENSES / n).read_text(errors="ignore") for n in names if (LICENSES / n).is_file()]
    if not parts:
        pytest.skip("no license texts under /usr/share/common-licenses")
    return "\n\n".join(parts)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """One loaded LLM shared by the real-model tests (2 threads, 8K KV positions)."""
    from lmengine import LLM

    return LLM(smollm2_gguf_path, n_threads=2, kv_cache_tokens=8192)
