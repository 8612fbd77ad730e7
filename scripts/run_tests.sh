#!/usr/bin/env bash
# The test command: installs everything into .venv, fetches the test models, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lmengine pull smollm2-135m >/dev/null
lmengine pull gemma3-270m >/dev/null  # tests/test_gemma3.py
# Run from tests/ so the installed package (with its compiled _core) is imported, not ./python.
python -m pytest -q tests "$@"
