#!/usr/bin/env bash
# One command: set up .venv, lint the tree (ruff), run the test suite (real-data tests need
# ../shared/datasets).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
ruff check .
python -m pytest "$@"
