#!/usr/bin/env bash
# The tests that depend most on transformers' and PEFT's versions (transformers' adapter API, PEFT's API, save/load,
# the Hub) against the newest transformers the registry offers within pyproject.toml's bounds, in a second virtual
# environment (.venv-newest) without scripts/constraints.txt's pin. .ci/run calls it after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
bash scripts/setup.sh --newest test
"$venv/bin/python" -c "import peft, transformers; print('transformers', transformers.__version__, 'peft', peft.__version__)"
# transformers 5.24+ loads Hub kernels by default when `kernels` is installed; this environment has no `kernels`
export USE_HUB_KERNELS=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_transformers_api.py tests/test_peft_api.py tests/test_save_load.py tests/test_hub.py "$@"
