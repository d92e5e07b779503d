"""Extraction benchmark: where the time goes, peak memory, and what the feature cache saves.

    python bench/extract_bench.py [--n 1000] [--batch-size 32] [--rss-n 300]

All figures are measured in this one process, one run, same backbone (params.yaml's),
image size, batch size and N, on real JPEGs from ../shared/datasets/dogs_vs_cats:

  (a) compute-only ceiling: the compiled model on an in-memory batch of random pixels
  (b) the real extract code path (pipeline.extract.run, fresh cache): decode + model + HDF5
  (c) the seeds' way: Keras ImageDataGenerator.flow_from_directory + model.predict per batch
  decode-only: the input pipeline (thread-pool decode) alone, no model
  RSS: peak resident memory of `python -m pipeline.extract` at N and 10N distinct images
  head: one logreg head fit on cached features vs one epoch of frozen backbone + head on images
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import yaml  # noqa: E402

from pipeline import extract, prepare, train_head  # noqa: E402
from pipeline.backbones import build_backbone, image_size  # noqa: E402
from pipeline.datasets import image_dataset, prefetched_batches  # noqa: E402
from pipeline.features import read_features  # noqa: E402
from pipeline.manifest import SPLITS  # noqa: E402
from pipeline.models import build_stacked  # noqa: E402
from pipeline.params import parse_params  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "dogs_vs_cats"


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


def params_for(raw: Path, batch_size: int):
    raw_params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw_params["data"].update(raw_dir=str(raw), val_fraction=0.15, test_fraction=0.15)
    raw_params["extract"]["batch_size"] = batch_size
    return parse_params(raw_params)


def compute_only(params, n: int) -> float:
    bb = build_backbone(params.backbone)
    size = image_size(params.backbone)
    # The same call as extract's: uint8 pixels in, cast inside the compiled function.
    infer = tf.function(lambda x: bb(tf.cast(x, tf.float32), training=False))
    bs = params.extract.batch_size
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (bs, size, size, 3), dtype=np.uint8))
    infer(x).numpy()
    steps = max(1, n // bs)
    t = time.perf_counter()
    for _ in range(steps):
        infer(x).numpy()
    return steps * bs / (time.perf_counter() - t)


def decode_only(paths: list[str], size: int, bs: int) -> float:
    t = time.perf_counter()
    n = 0
    for b in prefetched_batches(paths, size, bs):
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


def peak_rss_mib(raw: Path, work: Path, batch_size: int) -> tuple[float, dict]:
    work.mkdir(parents=True)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(raw_dir=str(raw), val_fraction=0.15, test_fraction=0.15)
    p["extract"]["batch_size"] = batch_size
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    prepare.run(raw_dir=raw, manifest=work / "manifest.csv", classes_out=work / "classes.json",
                params=parse_params(p).data)
    cmd = [sys.executable, "-m", "pipeline.extract", "--raw-dir", str(raw), "--manifest", "manifest.csv",
           "--classes", "classes.json", "--train", "train.h5", "--val", "val.h5", "--test", "test.h5",
           "--metrics", "m.json", "--cache-dir", "cache"]
    proc = subprocess.Popen(cmd, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"extract failed in {work}")
    return usage.ru_maxrss / 1024, json.loads((work / "m.json").read_text())


def frozen_epoch_seconds(raw: Path, manifest: Path, params) -> float:
    """One epoch of the stacked model with a frozen backbone, trained on the train images."""
    import keras

    rows = list(csv.DictReader(open(manifest)))
    train = [r for r in rows if r["split"] == "train"]
    classes = sorted({r["label"] for r in rows})
    from pipeline.models import build_head

    model = build_stacked(build_backbone(params.backbone), build_head(1280, len(classes)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    ds = image_dataset([str(raw / r["path"]) for r in train], image_size(params.backbone), params.extract.batch_size,
                       labels=[classes.index(r["label"]) for r in train], shuffle=True, seed=0)
    t = time.perf_counter()
    model.fit(ds, epochs=1, verbose=0)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images for (a), (b), (c)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rss-n", type=int, default=300, help="N of the memory test (10N is also run)")
    args = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the benchmark reads real JPEGs from ../shared/datasets")
    work = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    try:
        raw = subset(args.n, work / "imgs")
        params = params_for(raw, args.batch_size)
        size = image_size(params.backbone)
        out = work / "run"
        prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
        paths = [str(raw / r["path"]) for r in csv.DictReader(open(out / "manifest.csv"))]
        print(f"backbone {params.backbone.name} {size}px, batch {args.batch_size}, N={len(paths)}, "
              f"{os.cpu_count()} CPUs, TF {tf.__version__}", flush=True)

        a = compute_only(params, len(paths))
        print(f"(a) compute-only ceiling      {a:7.1f} img/s", flush=True)
        d = decode_only(paths, size, args.batch_size)
        print(f"    decode-only (thread pool)     {d:7.1f} img/s", flush=True)
        outs = {s: out / f"{s}.h5" for s in SPLITS}
        m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                        params=params, metrics=out / "m.json", cache_dir=out / "cache")
        b = m["images_per_second"]
        print(f"(b) real extract path         {b:7.1f} img/s  (all of extract: {m['images'] / m['total_seconds']:.1f} "
              f"img/s incl. hashing + HDF5 writes, {m['total_seconds']}s)", flush=True)
        t = time.perf_counter()
        m2 = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                         params=params, metrics=out / "m2.json", cache_dir=out / "cache")
        print(f"    rerun, all cached         {m2['images'] / (time.perf_counter() - t):7.1f} img/s "
              f"({m2['computed']} computed)", flush=True)
        c = seed_style(raw, params, len(paths))
        print(f"(c) seed-style flow_from_directory + predict {c:7.1f} img/s", flush=True)
        print(f"    (b)/(a) = {b / a:.3f}   (b)/(c) = {b / c:.2f}", flush=True)

        fs = read_features(outs["train"])
        t = time.perf_counter()
        train_head.fit_logreg(fs, read_features(outs["val"]), 2, params)
        head_s = time.perf_counter() - t
        epoch_s = frozen_epoch_seconds(raw, out / "manifest.csv", params)
        print(f"head fit on cached features  {head_s:.2f}s vs one frozen-backbone epoch on images {epoch_s:.1f}s "
              f"→ {100 * head_s / epoch_s:.2f} % ({len(fs.labels)} train images)", flush=True)

        n1 = args.rss_n
        r1, m1 = peak_rss_mib(subset(n1, work / "rss1", tag=b"a"), work / "rss1_run", args.batch_size)
        r10, m10 = peak_rss_mib(subset(10 * n1, work / "rss10", tag=b"b"), work / "rss10_run", args.batch_size)
        print(f"peak RSS  N={n1}: {r1:.0f} MiB ({m1['computed']} computed)   10N={10 * n1}: {r10:.0f} MiB "
              f"({m10['computed']} computed)   ratio {r10 / r1:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
