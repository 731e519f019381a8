#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: examples/train_image_classification.py. With no arguments it runs
# offline on its embedded default; any arguments go to the example (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
exec .venv/bin/python examples/train_image_classification.py "$@"
