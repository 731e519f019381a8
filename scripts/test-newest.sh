#!/usr/bin/env bash
# The tests that depend most on transformers' and PEFT's versions (transformers' adapter API, PEFT's API, save/load,
# the Hub) against the newest transformers the registry offers within pyproject.toml's bounds, in a second virtual
# environment (.venv-newest) without scripts/constraints.txt's pin. .ci/run calls it after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-newest
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
fi
"$venv/bin/python" -m pip install --quiet --upgrade -e ".[test]"
# transformers 5.25 requires `kernels` 0.19, which the registry may not offer (it then resolves 5.24 above); it runs
# without it with USE_HUB_KERNELS=0, so take the newest release itself, its other requirements being 5.24's
"$venv/bin/python" -m pip install --quiet --upgrade --no-deps "transformers<6"
"$venv/bin/python" -c "import peft, transformers; print('transformers', transformers.__version__, 'peft', peft.__version__)"
# transformers 5.24+ loads Hub kernels by default when `kernels` is installed; this environment has no `kernels`
export USE_HUB_KERNELS=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_transformers_api.py tests/test_peft_api.py tests/test_save_load.py tests/test_hub.py "$@"
