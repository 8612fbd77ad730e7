"""Typed exceptions raised by lmengine.

Every error a user can cause (bad file, bad model, bad request) is a subclass of
:class:`LMEngineError`, so callers can catch one type; the subclasses say which part failed.
The compiled core reports invalid arguments as ``ValueError``; the Python layer re-raises them
as the matching class below.
"""

from __future__ import annotations

__all__ = [
    "LMEngineError",
    "ModelFileError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "InvalidRequestError",
    "ContextLengthError",
    "SamplingParamsError",
    "KVCacheFullError",
    "DownloadError",
]


class LMEngineError(Exception):
    """Base class of every error lmengine raises on purpose."""


class ModelFileError(LMEngineError, ValueError):
    """A model file is missing, truncated, or its contents contradict its metadata."""


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """No model of that name, path or registry entry exists."""


class UnsupportedModelError(LMEngineError, ValueError):
    """The model uses an architecture, tensor type or feature lmengine does not implement."""


class InvalidRequestError(LMEngineError, ValueError):
    """A request (prompt, token ids, options) is malformed."""


class ContextLengthError(InvalidRequestError):
    """A request needs more positions than the model's context allows."""


class SamplingParamsError(InvalidRequestError):
    """A sampling parameter is outside its valid range."""


class KVCacheFullError(LMEngineError, MemoryError):
    """The KV cache pool has too few free pages for the request."""


class DownloadError(LMEngineError, RuntimeError):
    """Fetching a registry model failed."""
