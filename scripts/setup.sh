#!/usr/bin/env bash
# Create a virtual environment (once) and install rein_peft with the given extras into it. Keeps any torch already
# there (a CUDA build you installed yourself); otherwise takes PyTorch 2.13.0's CPU build.
#
#     bash scripts/setup.sh [extras]            .venv, transformers pinned by scripts/constraints.txt (the release the
#                                               tests and the examples' numbers are measured on); extras: test
#     bash scripts/setup.sh --newest [extras]   .venv-newest, the newest transformers and PEFT within pyproject.toml's
#                                               bounds (scripts/test-newest.sh)
#
# The installs go through uv (from PyPI, into the environment), which installs the ~100 packages of the `test` extra
# in seconds where pip takes minutes. uv does not read pip's configuration: the folders of wheels pip is configured
# to look in (`find-links`, where a machine keeps a CPU build of torch on disk) are passed on to it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
newest=0
if [ "${1:-}" = "--newest" ]; then
    newest=1
    shift
fi
extras="${1:-test}"
venv=$([ "$newest" = 1 ] && echo .venv-newest || echo .venv)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -m uv --version >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
fi
# --compile-bytecode: as pip does, so that imports read .pyc files even where PYTHONDONTWRITEBYTECODE is set (it is on
# this project's machines: without them every Python process compiles torch, transformers and PEFT again; measured,
# `import rein_peft` takes 46 s instead of 11.5 s)
uv=("$venv/bin/python" -m uv pip install --quiet --compile-bytecode --python "$venv/bin/python")
for folder in $("$venv/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
    uv+=(--find-links "$folder")
done
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "${uv[@]}" "torch==2.13.0"
fi
if [ "$newest" = 0 ]; then
    "${uv[@]}" -e ".[${extras}]" -c scripts/constraints.txt
else
    "${uv[@]}" --upgrade-package transformers --upgrade-package peft -e ".[${extras}]"
    # transformers 5.25 requires `kernels` 0.19, which the registry may not offer (the line above then resolves 5.24);
    # it runs without it with USE_HUB_KERNELS=0, so take the newest release itself, its other requirements being 5.24's
    "${uv[@]}" --upgrade-package transformers --no-deps "transformers<6"
fi
