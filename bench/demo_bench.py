"""Demo benchmark: does fine-tuning beat the head on the generated demo set, for several seeds?

    python bench/demo_bench.py                       # seeds 0 1 2, params.yaml defaults
    python bench/demo_bench.py --seeds 3 4 -S finetune.epochs=4

For each seed it generates the demo set as the ``demo`` stage does (pipeline/demo_data.py,
``--per-class`` images per class) into ``--work``/data/seed<S>, runs the real stages prepare →
extract → train_head → finetune → evaluate with params.yaml plus the ``-S key=value``
overrides (values parsed as YAML), and prints one table: head and fine-tuned test accuracy /
log loss, the test images fine-tuning gained, the kept epoch, the head → kept val loss, and
the seconds (wall and CPU, this process's threads) of the stages. What docs/demo.md reports
came from ``dvc repro`` with the seed in dvc.yaml's demo command; this script runs the same
stage functions with the same params, so it gives the same metrics. One JSON line per seed
is appended to ``--work``/results.jsonl.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from benchlib import ROOT, bench_params, bench_parser, idle_check

from pipeline import demo_data, evaluate, extract, finetune, prepare, train_head
from pipeline.core.io import setup_logging
from pipeline.core.manifest import SPLITS
from pipeline.core.params import parse_params


def bench_seed(seed: int, per_class: int, overrides: list[str], work: Path) -> dict:
    raw_dir = demo_data.run(out=work / "data" / f"seed{seed}", per_class=per_class, seed=seed)
    params = parse_params(bench_params(raw_dir, overrides))
    out = work / "runs" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    prepare.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    feats = {s: out / f"{s}.h5" for s in SPLITS}
    extract.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=feats,
                params=params, cache_dir=work / "features")
    train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=out / "classes.json",
                   head_out=out / "head.keras", metrics_out=out / "head_metrics.json",
                   history_out=out / "head_history.csv", params=params)
    ft = finetune.run(raw_dir=raw_dir, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                      val_features=feats["val"], head_path=out / "head.keras", model_out=out / "model.keras",
                      history_out=out / "ft_history.csv", metrics_out=out / "ft_metrics.json", params=params)
    report = evaluate.run(raw_dir=raw_dir, manifest=out / "manifest.csv",
                          classes_json=out / "classes.json", test_features=feats["test"],
                          head_path=out / "head.keras", model_path=out / "model.keras",
                          metrics_out=out / "metrics.json", per_class_out=out / "per_class.json",
                          plots_dir=out / "plots", mistakes_out=out / "mistakes.png", params=params)
    head, tuned = report["head"], report["finetuned"]
    result = {
        "seed": seed, "per_class": per_class, "overrides": overrides, "n_test": head["n"],
        "head_acc": head["accuracy"], "head_loss": head["log_loss"],
        "ft_acc": tuned["accuracy"], "ft_loss": tuned["log_loss"],
        "images_gained": round((tuned["accuracy"] - head["accuracy"]) * head["n"]),
        "kept_epoch": ft["best_epoch"], "head_val_loss": ft["head_only_val_loss"], "ft_val_loss": ft["val_loss"],
        "wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
    }
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "~1.5-2 min a seed on the idle 2-core machine, ~5 min for the default seeds 0 1 2 "
                               "(docs/demo.md: the demo's whole dvc repro from nothing, export included, ~2 min "
                               "idle)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=100, help="images per class, as dvc.yaml's demo command")
    ap.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value (YAML)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "demo_bench")
    args = ap.parse_args(argv)
    setup_logging()
    with idle_check("demo_bench"):
        results = [bench_seed(s, args.per_class, args.overrides, args.work) for s in args.seeds]
    print(f"\noverrides: {' '.join(args.overrides) or '(params.yaml defaults)'}")
    print("| seed | head acc / log loss | fine-tuned acc / log loss | test images gained | kept epoch | "
          "val loss head → kept | stages s (wall / CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['head_acc']:.4f} / {r['head_loss']:.3f} | {r['ft_acc']:.4f} / {r['ft_loss']:.3f} | "
              f"{r['images_gained']:+d} of {r['n_test']} | {r['kept_epoch']} | "
              f"{r['head_val_loss']:.3f} → {r['ft_val_loss']:.3f} | {r['wall_s']:.0f} / {r['cpu_s']:.0f} |")


if __name__ == "__main__":
    main()
