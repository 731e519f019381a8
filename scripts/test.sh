#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the checks: ruff, then the test suite in two runs, both spread over one
# pytest-xdist worker per CPU core and ending with their 15 slowest tests:
#
# 1. every test, each worker computing on one thread (OMP_NUM_THREADS=1: two workers of two threads each on two
#    cores wait on each other, 1.5x slower); the multi-process tests (torchrun, accelerate launch) one after the
#    other (see conftest.MULTIPROCESS);
# 2. the tests that compare separately computed numbers (marked `numerics`) once more, on the default threads. MKL's
#    float32 results depend on the thread count: a test that assumes bit-identity across two computations fails
#    here, not on a user's machine. The multi-process tests are left out: their processes compute on one thread in
#    both runs, against a reference computed on two threads in both (tests/test_large_backbones.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
parallel=(-n auto --dist loadgroup --durations=15)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -q "${parallel[@]}" "$@"
# (exit 5: the tests named on the command line include none of them)
.venv/bin/python -m pytest -q -m "numerics and not multiprocess" "${parallel[@]}" "$@" || [ $? -eq 5 ]
