#!/usr/bin/env bash
# The main job, end to end on the default model: install, pull, generate, speed table, and the
# CAP report (cost / accuracy / performance with S-MBU / S-MFU and radar diagrams, quick preset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lmengine pull smollm2-135m
lmengine generate -m smollm2-135m "The capital of France is" --max-tokens 32
lmengine generate -m smollm2-135m --no-stream --max-tokens 24 "1+1=" "Once upon a time"
lmengine bench -m smollm2-135m
lmengine bench cap --quick -m smollm2-135m -o bench/results/cap-quick
