"""Extraction benchmark: where the time goes, per inference engine, peak memory, what the cache saves.

    python bench/extract_bench.py [--n 1000] [--batch-size 32] [--rounds 5] [--rss-n 300] [--no-memory]

All figures are measured in this one process, one run, same backbone (params.yaml's),
image size, batch size and N, on real JPEGs from ../shared/datasets/dogs_vs_cats:

  (a)  compute-only ceiling of TensorFlow: the compiled model on an in-memory uint8 batch
  (a') compute-only ceiling of ONNX Runtime on the same batch (the model converted once);
       (a) and (a') interleaved round by round, medians, so machine load hits both alike
  (b)  the real extract code path (pipeline.extract.run, fresh cache) with each engine:
       decode + model + HDF5
  (c)  the seeds' way: Keras ImageDataGenerator.flow_from_directory + model.predict per batch
  decode-only: the input pipeline (thread-pool decode) alone, no model
  stage: `python -m pipeline.extract` (what `dvc repro -s extract` runs) over N fresh images,
       engine auto, start-up, conversion, hashing and HDF5 writes included
  stage, model cached: the same over N other fresh images, the converted backbone already in the
       cache (a run after the first): no TensorFlow import, no conversion
  dvc repro: `dvc repro -s extract` in a scratch DVC project over N fresh images with the converted
       model cached, DVC's own work included (its prepare stage run before, untimed)
  start-up: the stage over 80 fresh images, converted model cached vs not (a fresh cache:
       TensorFlow imported, backbone built and converted), rounds interleaved, medians: the fixed
       cost the cache removes (--startup-only runs just this)
  RSS: peak resident memory of that stage at N and 10N distinct images (skipped by --no-memory)
  head: one logreg head fit on cached features vs one epoch of frozen backbone + head on images
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import yaml
from benchlib import ROOT, SHARED_DATASETS, bench_params, bench_parser, child_env, idle_check, run_child

from pipeline import extract, prepare, train_head
from pipeline.backbones.build import build_backbone
from pipeline.backbones.registry import image_size
from pipeline.core.manifest import SPLITS
from pipeline.core.params import parse_params
from pipeline.data.datasets import decode_ahead, image_dataset
from pipeline.data.images import load_image
from pipeline.extraction.features import read_features
from pipeline.models.heads import build_stacked
from pipeline.runtime.engines import compile_engine

DATA = SHARED_DATASETS / "dogs_vs_cats"


def subset(n: int, dest: Path, tag: bytes = b"") -> Path:
    """dest/<class>/... with n images (half per class); ``tag`` appended makes contents distinct."""
    per = n // 2
    for cls in ("cats", "dogs"):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        files = sorted((DATA / cls).iterdir())
        for i in range(per):
            src = files[i % len(files)]
            out = dest / cls / f"{i:06d}_{src.name}"
            if tag or i >= len(files):
                # JPEG decoders ignore bytes after the end-of-image marker: same pixels, new hash.
                out.write_bytes(src.read_bytes() + tag + str(i).encode())
            else:
                os.symlink(src, out)
    return dest


def params_for(raw: Path, batch_size: int, engine: str = "auto"):
    raw_params = bench_params(raw)
    raw_params["data"].update(val_fraction=0.15, test_fraction=0.15)
    # Clean images only: the figures are images per second (augmented views are extra forward passes).
    raw_params["extract"].update(batch_size=batch_size, engine=engine, augmented_views=0)
    return parse_params(raw_params)


def compute_only(params, n: int, rounds: int) -> tuple[dict[str, float], float]:
    """Compute-only img/s of each engine on one in-memory uint8 batch, rounds interleaved → medians;
    and the max |Δ| between the engines' features on that batch."""
    bb = build_backbone(params.backbone)
    size = image_size(params.backbone)
    bs = params.extract.batch_size
    x = np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
    # The very functions extract runs: uint8 pixels in, cast inside.
    infers = {e: compile_engine(bb, size, e, bs) for e in ("tensorflow", "onnxruntime")}
    outs = {e: f(x) for e, f in infers.items()}  # warm-up
    diff = float(np.max(np.abs(outs["tensorflow"] - outs["onnxruntime"])))
    steps = max(1, n // bs // rounds)
    speeds: dict[str, list[float]] = {e: [] for e in infers}
    for _ in range(rounds):
        for e, f in infers.items():
            t = time.perf_counter()
            for _ in range(steps):
                f(x)
            speeds[e].append(steps * bs / (time.perf_counter() - t))
    return {e: float(np.median(v)) for e, v in speeds.items()}, diff


def decode_only(paths: list[str], size: int, bs: int) -> float:
    t = time.perf_counter()
    n = 0
    for b in (np.stack(x) for x in decode_ahead(paths, bs, lambda p: load_image(p, size))):
        n += int(b.shape[0])
    return n / (time.perf_counter() - t)


def seed_style(raw: Path, params, n: int) -> float:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    bb = build_backbone(params.backbone)
    size = image_size(params.backbone)
    gen = ImageDataGenerator().flow_from_directory(str(raw), target_size=(size, size), batch_size=params.extract
                                                   .batch_size, class_mode=None, shuffle=False)
    bb.predict(next(iter(gen)), verbose=0)  # warm-up, like the others
    gen.reset()
    t = time.perf_counter()
    done = 0
    for batch in gen:
        bb.predict(batch, verbose=0)
        done += len(batch)
        if done >= n:
            break
    return done / (time.perf_counter() - t)


def stage_run(raw: Path, work: Path, batch_size: int, cache: str = "cache") -> tuple[float, float, dict]:
    """`python -m pipeline.extract` in a subprocess on ``work/cache`` (fresh unless ``cache`` names a folder
    already there) → (peak RSS MiB, wall seconds, metrics)."""
    work.mkdir(parents=True, exist_ok=True)
    p = bench_params(raw)
    p["data"].update(val_fraction=0.15, test_fraction=0.15)
    p["extract"].update(batch_size=batch_size, augmented_views=0)  # images per second, as in (a) and (b)
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    prepare.run(raw_dir=raw, manifest=work / "manifest.csv", classes_out=work / "classes.json",
                params=parse_params(p).data)
    cmd = [sys.executable, "-m", "pipeline.extract", "--raw-dir", str(raw), "--manifest", "manifest.csv",
           "--classes", "classes.json", "--train", "train.h5", "--val", "val.h5", "--test", "test.h5",
           "--metrics", "m.json", "--cache-dir", cache]
    child = run_child(cmd, work, child_env(ROOT))
    return child.peak_rss_mib, child.seconds, json.loads((work / "m.json").read_text())


def dvc_stage(raw: Path, warm_raw: Path, work: Path, batch_size: int) -> tuple[float, dict]:
    """`dvc repro -s extract` over ``raw`` in a scratch DVC project whose feature cache already holds the
    converted backbone (an extract over ``warm_raw`` ran first) → (wall seconds, extract metrics)."""
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "data").mkdir()
    shutil.copy(ROOT / "data" / "exclude.txt", work / "data" / "exclude.txt")  # a prepare dep
    p = bench_params(raw)
    p["data"].update(val_fraction=0.15, test_fraction=0.15)
    p["extract"].update(batch_size=batch_size, augmented_views=0)
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    # dvc.yaml's commands run `python`: this interpreter's, as after `source .venv/bin/activate`.
    env = child_env(work, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    quiet = {"cwd": work, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run(dvc + ["init", "--no-scm", "-q"], **quiet)
    subprocess.run(dvc + ["repro", "-s", "prepare"], **quiet)
    # The same params over other images: the converted backbone lands in .cache/features.
    warm = work / "warm"
    prepare.run(raw_dir=warm_raw, manifest=warm / "manifest.csv", classes_out=warm / "classes.json",
                params=parse_params(p).data)
    subprocess.run([sys.executable, "-m", "pipeline.extract", "--raw-dir", str(warm_raw), "--manifest",
                    str(warm / "manifest.csv"), "--classes", str(warm / "classes.json"), "--train",
                    str(warm / "train.h5"), "--val", str(warm / "val.h5"), "--test", str(warm / "test.h5"),
                    "--cache-dir", ".cache/features"], **quiet)
    wall = run_child(dvc + ["repro", "-s", "extract"], work, env).seconds
    return wall, json.loads((work / "reports" / "extract_metrics.json").read_text())


def startup(work: Path, batch_size: int, rounds: int, n: int = 80) -> tuple[float, float]:
    """Median wall seconds of the stage over ``n`` fresh images with the converted model cached, and with a
    fresh cache (conversion and TensorFlow import included), rounds interleaved."""
    cached, fresh = [], []
    stage_run(subset(80, work / "su_warm", tag=b"w"), work / "su_cached", batch_size)  # converts once
    for r in range(rounds):
        _, wall, _ = stage_run(subset(n, work / f"su_c{r}", tag=b"c%d" % r), work / "su_cached", batch_size)
        cached.append(wall)
        _, wall, _ = stage_run(subset(n, work / f"su_f{r}", tag=b"f%d" % r), work / f"su_fresh{r}", batch_size)
        fresh.append(wall)
    return float(np.median(cached)), float(np.median(fresh))


def frozen_epoch_seconds(raw: Path, manifest: Path, params) -> float:
    """One epoch of the stacked model with a frozen backbone, trained on the train images."""
    import keras

    rows = list(csv.DictReader(open(manifest)))
    train = [r for r in rows if r["split"] == "train"]
    classes = sorted({r["label"] for r in rows})
    from pipeline.models.heads import build_head

    model = build_stacked(build_backbone(params.backbone), build_head(1280, len(classes)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    ds = image_dataset([str(raw / r["path"]) for r in train], image_size(params.backbone), params.extract.batch_size,
                       labels=[classes.index(r["label"]) for r in train], shuffle=True, seed=0)
    t = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return time.perf_counter() - t


def cached_stage_runs(work: Path, n: int, batch_size: int, a: float) -> None:
    """Print the whole stage over ``n`` fresh images, run directly and as `dvc repro -s extract`, both with the
    converted model cached, as img/s and as ratios to the TensorFlow compute ceiling ``a`` (img/s)."""
    _, wall, ms = stage_run(subset(n, work / "stage2", tag=b"t"), work / "stage_run", batch_size)
    print(f"     whole stage, converted model cached: {ms['images'] / wall:.1f} img/s = "
          f"{ms['images'] / wall / a:.2f} x (a); its compute {ms['images_per_second']:.1f} img/s = "
          f"{ms['images_per_second'] / a:.2f} x (a)", flush=True)
    wall, md = dvc_stage(subset(n, work / "dvc_imgs", tag=b"d"), subset(80, work / "dvc_warm", tag=b"w"),
                         work / "dvc_project", batch_size)
    print(f"     dvc repro -s extract, converted model cached: {md['images'] / wall:.1f} img/s = "
          f"{md['images'] / wall / a:.2f} x (a); its compute {md['images_per_second']:.1f} img/s = "
          f"{md['images_per_second'] / a:.2f} x (a) (load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    ap = bench_parser(__doc__, "~5-10 min on the idle 2-core machine (estimate from the per-part rates in "
                               "docs/extraction.md and docs/engines.md, not timed as a whole); --stage-only and "
                               "--startup-only ~1-3 min; several times longer under load")
    ap.add_argument("--n", type=int, default=1000, help="images for (a), (b), (c)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a) and (a')")
    ap.add_argument("--rss-n", type=int, default=300, help="N of the memory test (10N is also run)")
    ap.add_argument("--no-memory", action="store_true", help="skip the head timing and the RSS runs")
    ap.add_argument("--startup-rounds", type=int, default=3, help="interleaved rounds of the start-up runs")
    ap.add_argument("--startup-only", action="store_true", help="only the start-up runs")
    ap.add_argument("--stage-only", action="store_true",
                    help="only (a), (a') and the whole-stage runs with the converted model cached")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the benchmark reads real JPEGs from ../shared/datasets")
    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    load = idle_check("extract_bench")
    try:
        if args.startup_only:
            c, f = startup(work, args.batch_size, args.startup_rounds)
            print(f"start-up: the stage over 80 fresh images takes {c:.1f}s with the converted model cached, {f:.1f}s "
                  f"with a fresh cache (TensorFlow import + conversion): {f - c:.1f}s saved, ratio {c / f:.2f} "
                  f"(medians of {args.startup_rounds} interleaved rounds; load {os.getloadavg()[0]:.1f})", flush=True)
            return
        raw = subset(args.n, work / "imgs")
        params = params_for(raw, args.batch_size)
        size = image_size(params.backbone)
        out = work / "run"
        prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
        paths = [str(raw / r["path"]) for r in csv.DictReader(open(out / "manifest.csv"))]
        print(f"backbone {params.backbone.name} {size}px, batch {args.batch_size}, N={len(paths)}, "
              f"{os.cpu_count()} CPUs, TF {tf.__version__}", flush=True)

        ceil, diff = compute_only(params, len(paths), args.rounds)
        a = ceil["tensorflow"]
        print(f"(a)  compute-only, tensorflow   {a:7.1f} img/s", flush=True)
        o = ceil["onnxruntime"]
        print(f"(a') compute-only, onnxruntime  {o:7.1f} img/s  = {o / a:.2f} x (a);  max |feature diff| {diff:.1e}",
              flush=True)
        if args.stage_only:
            _, wall, ms = stage_run(subset(80, work / "warm", tag=b"w"), work / "stage_run", args.batch_size)
            cached_stage_runs(work, args.n, args.batch_size, a)
            return
        d = decode_only(paths, size, args.batch_size)
        print(f"     decode-only (thread pool)  {d:7.1f} img/s", flush=True)
        outs = {s: out / f"{s}.h5" for s in SPLITS}
        for engine in ("tensorflow", "onnxruntime"):
            m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                            params=params_for(raw, args.batch_size, engine), metrics=out / "m.json",
                            cache_dir=out / f"cache-{engine}")
            b = m["images_per_second"]
            print(f"(b)  real extract path, {engine:<11} {b:7.1f} img/s = {b / a:.2f} x (a)  (all of extract: "
                  f"{m['images'] / m['total_seconds']:.1f} img/s incl. hashing + HDF5 writes)", flush=True)
        t = time.perf_counter()
        m2 = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                         params=params_for(raw, args.batch_size, "onnxruntime"), metrics=out / "m2.json",
                         cache_dir=out / "cache-onnxruntime")
        print(f"     rerun, all cached          {m2['images'] / (time.perf_counter() - t):7.1f} img/s "
              f"({m2['computed']} computed)", flush=True)
        c = seed_style(raw, params, len(paths))
        print(f"(c)  seed-style flow_from_directory + predict {c:7.1f} img/s", flush=True)
        _, wall, ms = stage_run(subset(args.n, work / "stage", tag=b"s"), work / "stage_run", args.batch_size)
        print(f"     whole stage (python -m pipeline.extract, engine {ms['engine']}, start-up included): "
              f"{ms['images'] / wall:.1f} img/s = {ms['images'] / wall / a:.2f} x (a)", flush=True)
        # A second stage run on other fresh images, same cache: the converted model is reused.
        cached_stage_runs(work, args.n, args.batch_size, a)
        c, f = startup(work, args.batch_size, args.startup_rounds)
        print(f"     start-up: the stage over 80 fresh images {c:.1f}s with the converted model cached, {f:.1f}s "
              f"with a fresh cache: {f - c:.1f}s saved (medians of {args.startup_rounds} interleaved rounds)",
              flush=True)
        if args.no_memory:
            return

        fs = read_features(outs["train"])
        t = time.perf_counter()
        train_head.fit_logreg(fs, read_features(outs["val"]), 2, params)
        head_s = time.perf_counter() - t
        epoch_s = frozen_epoch_seconds(raw, out / "manifest.csv", params)
        print(f"head fit on cached features  {head_s:.2f}s vs one frozen-backbone epoch on images {epoch_s:.1f}s "
              f"→ {100 * head_s / epoch_s:.2f} % ({len(fs.labels)} train images)", flush=True)

        n1 = args.rss_n
        r1, _, m1 = stage_run(subset(n1, work / "rss1", tag=b"a"), work / "rss1_run", args.batch_size)
        r10, _, m10 = stage_run(subset(10 * n1, work / "rss10", tag=b"b"), work / "rss10_run", args.batch_size)
        print(f"peak RSS  N={n1}: {r1:.0f} MiB ({m1['computed']} computed)   10N={10 * n1}: {r10:.0f} MiB "
              f"({m10['computed']} computed)   ratio {r10 / r1:.3f}", flush=True)
    finally:
        load.finish()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
