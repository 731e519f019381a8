#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the checks: ruff, the whole test suite, then the tests that compare separately
# computed numbers once more on one thread (MKL's float32 results depend on the thread count: a test that assumes
# bit-identity across two computations fails here, not on a user's machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
# (exit 5: the tests named on the command line include none of them)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -q -m numerics "$@" || [ $? -eq 5 ]
