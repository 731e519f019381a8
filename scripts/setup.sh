#!/usr/bin/env bash
# Create .venv (once) and install rein_peft with the given extras. Keeps any torch already in .venv (a CUDA build
# you installed yourself); otherwise takes PyTorch 2.13.0's CPU build. scripts/constraints.txt pins the transformers
# release the tests and the examples' numbers are measured on.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[${extras}]" -c scripts/constraints.txt
