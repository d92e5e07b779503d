"""Stage 2: run the frozen backbone once over every image → cached features in HDF5.

    python -m pipeline.extract --raw-dir data/demo --manifest data/prepared/manifest.csv \
        --classes data/prepared/classes.json --train features/train.h5 --val features/val.h5 \
        --test features/test.h5 --metrics reports/extract_metrics.json

Uses the GPU when TensorFlow sees one. Images are decoded in parallel by tf.data and the
model is called directly in a compiled function (not ``predict()`` per batch); features are
written to HDF5 batch by batch, so memory stays bounded whatever the dataset size.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.backbones import backbone_provenance, build_backbone, image_size
from pipeline.datasets import image_dataset
from pipeline.features import create_feature_file
from pipeline.io_utils import atomic_path, library_versions, read_json, setup_logging, write_json
from pipeline.params import Params, load_params
from pipeline.prepare import SPLITS, read_manifest

log = logging.getLogger(__name__)


def feature_provenance(params: Params, classes: list[str]) -> dict:
    """The attrs every feature file carries, and that train_head/finetune check."""
    return {**backbone_provenance(params.backbone), "class_names": classes}


def run(raw_dir: Path, manifest: Path, classes_json: Path, outs: dict[str, Path], params: Params,
        metrics: Path | None = None) -> dict:
    """Extract features for each split in ``outs``; returns {split: images/s}."""
    items = read_manifest(manifest)
    classes = read_json(classes_json)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    size = image_size(params.backbone)
    tf.keras.utils.set_random_seed(params.seed)
    gpus = tf.config.list_physical_devices("GPU")
    log.info("backbone %s at %dpx on %s", params.backbone.name, size, "GPU" if gpus else "CPU")
    backbone = build_backbone(params.backbone)
    dim = int(backbone.output_shape[-1])
    infer = tf.function(lambda x: backbone(x, training=False), reduce_retracing=True)
    attrs = {**feature_provenance(params, classes), **library_versions(), "feature_dim": dim}

    speeds, total_n, total_t = {}, 0, 0.0
    for split, out in outs.items():
        rows = [it for it in items if it.split == split]
        paths = [str(raw_dir / it.path) for it in rows]
        labels = [index[it.label] for it in rows]
        bs = params.extract.batch_size
        t0 = time.perf_counter()
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as h5:
                feats = create_feature_file(h5, len(rows), dim, labels, [it.path for it in rows],
                                            {**attrs, "split": split, "complete": False}, chunk_rows=bs)
                done = 0
                with tqdm(total=len(rows), desc=f"extract {split}", unit="img") as bar:
                    for batch in image_dataset(paths, size, bs):
                        f = infer(batch).numpy().astype(np.float32, copy=False)
                        feats[done:done + len(f)] = f
                        done += len(f)
                        bar.update(len(f))
                if done != len(rows):
                    raise RuntimeError(f"{out}: extracted {done} of {len(rows)} images")
                h5.attrs["complete"] = True
        dt = time.perf_counter() - t0
        speeds[split] = len(rows) / dt if dt > 0 else 0.0
        total_n, total_t = total_n + len(rows), total_t + dt
        log.info("%s: %d images → %s in %.1fs (%.1f img/s)", split, len(rows), out, dt, speeds[split])
    if metrics is not None:
        write_json(metrics, {"images": total_n, "seconds": round(total_t, 2),
                             "images_per_second": round(total_n / total_t, 2) if total_t else 0.0,
                             "device": "GPU" if gpus else "CPU"})
    return speeds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--classes", type=Path, required=True)
    for split in SPLITS:
        ap.add_argument(f"--{split}", type=Path, required=True, help=f"output HDF5 for the {split} split")
    ap.add_argument("--metrics", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    run(args.raw_dir, args.manifest, args.classes, {s: getattr(args, s) for s in SPLITS}, params, args.metrics)


if __name__ == "__main__":
    main()
