#!/usr/bin/env bash
# Install size and time of each requirements tier (docs/install.md), in fresh venvs under $WORK.
#   bash bench/install_tiers.sh [WORK]      (default /tmp/install-tiers; removed and rebuilt)
# CPU tiers are installed one after another into one venv, each measured as a delta (seconds,
# MB of `du` on the venv). Then the CI set (runtime + dev + ray + litert) once more in a fresh
# venv with pip's cache warm. The GPU tier is resolved with `pip install --dry-run --report`
# (its CUDA wheels are several GB) and its download size summed from the wheel files' sizes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/install-tiers}"
PY="${PYTHON:-python3}"
rm -rf "$WORK"; mkdir -p "$WORK"
mb() { du -sm "$1" | cut -f1; }
now() { date +%s.%N; }
step() {  # step NAME VENV pip-args...: time one pip install, print the venv's growth
  local name=$1 venv=$2; shift 2
  local before t0 t1
  before=$(mb "$venv"); t0=$(now)
  nice -n 5 "$venv/bin/python" -m pip install -q "$@"
  t1=$(now)
  printf '%-22s %6.0f s  +%5d MB  (venv %d MB)\n' "$name" "$(echo "$t1 - $t0" | bc)" "$(( $(mb "$venv") - before ))" "$(mb "$venv")"
}
echo "python: $("$PY" --version 2>&1); pip cache: $("$PY" -m pip cache dir 2>/dev/null || echo none)"
"$PY" -m venv "$WORK/cpu"
step "pip upgrade" "$WORK/cpu" --upgrade pip
step "runtime (CPU)" "$WORK/cpu" -r "$ROOT/requirements.txt"
step "+ dev" "$WORK/cpu" -r "$ROOT/requirements-dev.txt"
step "+ ray" "$WORK/cpu" -r "$ROOT/requirements-ray.txt"
step "+ litert" "$WORK/cpu" -r "$ROOT/requirements-litert.txt"
rm -rf "$WORK/cpu"
"$PY" -m venv "$WORK/ci"
step "pip upgrade" "$WORK/ci" --upgrade pip
step "CI set, warm cache" "$WORK/ci" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt" \
  -r "$ROOT/requirements-ray.txt" -r "$ROOT/requirements-litert.txt"
rm -rf "$WORK/ci"
"$PY" -m venv "$WORK/gpu"
nice -n 5 "$WORK/gpu/bin/python" -m pip install -q --upgrade pip
nice -n 5 "$WORK/gpu/bin/python" -m pip install -q --dry-run --ignore-installed --report "$WORK/gpu.json" \
  -r "$ROOT/requirements-gpu.txt"
"$PY" - "$WORK/gpu.json" <<'PYEOF'
import json, sys, urllib.request
report = json.load(open(sys.argv[1]))
total, nvidia, tf = 0, 0, 0
for item in report["install"]:
    url = item["download_info"]["url"]
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
        size = int(r.headers["Content-Length"])
    name = item["metadata"]["name"].lower()
    total += size
    nvidia += size if name.startswith("nvidia-") else 0
    tf += size if name == "tensorflow" else 0
print(f"GPU tier (dry run): {len(report['install'])} packages, {total / 1e6:.0f} MB of wheels to download "
      f"(nvidia-* CUDA libraries {nvidia / 1e6:.0f} MB, tensorflow {tf / 1e6:.0f} MB)")
PYEOF
rm -rf "$WORK/gpu"
