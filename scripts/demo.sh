#!/usr/bin/env bash
# One command: set up .venv, run the whole pipeline with DVC (its first stage generates the demo images).
#   bash scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
dvc repro
echo
echo "==> test-set metrics (reports/metrics.json; per class: reports/per_class.json):"
python - <<'PY'
import json
m = json.load(open("reports/metrics.json"))
for name in ("head", "finetuned"):
    r = m[name]
    print(f"  {name:9s} accuracy {r['accuracy']:.4f}  log loss {r['log_loss']:.4f}  ROC-AUC {r['roc_auc']}  (n={r['n']})")
PY
echo "==> mistakes gallery: reports/mistakes.png; plots: dvc plots show (writes dvc_plots/index.html;"
echo "    offline: bash scripts/plots.sh)"
echo "==> predict: python -m pipeline.predict <image or folder> --out predictions.csv"
echo "    serving export (uint8 pixels in, probabilities + class names out): models/serving/"
