#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the checks: ruff, the whole test suite, then the tests that compare separately
# computed numbers once more on one thread (MKL's float32 results depend on the thread count: a test that assumes
# bit-identity across two computations fails here, not on a user's machine). Both runs spread the tests over one
# pytest-xdist worker per CPU core (the torchrun / accelerate tests one after the other: see conftest.MULTIPROCESS)
# and end with the 15 slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
parallel=(-n auto --dist loadgroup --durations=15)
.venv/bin/python -m pytest -q "${parallel[@]}" "$@"
# (exit 5: the tests named on the command line include none of them); each worker computes on one thread. The
# multiprocess tests' processes compute on one thread in both runs: the first run's comparison covers them
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "numerics and not multiprocess" "${parallel[@]}" \
    "$@" || [ $? -eq 5 ]
