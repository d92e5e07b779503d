#!/usr/bin/env bash
# Install size and time of each requirements tier (docs/install.md), in fresh venvs under $WORK.
#   bash bench/install_tiers.sh [WORK]      (default /tmp/install-tiers; removed and rebuilt)
# CPU tiers are installed one after another into one venv, each measured as a delta (seconds,
# MB of `du` on the venv). Then the CI set (runtime + dev + ray + litert) once more in a fresh
# venv with pip's cache warm. The GPU tier is resolved with `pip install --dry-run --report`
# (its CUDA wheels are several GB) and its download size summed from the wheel files' sizes.
# PYTHON=... picks the interpreter (default python3). Needs PyPI (network).
# Takes ~10 min: docs/install.md's run (load 10-14) spent 279 s on the CPU tiers and 464 s on the
# CI set, plus the GPU dry run; mostly unpacking and byte-compiling, so less on an idle machine.
# Measuring protocol: times only from an idle machine (1-minute load average below 1.5 before and
# during, no other job; the load is printed at start and end, with a loud warning at 1.5 or more);
# the sizes do not depend on the load. Every bench script: bench/README.md.
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/install-tiers}"
PY="${PYTHON:-python3}"
load_check() {  # load_check WHEN: uptime's load averages on stderr, a loud warning when the 1-minute one is >= 1.5
  local avg one
  avg=$(uptime | sed 's/.*load averages*: //')
  one=${avg%%[, ]*}
  echo "[install_tiers] load average at $1: $avg" >&2
  if [ "$(echo "$one >= 1.5" | bc)" = 1 ]; then
    echo "!!! NOT IDLE: 1-minute load average $one >= 1.5 at the $1 of install_tiers: its times break the" \
      "measuring protocol (bench/README.md); rerun on an idle machine." >&2
  fi
}
load_check start
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
load_check end
