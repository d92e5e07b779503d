"""Data-audit benchmark: does the audit stage find faults planted in a real image folder?

    python bench/audit_bench.py plant --datasets simpsons_dev flower_photos hymenoptera
    python bench/audit_bench.py plant --datasets simpsons_dev --time      # + train_head, finetune, timed
    python bench/audit_bench.py score --datasets simpsons_dev flower_photos hymenoptera
    python bench/audit_bench.py time --datasets simpsons_dev    # audit vs extract + train_head + finetune

``plant`` copies ``../shared/datasets/<name>`` to ``--work/<name>/raw`` (never touching the
shared set) and plants two faults:

- label flips: 5 % of the images (every split) are moved to another class folder, chosen at
  random; their file name, and so their split (the path hash sees the path inside the class
  folder), does not change;
- cross-split near-duplicates: ``--dups`` test images get a copy in their class folder under a
  name that the split hash sends to train, half re-encoded as JPEG at quality 30-60, half
  resized to 50-80 % and re-encoded at quality 75.

then runs the real prepare and extract stages on the copy (features through the
content-addressed cache ``--cache``, shared between runs: only new files are computed), and with
``--time`` train_head and finetune as well, timing each stage in this one process.

``score`` runs the audit stage on the cached features, and reports per dataset: planted flips
among the top 2 × (number planted) suspects (recall), among the rows the audit flags (recall and
precision), and planted duplicate pairs found among the cross-split pairs (recall, and the
cross-split pairs that are not planted: "false pairs", which may be real duplicates of the set).
One JSON line per dataset is appended to ``--work``/results.jsonl.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from benchlib import SHARED_DATASETS, bench_params, bench_parser, idle_check
from PIL import Image

from pipeline.core.io import setup_logging
from pipeline.core.manifest import SPLITS, read_manifest
from pipeline.core.params import parse_params
from pipeline.prepare import assign_split

DEFAULT_DATASETS = ("simpsons_dev", "flower_photos", "hymenoptera")
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def plant(name: str, dest: Path, flip_fraction: float, n_dups: int, seed: int, data_seed: int,
          val_fraction: float, test_fraction: float) -> dict:
    """Copy ``name`` to ``dest`` with flips and duplicates planted; returns what was planted."""
    src = SHARED_DATASETS / name
    if dest.exists():
        shutil.rmtree(dest)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []  # (class, path inside the class folder)
    for c in classes:
        for f in sorted((src / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXT and not f.name.startswith("."):
                files.append((c, f.relative_to(src / c).as_posix()))
    for c in classes:
        shutil.copytree(src / c, dest / c)
    rng = np.random.default_rng(seed)
    n_flip = int(round(flip_fraction * len(files)))
    flip_idx = set(rng.choice(len(files), n_flip, replace=False).tolist())
    flips = []
    for i in sorted(flip_idx):
        c, rel = files[i]
        new_c = classes[int(rng.choice([j for j in range(len(classes)) if classes[j] != c]))]
        target = dest / new_c / rel
        j = 0
        while target.exists():  # same name in both class folders: keep both, the flip under another name
            j += 1
            target = target.with_name(f"flip{j}_{Path(rel).name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(dest / c / rel, target)
        flips.append({"path": target.relative_to(dest).as_posix(), "true": c, "given": new_c})
    # Duplicates of test images that stayed in their class, each under a name the hash sends to train.
    test_files = [(c, rel) for i, (c, rel) in enumerate(files) if i not in flip_idx
                  and assign_split(data_seed, rel, val_fraction, test_fraction) == "test"]
    dups = []
    for k, i in enumerate(rng.choice(len(test_files), min(n_dups, len(test_files)), replace=False)):
        c, rel = test_files[int(i)]
        img = Image.open(dest / c / rel).convert("RGB")
        if k % 2 == 0:
            kind, quality = "reencoded", int(rng.integers(30, 61))
        else:
            f = float(rng.uniform(0.5, 0.8))
            img = img.resize((max(16, int(img.width * f)), max(16, int(img.height * f))), Image.BICUBIC)
            kind, quality = f"resized x{f:.2f}", 75
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        stem = Path(rel).stem
        j = 0
        while assign_split(data_seed, f"dup{j}_{stem}.jpg", val_fraction, test_fraction) != "train":
            j += 1
        copy = dest / c / f"dup{j}_{stem}.jpg"
        copy.write_bytes(buf.getvalue())
        dups.append({"copy": copy.relative_to(dest).as_posix(), "original": f"{c}/{rel}", "kind": kind,
                     "quality": quality})
    return {"dataset": name, "n_images": len(files), "flips": flips, "dups": dups}


def run_audit(work: Path, out: Path, params):
    """The audit stage over ``work``'s planted set (manifest, classes and features there), reports into ``out``."""
    from pipeline import audit

    return audit.run(raw_dir=work / "raw", manifest=work / "manifest.csv", classes_json=work / "classes.json",
                     features={s: work / f"{s}.h5" for s in SPLITS}, label_issues_out=out / "label_issues.csv",
                     duplicates_out=out / "near_duplicates.csv", outliers_out=out / "outliers.csv",
                     imbalance_out=out / "class_imbalance.csv", metrics_out=out / "audit.json",
                     gallery_dir=out / "gallery", params=params)


