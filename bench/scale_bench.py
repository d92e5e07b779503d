"""Scale benchmark: how each stage's wall time and peak memory grow with the number of images.

    python bench/scale_bench.py [--sizes 1000 10000 100000] [--miss-sizes 1000 10000] [--work DIR]

For each size N it generates a folder of N small synthetic JPEGs (4 classes, 64 px, the demo's
shapes) inside a fresh DVC project (`dvc init --no-scm`, this repo's dvc.yaml, params.yaml and
pipeline/), then runs every stage's own command from dvc.yaml, one subprocess each, and
measures wall seconds and peak RSS (`wait4`):

  prepare        scan, decode check, split, manifest
  extract miss   fresh feature cache: decode + backbone + HDF5 (only at --miss-sizes, and to fill
                 the cache at the other sizes, where it is not reported as a measurement)
  extract hit    every feature from the cache: hashing, cache index, HDF5 writes
  head logreg / head dense   train_head with head.type logreg / dense
  dvc commit     DVC hashes data.raw_dir and every out of the three stages (a cold state db)
  dvc status     DVC checks them again (warm state db: what every `dvc repro` pays first)
  dvc repro      a no-op `dvc repro train_head`

The model is not what is measured here (its per-image cost is constant: bench/extract_bench.py),
so the backbone runs at image_size 32 and augmented views are off. The exponent k of each
row is the slope of log(seconds) between the two largest sizes measured (start-up included, so
below 1 where a fixed cost still weighs). 1 M and 10 M images are projected from the two
largest sizes: linearly (fixed cost + the measured cost per extra image) where k <= 1.1, else
as t(N_max) * (N / N_max)^k.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from benchlib import ROOT, bench_params, bench_parser, child_env, idle_check, run_child

from pipeline.demo_data import render

CLASSES = ("circle", "square", "triangle", "stripes")
STAGES = ("prepare", "extract", "train_head")


def generate(raw: Path, n: int, px: int = 64) -> float:
    """``raw/<class>/<i>.jpg``: n JPEGs, one quarter per class → seconds."""
    t = time.perf_counter()
    for ci, label in enumerate(CLASSES):
        (raw / label).mkdir(parents=True, exist_ok=True)
        for i in range(ci, n, len(CLASSES)):
            img = render(label, np.random.default_rng([ci, i]), px)
            img.save(raw / label / f"{i:07d}.jpg", quality=85)
    return time.perf_counter() - t


def setup_project(proj: Path, raw_rel: str, head_type: str = "logreg") -> None:
    proj.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "data").mkdir()
    shutil.copy(ROOT / "data" / "exclude.txt", proj / "data" / "exclude.txt")  # prepare's --exclude, a dep
    write_params(proj, raw_rel, head_type)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, check=True)


def write_params(proj: Path, raw_rel: str, head_type: str) -> None:
    p = bench_params(raw_rel)
    p["backbone"]["image_size"] = 32
    p["extract"]["augmented_views"] = 0
    p["head"]["type"] = head_type
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def stage_cmd(stage: str, raw_rel: str) -> str:
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    cmd = " && ".join(cmd) if isinstance(cmd, list) else cmd  # DVC runs a list's commands in turn
    return cmd.replace("${data.raw_dir}", raw_rel)


def measure(cmd: str | list[str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd`` in the project ``cwd`` → (wall seconds, peak RSS MiB of it and its descendants)."""
    return run_child(cmd, cwd, child_env(cwd, DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2"))


def run_size(n: int, work: Path, misses: bool) -> dict[str, tuple[float, float]]:
    proj = work / f"n{n}"
    raw_rel = "data/raw"
    setup_project(proj, raw_rel)
    gen = generate(proj / raw_rel, n)
    print(f"N={n}: generated in {gen:.0f}s", flush=True)
    rows: dict[str, tuple[float, float]] = {}
    rows["prepare"] = measure(stage_cmd("prepare", raw_rel), proj)
    miss = measure(stage_cmd("extract", raw_rel), proj)
    if misses:
        rows["extract miss"] = miss
    rows["extract hit"] = measure(stage_cmd("extract", raw_rel), proj)
    write_params(proj, raw_rel, "dense")
    rows["head dense"] = measure(stage_cmd("train_head", raw_rel), proj)
    write_params(proj, raw_rel, "logreg")
    rows["head logreg"] = measure(stage_cmd("train_head", raw_rel), proj)
    rows["dvc commit"] = measure(["dvc", "commit", "-f", "-q", *STAGES], proj)
    rows["dvc status"] = measure(["dvc", "status", "-q", *STAGES], proj)
    rows["dvc repro (no-op)"] = measure(["dvc", "repro", "-q", "train_head"], proj)
    for name, (sec, rss) in rows.items():
        print(f"  {name:<18} {sec:8.1f} s {rss:8.0f} MiB", flush=True)
    shutil.rmtree(proj, ignore_errors=True)
    return rows


def main() -> None:
    ap = bench_parser(__doc__, "~10-15 min with the default sizes (estimate, not timed as a whole: the 100 k size "
                               "dominates, generating 100,000 JPEGs, filling the feature cache, then ~3 min of "
                               "stage runs in docs/scaling.md's run)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--miss-sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; images 64 px JPEG, backbone at 32 px, views off; scratch {work}", flush=True)
    with idle_check("scale_bench"):
        results = {n: run_size(n, work, n in args.miss_sizes) for n in sorted(args.sizes)}

    names = list(dict.fromkeys(k for r in results.values() for k in r))
    sizes = sorted(results)
    head = " | ".join(f"{n:,}" for n in sizes)
    print(f"\n| stage | {head} (s / MiB) | k (time) | k (RSS) | 1 M proj. | 10 M proj. |")
    print("|---" * (len(sizes) + 5) + "|")
    for name in names:
        pts = [(n, *results[n][name]) for n in sizes if name in results[n]]
        cells = " | ".join(f"{results[n][name][0]:.1f} / {results[n][name][1]:.0f}" if name in results[n] else "—"
                           for n in sizes)
        if len(pts) >= 2:
            (n1, t1, r1), (n2, t2, r2) = pts[-2], pts[-1]
            k = math.log(t2 / t1) / math.log(n2 / n1)
            kr = math.log(r2 / r1) / math.log(n2 / n1)
            per_image = (t2 - t1) / (n2 - n1)
            proj = [t2 + (m - n2) * per_image if k <= 1.1 else t2 * (m / n2) ** k for m in (1e6, 1e7)]
            tail = f"{k:.2f} | {kr:.2f} | {fmt(proj[0])} | {fmt(proj[1])}"
        else:
            tail = "— | — | — | —"
        print(f"| {name} | {cells} | {tail} |")


def fmt(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


if __name__ == "__main__":
    main()
