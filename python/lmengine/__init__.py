"""lmengine: run, measure and train language models on a C++/CUDA core."""

from lmengine import (
    _core,  # noqa: F401  (fail early if the compiled core is missing)
    errors,
)
from lmengine.resa import ReSAConfig
from lmengine.sampling import SamplingParams

__all__ = [
    "LLM",
    "RequestOutput",
    "SamplingParams",
    "ReSAConfig",
    "AsyncEngine",
    "errors",
    "__version__",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in the loaders and tokenizer; keep `import lmengine` light for the CLI and tools.
    if name in ("LLM", "RequestOutput"):
        from lmengine import llm

        return getattr(llm, name)
    if name == "AsyncEngine":
        from lmengine.serving.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'lmengine' has no attribute {name!r}")
