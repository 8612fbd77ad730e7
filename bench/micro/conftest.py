"""Micro-benchmarks of the core kernels: ``pytest bench/micro --benchmark-only``.

lmengine is imported as installed, else from this checkout's python/ (an in-place build).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import lmengine  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
