#!/usr/bin/env bash
# Creates .venv (if missing) and installs lmengine with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch is only for tests and references (inference never imports it). Pin the CPU wheel these
# machines carry before anything can ask for a bare `torch`, which would pull a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q scikit-build-core pybind11 ninja cmake
# --no-build-isolation: build with the tools just installed, and let the build see torch's pin.
python -m pip install -q --no-build-isolation ".[test]"
python -c "import lmengine, lmengine._core as c; print('lmengine', lmengine.__version__, 'simd', c.simd(), 'cuda compiled', c.cuda_compiled())"
