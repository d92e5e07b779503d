#!/usr/bin/env bash
# One command: set up .venv with the dev, ray and litert tiers (so every test runs), lint the
# tree (ruff), run the test suite (real-data tests need ../shared/datasets).
#   bash scripts/test.sh [pytest args]        (GPU=1: the GPU build of TensorFlow, as in setup.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${EXTRAS:-dev ray litert}" source scripts/setup.sh
ruff check .
python -m pytest "$@"
