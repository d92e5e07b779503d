#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv (docs/install.md: tiers, sizes).
#   bash scripts/setup.sh                           the pipeline on CPU (requirements.txt)
#   GPU=1 bash scripts/setup.sh                     on an NVIDIA GPU (requirements-gpu.txt instead)
#   EXTRAS="dev ray litert" bash scripts/setup.sh   plus optional tiers (requirements-<tier>.txt):
#       dev = pytest + ruff, ray = extract.executor: ray, litert = LiteRT for export's .tflite check
# Sourced by scripts/demo.sh and scripts/test.sh (which asks for dev ray litert); safe to run
# again (pip skips what is installed; nothing is reinstalled while the requirement files and
# the choice of tiers are unchanged).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
files=("$ROOT/requirements.txt")
[ "${GPU:-0}" = "1" ] && files=("$ROOT/requirements-gpu.txt")
for tier in ${EXTRAS:-}; do
  if [ ! -f "$ROOT/requirements-$tier.txt" ]; then
    echo "error: EXTRAS: unknown tier '$tier'; choose from: dev ray litert" >&2
    return 1 2>/dev/null || exit 1
  fi
  files+=("$ROOT/requirements-$tier.txt")
done
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "==> creating $ROOT/.venv"
  "$PY" -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.requirements.sha256"
want="$( { echo "GPU=${GPU:-0} EXTRAS=${EXTRAS:-}"; cat "${files[@]}" "$ROOT/requirements-base.txt"; } | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing $(cd "$ROOT" && basename -a "${files[@]}" | tr '\n' ' ')into .venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  # tensorflow-cpu and tensorflow share one package folder: switching between the CPU and the
  # GPU build removes the other first, or the two would overwrite each other's files.
  other=tensorflow; [ "${GPU:-0}" = "1" ] && other=tensorflow-cpu
  # (on other machines than x86_64 the CPU build is `tensorflow` itself: nothing to switch)
  if { [ "$other" = tensorflow-cpu ] || [ "$(uname -m)" = x86_64 ]; } \
      && "$ROOT/.venv/bin/python" -m pip show -q "$other" >/dev/null 2>&1; then
    "$ROOT/.venv/bin/python" -m pip uninstall -q -y "$other"
  fi
  args=(); for f in "${files[@]}"; do args+=(-r "$f"); done
  "$ROOT/.venv/bin/python" -m pip install -q "${args[@]}"
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# DVC would otherwise try to send usage analytics, which an offline machine cannot reach.
export DVC_NO_ANALYTICS=1