def time_training(work: Path, out: Path, params, times: dict, head: bool = True) -> None:
    """train_head (unless ``head`` is False: ``out`` already holds one) and finetune on ``work``'s features,
    outputs into ``out``; their seconds go into ``times``."""
    from pipeline import finetune, train_head

    if head:
        t0 = time.perf_counter()
        train_head.run(train_h5=work / "train.h5", val_h5=work / "val.h5", classes_json=work / "classes.json",
                       head_out=out / "head.keras", metrics_out=out / "head_metrics.json",
                       history_out=out / "head_history.csv", params=params)
        times["train_head"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    finetune.run(raw_dir=work / "raw", manifest=work / "manifest.csv", classes_json=work / "classes.json",
                 val_features=work / "val.h5", head_path=out / "head.keras", model_out=out / "model.keras",
                 history_out=out / "ft_history.csv", metrics_out=out / "ft_metrics.json", params=params)
    times["finetune"] = time.perf_counter() - t0


def cmd_plant(args: argparse.Namespace) -> None:
    from pipeline import extract, prepare

    for name in args.datasets:
        work = args.work / name
        raw_dir = work / "raw"
        params = parse_params(bench_params(raw_dir, args.overrides))
        planted = plant(name, raw_dir, args.flip_fraction, args.dups, args.seed, params.data.seed,
                        params.data.val_fraction, params.data.test_fraction)
        (work / "planted.json").write_text(json.dumps(planted, indent=1))
        times = {}
        t0 = time.perf_counter()
        prepare.run(raw_dir=raw_dir, manifest=work / "manifest.csv", classes_out=work / "classes.json",
                    params=params.data, quarantine=work / "quarantine.csv")
        times["prepare"] = time.perf_counter() - t0
        feats = {s: work / f"{s}.h5" for s in SPLITS}
        t0 = time.perf_counter()
        extract.run(raw_dir=raw_dir, manifest=work / "manifest.csv", classes_json=work / "classes.json",
                    outs=feats, params=params, cache_dir=args.cache)
        times["extract"] = time.perf_counter() - t0
        if args.time:
            time_training(work, work, params, times)
        (work / "stage_seconds.json").write_text(json.dumps({k: round(v, 2) for k, v in times.items()}, indent=1))
        splits = {it.path: it.split for it in read_manifest(work / "manifest.csv")}
        straddle = sum(splits.get(d["copy"]) == "train" and splits.get(d["original"]) == "test"
                       for d in planted["dups"])
        print(f"{name}: {len(planted['flips'])} flips, {len(planted['dups'])} dups ({straddle} train/test), "
              f"stage seconds {times}", flush=True)


def score_one(name: str, work: Path, overrides: list[str], tag: str = "") -> dict:
    from pipeline import audit

    raw_dir = work / "raw"
    params = parse_params(bench_params(raw_dir, overrides))
    planted = json.loads((work / "planted.json").read_text())
    out = work / f"audit{'-' + tag if tag else ''}"
    t0 = time.perf_counter()
    res = run_audit(work, out, params)
    seconds = time.perf_counter() - t0
    pool = res.pool
    row = {p: i for i, p in enumerate(pool.paths)}
    flips = {row[f["path"]] for f in planted["flips"]}
    n = len(flips)
    top = set(np.argsort(res.quality, kind="stable")[:2 * n].tolist())
    flagged = set(res.label_issues.tolist())
    likely = {i for i in flagged if res.quality[i] <= audit.LIKELY_MAX_PROBABILITY}
    planted_pairs = {frozenset((d["copy"], d["original"])) for d in planted["dups"]}
    cross = [(pool.paths[i], pool.paths[j]) for i, j, *_ in res.pairs if pool.splits[i] != pool.splits[j]]
    found = [frozenset(p) for p in cross if frozenset(p) in planted_pairs]
    # A planted pair's similarity, found or not (what the threshold has to clear).
    unit = audit.unit_rows(pool.features)
    sims = sorted(float(unit[row[d["copy"]]] @ unit[row[d["original"]]]) for d in planted["dups"])
    hashes = audit.manifest_hashes(work / "manifest.csv", pool)  # prepare's, as the audit reads them
    h = {q: hashes[row[q]] for d in planted["dups"] for q in (d["copy"], d["original"])}
    hash_bits = sorted(int(np.bitwise_count(h[d["copy"]] ^ h[d["original"]])) for d in planted["dups"])
    by_split = Counter(pool.splits[i] for i in flips)
    result = {
        "dataset": name, "tag": tag, "overrides": overrides,
        "images": len(pool.paths), "planted_flips": n, "flips_by_split": dict(by_split),
        "flips_in_top_2n": len(top & flips), "recall_top_2n": len(top & flips) / n,
        "precision_top_2n": len(top & flips) / (2 * n),
        "flagged": len(flagged), "flips_flagged": len(flagged & flips), "recall_flagged": len(flagged & flips) / n,
        "precision_flagged": len(flagged & flips) / max(1, len(flagged)),
        "likely_flagged": len(likely), "likely_flips": len(likely & flips),
        "planted_dups": len(planted_pairs), "dups_found": len(found), "dup_recall": len(found) / len(planted_pairs),
        "cross_split_pairs": len(cross), "false_cross_pairs": len(cross) - len(found),
        "planted_pair_similarity_min": round(sims[0], 4), "planted_pair_hash_bits": hash_bits,
        "all_pairs": len(res.pairs),
        "outliers": len(res.outliers), "oof_accuracy": res.metrics["out_of_fold_accuracy"],
        "audit_seconds": round(seconds, 2), "params": dict(vars(params.audit)),
    }
    stage_seconds = work / "stage_seconds.json"
    if stage_seconds.is_file():
        result["stage_seconds"] = json.loads(stage_seconds.read_text())
    with open(work.parent / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def cmd_score(args: argparse.Namespace) -> None:
    results = [score_one(name, args.work / name, args.overrides, args.tag) for name in args.datasets]
    print(f"\noverrides: {' '.join(args.overrides) or '(params.yaml defaults)'}")
    print("| data (images) | flips planted | in top 2N (recall) | flagged: recall / precision | "
          "likely: flips / flagged | dups planted | found (recall) | false cross-split pairs | "
          "min planted-pair similarity | max planted-pair hash bits | audit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dataset']} ({r['images']}) | {r['planted_flips']} | {r['flips_in_top_2n']} "
              f"({r['recall_top_2n']:.0%}) | {r['recall_flagged']:.0%} / {r['precision_flagged']:.0%} "
              f"({r['flagged']} flagged) | {r['likely_flips']} / {r['likely_flagged']} | "
              f"{r['planted_dups']} | {r['dups_found']} ({r['dup_recall']:.0%}) | "
              f"{r['false_cross_pairs']} | {r['planted_pair_similarity_min']:.4f} | "
              f"{max(r['planted_pair_hash_bits'])} | {r['audit_seconds']:.1f} |")


def cmd_time(args: argparse.Namespace) -> None:
    """The audit stage's seconds beside train_head's, finetune's and an uncached extract's, in this one process."""
    from pipeline import extract

    for name in args.datasets:
        work = args.work / name
        raw_dir = work / "raw"
        params = parse_params(bench_params(raw_dir, args.overrides))
        out = work / "timing"
        times = {}
        t0 = time.perf_counter()
        run_audit(work, out, params)
        times["audit"] = time.perf_counter() - t0
        time_training(work, out, params, times, head=not (args.reuse_head and (out / "head.keras").is_file()))
        print(f"{name}: {times}", flush=True)
        if args.extract:
            t0 = time.perf_counter()  # a fresh cache: every image and view computed
            extract.run(raw_dir=raw_dir, manifest=work / "manifest.csv", classes_json=work / "classes.json",
                        outs={s: out / f"{s}.h5" for s in SPLITS}, params=params, cache_dir=None)
            times["extract_uncached"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_audit(work, out, params)
        times["audit_again"] = time.perf_counter() - t0
        rest = times.get("extract_uncached", 0.0) + times.get("train_head", 0.0) + times["finetune"]
        share = (times["audit"] + times["audit_again"]) / 2 / rest
        print(f"{name}: {json.dumps({k: round(v, 1) for k, v in times.items()})}; audit (mean of 2) / "
              f"({' + '.join(k for k in ('extract_uncached', 'train_head', 'finetune') if k in times)}) = "
              f"{share:.1%}", flush=True)
        with open(args.work / "timing.jsonl", "a") as f:
            f.write(json.dumps({"dataset": name, **{k: round(v, 2) for k, v in times.items()},
                                "audit_share": round(share, 4)}) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "plant ~2 min for the three default sets (copies, prepare, an extract of every image "
                               "and view; + train_head and finetune, ~1.5-4 min a set, with --time); score under a "
                               "minute (the audit 1-6 s a set); time ~1.5 min on simpsons_dev, ~2 min with --extract "
                               "(docs/audit.md, idle: audit 5.9 s, extract 41.9 s, train_head 15.3 s, finetune "
                               "64.1 s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("plant", "score", "time"):
        p = sub.add_parser(cmd)
        p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
        p.add_argument("--work", type=Path, default=Path("/tmp/i20-audit/bench"))
        p.add_argument("-S", dest="overrides", action="append", default=[], help="params override key=value")
    sub.choices["score"].add_argument("--tag", default="", help="name of this variant (its reports go to audit-TAG/)")
    plant_p = sub.choices["plant"]
    plant_p.add_argument("--cache", type=Path, default=Path("/tmp/i20-audit/cache"))
    plant_p.add_argument("--flip-fraction", type=float, default=0.05)
    plant_p.add_argument("--dups", type=int, default=10)
    plant_p.add_argument("--seed", type=int, default=2026)
    plant_p.add_argument("--time", action="store_true", help="also run train_head and finetune, timed")
    sub.choices["time"].add_argument("--extract", action="store_true",
                                     help="also time an uncached extract (minutes: every image and view)")
    sub.choices["time"].add_argument("--reuse-head", action="store_true",
                                     help="use the head a previous run left (train_head not timed)")
    args = ap.parse_args(argv)
    setup_logging()
    with idle_check(f"audit_bench {args.cmd}"):  # every command times its stages (stage_seconds, audit s)
        {"plant": cmd_plant, "score": cmd_score, "time": cmd_time}[args.cmd](args)


if __name__ == "__main__":
    main()
