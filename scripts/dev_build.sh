#!/usr/bin/env bash
# Developer build: compiles lmengine._core into BUILD_DIR (default build-dev/ in the tree) and
# places it in python/lmengine/ so `PYTHONPATH=python python -m pytest tests` uses it.
# The module is replaced by rename, so processes that already loaded the old one keep running.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD_DIR=${1:-build-dev}
CUDA=${LMENGINE_CUDA:-OFF}
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLMENGINE_CUDA="$CUDA" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
fi
ninja -C "$BUILD_DIR" -j "${JOBS:-2}" >/dev/null
so=$(ls "$BUILD_DIR"/_core*.so)
dest=python/lmengine/$(basename "$so")
rm -f "$dest.tmp" && cp "$so" "$dest.tmp" && mv -f "$dest.tmp" "$dest"
echo "built $dest"
