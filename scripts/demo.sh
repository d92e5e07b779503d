#!/usr/bin/env bash
# One command: set up .venv, run the whole pipeline with DVC (its first stage generates the demo images).
#   bash scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh
dvc repro
echo
echo "==> mistakes gallery: reports/mistakes.png; plots: dvc plots show (writes dvc_plots/index.html;"
echo "    offline: bash scripts/plots.sh)"
echo "==> predict: python -m pipeline.predict <image or folder> --out predictions.csv"
echo "    serving export (uint8 pixels in, probabilities + class names out): models/serving/"
python - <<'PY'
import csv
import json

ft = json.load(open("reports/finetune_metrics.json"))
with open("reports/finetune_history.csv", newline="") as f:
    ran = len(list(csv.DictReader(f))) - 1  # row 0 is the head alone
kept = ft["best_epoch"]
print(f"==> fine-tune (reports/finetune_metrics.json): {ran} epochs run, kept epoch {kept}"
      + (" (none lowered the val loss: the head alone is kept)" if kept == 0 else ""))
print(f"    val loss  head {ft['head_only_val_loss']:.4f} -> fine-tuned {ft['val_loss']:.4f};"
      f"  val accuracy {ft['head_only_val_accuracy']:.4f} -> {ft['val_accuracy']:.4f}")
m = json.load(open("reports/metrics.json"))
print("==> test-set metrics (reports/metrics.json; per class: reports/per_class.json):")
for name in ("head", "finetuned"):
    r = m[name]
    print(f"  {name:9s} accuracy {r['accuracy']:.4f}  log loss {r['log_loss']:.4f}  ROC-AUC {r['roc_auc']}  (n={r['n']})")
PY
