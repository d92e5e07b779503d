"""Fine-tuning benchmark: does the fine-tuned model beat the head on real photos?

    python bench/finetune_bench.py                                   # flower_photos, hymenoptera, simpsons_dev
    python bench/finetune_bench.py --datasets simpsons_dev -S finetune.learning_rate=3e-4 -S finetune.epochs=8

For each dataset in ../shared/datasets (read in place, never copied) it runs the real stages
prepare → extract → train_head → finetune → evaluate with params.yaml plus the ``-S key=value``
overrides (values parsed as YAML; the split is params.yaml's, -S data.test_fraction=... to change it),
and prints one table: head test accuracy / log
loss, fine-tuned test accuracy / log loss, the kept epoch, the max val-loss rise of any
fine-tune epoch over the head's (epoch 0) in %, and the fine-tune seconds. Head and
fine-tune use the same split. Features go through the content-addressed cache in
``--work``/features, so extraction is paid once per dataset. One JSON line per run is
appended to ``--work``/results.jsonl.

``--reuse DIR`` takes prepare's, extract's and train_head's outputs from an earlier bench run in
``DIR`` (``DIR/runs/<dataset>/``, copied, never written) and runs only finetune and evaluate: a
fine-tuning change is then compared on the very same split, features and head. The finetune
activation cache is ``--work``/activations.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from benchlib import ROOT, SHARED_DATASETS, bench_params, bench_parser, idle_check

from pipeline import evaluate, extract, finetune, prepare, train_head
from pipeline.core.io import setup_logging
from pipeline.core.manifest import SPLITS
from pipeline.core.params import parse_params

DEFAULT_DATASETS = ("flower_photos", "hymenoptera", "simpsons_dev")


# What --reuse copies from an earlier run: prepare's, extract's and train_head's outputs.
REUSED = ("manifest.csv", "classes.json", "train.h5", "val.h5", "test.h5", "head.keras", "head.json")


def bench_one(name: str, overrides: list[str], work: Path, tag: str, reuse: Path | None = None) -> dict:
    raw_dir = SHARED_DATASETS / name
    params = parse_params(bench_params(raw_dir, overrides))
    out = work / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    feats = {s: out / f"{s}.h5" for s in SPLITS}
    if reuse is not None:
        for f in REUSED:
            shutil.copyfile(reuse / "runs" / name / f, out / f)
    else:
        prepare.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_out=out / "classes.json",
                    params=params.data)
        extract.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=feats,
                    params=params, cache_dir=work / "features")
        train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=out / "classes.json",
                       head_out=out / "head.keras", metrics_out=out / "head_metrics.json",
                       history_out=out / "head_history.csv", params=params)
    t0 = time.perf_counter()
    ft = finetune.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                      val_features=feats["val"], head_path=out / "head.keras", model_out=out / "model.keras",
                      history_out=out / "ft_history.csv", metrics_out=out / "ft_metrics.json", params=params,
                      activation_cache=work / "activations")
    seconds = time.perf_counter() - t0
    report = evaluate.run(raw_dir=raw_dir, manifest=out / "manifest.csv",
                          classes_json=out / "classes.json", test_features=feats["test"],
                          head_path=out / "head.keras", model_path=out / "model.keras",
                          metrics_out=out / "metrics.json", per_class_out=out / "per_class.json",
                          plots_dir=out / "plots", mistakes_out=out / "mistakes.png", params=params)
    with open(out / "ft_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_losses = [float(r["val_loss"]) for r in rows]
    rise = max(0.0, max(v / val_losses[0] - 1 for v in val_losses[1:])) * 100 if len(val_losses) > 1 else 0.0
    result = {
        "tag": tag, "dataset": name, "overrides": overrides,
        "n_test": report["head"]["n"],
        "head_acc": report["head"]["accuracy"], "head_loss": report["head"]["log_loss"],
        "ft_acc": report["finetuned"]["accuracy"], "ft_loss": report["finetuned"]["log_loss"],
        "kept_epoch": ft["best_epoch"], "max_val_rise_pct": rise, "seconds": round(seconds, 1),
        "bottom_seconds": ft.get("bottom_seconds"), "bottom_images_computed": ft.get("bottom_images_computed"),
        "val_losses": val_losses, "val_accs": [float(r["val_accuracy"]) for r in rows],
    }
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "~10 min on the idle machine for the three default sets on a first run (their "
                               "fine-tunes alone 212 + 50 + 25 s in docs/finetune.md, plus extracting every image "
                               "and view once); with --reuse only finetune + evaluate, ~5 min (+ ~5 min for "
                               "dogs_vs_cats)")
    ap.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value (YAML)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "finetune_bench")
    ap.add_argument("--tag", default="")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="earlier bench --work folder: reuse its split, features and head, run finetune + evaluate")
    args = ap.parse_args(argv)
    setup_logging()
    with idle_check("finetune_bench"):
        results = [bench_one(d, args.overrides, args.work, args.tag, args.reuse) for d in args.datasets]
    print(f"\noverrides: {' '.join(args.overrides) or '(params.yaml defaults)'}")
    print("| data (test n) | head acc / log loss | fine-tuned acc / log loss | kept epoch | max val-loss rise | s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dataset']} ({r['n_test']}) | {r['head_acc']:.4f} / {r['head_loss']:.3f} | "
              f"{r['ft_acc']:.4f} / {r['ft_loss']:.3f} | {r['kept_epoch']} | {r['max_val_rise_pct']:+.1f} % | "
              f"{r['seconds']:.0f} |")
        print(f"    val loss per epoch: {' '.join(f'{v:.3f}' for v in r['val_losses'])}")


if __name__ == "__main__":
    main()
