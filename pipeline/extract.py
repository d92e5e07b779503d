"""Stage 2: run the frozen backbone once over every image → cached features in HDF5.

Only images whose features are not in the content-addressed cache are computed (see
:mod:`pipeline.feature_cache`): adding 10 images to 2,000 computes 10, and a killed run
resumes from its last committed chunk. Images go through :mod:`pipeline.inference` (decode
pool a few batches ahead, uint8 into the model) on the engine ``extract.engine`` picks
(:mod:`pipeline.engines`: ONNX Runtime on CPU, TensorFlow on a GPU). Computed features go to
the cache in chunks and the split files are streamed out of it, so memory stays bounded
whatever the dataset size. On a GPU with TensorFlow: mixed-precision inference (features
stored float32) and ``extract.gpu_batch_size``.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import h5py
import keras
import tensorflow as tf

from pipeline.backbones import build_backbone, feature_provenance, image_size
from pipeline.engines import compile_engine, engine_version, resolve_engine
from pipeline.feature_cache import FeatureCache, file_digests, model_key
from pipeline.feature_work import augment_spec, compute_missing, plan_work, view_digest
from pipeline.features import create_feature_file
from pipeline.io_utils import atomic_path, library_versions, read_json, setup_logging, user_errors, write_json
from pipeline.manifest import SPLITS, read_manifest
from pipeline.params import Params, load_params
from pipeline.ray_extract import actor_gpus, compute_missing_ray, require_ray

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("backbone", "augment", "extract")

# Rows copied from the cache into a split file at a time (bounded memory).
WRITE_BLOCK = 1024


def write_split(out: Path, cache: FeatureCache, digests: list[bytes], labels: list[int], rel_paths: list[str],
                attrs: dict, views: int = 0, spec: str = "") -> None:
    """Stream one split's features (and ``views`` augmented views per image) from the cache into ``out``
    (atomically)."""
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            feats = create_feature_file(h5, len(digests), cache.dim, labels, rel_paths,
                                        {**attrs, "complete": False}, chunk_rows=WRITE_BLOCK, views=views)
            for start in range(0, len(digests), WRITE_BLOCK):
                block = digests[start:start + WRITE_BLOCK]
                feats[start:start + len(block)] = cache.get_many(block)
                for k in range(views):
                    h5["views"][start:start + len(block), k] = cache.get_many(
                        [view_digest(d, k, spec) for d in block])
            h5.attrs["complete"] = True


def run(*, raw_dir: Path, manifest: Path, classes_json: Path, outs: dict[str, Path], params: Params,
        metrics: Optional[Path] = None, cache_dir: Optional[Path] = None) -> dict:
    """Extract features for each split in ``outs``; returns the metrics dict.

    ``cache_dir`` None: a throw-away cache for this call only (same code path, no reuse).
    """
    if params.extract.executor == "ray":
        require_ray()  # before any work: one line naming the install command
    items = read_manifest(manifest, splits=tuple(outs))
    classes = read_json(classes_json)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    size = image_size(params.backbone)
    gpus = tf.config.list_physical_devices("GPU")
    if params.extract.executor == "ray":
        gpus = actor_gpus(params.extract)  # the actors' devices decide engine, precision and batch
    engine = resolve_engine(params.extract.engine, bool(gpus))
    on_gpu = bool(gpus) and engine == "tensorflow"
    batch_size = params.extract.gpu_batch_size if on_gpu else params.extract.batch_size
    # Tensor cores: half-precision compute, float32 outputs (the compiled function casts back).
    # Any other case runs float32, set explicitly rather than inherited from an earlier policy.
    precision = "mixed_float16" if on_gpu else "float32"
    keras.mixed_precision.set_global_policy(precision)
    log.info("backbone %s at %dpx on %s with %s, batch %d", params.backbone.name, size, "GPU" if on_gpu else "CPU",
             engine, batch_size)
    backbone = build_backbone(params.backbone)
    dim = int(backbone.output_shape[-1])
    versions = library_versions()
    prov = feature_provenance(params.backbone, classes)
    # TensorFlow's features are bit-identical at one batch shape, not across shapes (see
    # pipeline.inference.compile_uint8); ONNX Runtime's at any batch size.
    engine_desc = {"engine": engine, "engine_version": engine_version(engine), "precision": precision,
                   "batch_shape": batch_size + 1 if engine == "tensorflow" else "any"}
    key, desc = model_key(prov, versions, engine_desc)
    attrs = {**prov, **versions, **engine_desc, "feature_dim": dim, "cache_key": key}

    t0 = time.perf_counter()
    paths = [str(raw_dir / it.path) for it in items]
    digests = file_digests(paths)
    views = params.extract.augmented_views
    spec = augment_spec(params.augment)
    with tempfile.TemporaryDirectory(prefix="feature-cache-") as scratch:
        cache = FeatureCache(cache_dir if cache_dir is not None else Path(scratch), key, desc, dim)
        cached_before = sum(1 for d in set(digests) if d in cache)
        work = plan_work(cache, paths, digests, [it.split == "train" for it in items],
                         views if "train" in outs else 0, spec)
        computed, views_computed = sum(w.clean for w in work), sum(len(w.views) for w in work)
        if not work:
            seconds = 0.0
        elif params.extract.executor == "ray":
            seconds = compute_missing_ray(cache, work, params.backbone, params.extract, params.augment, spec,
                                          engine, precision, size, batch_size)
        else:
            # Converted / traced once, before any clock starts: a one-off, not throughput.
            infer = compile_engine(backbone, size, engine, batch_size)
            seconds = compute_missing(infer, cache, work, params.augment, spec, size, batch_size)
        for split, out in outs.items():
            rows = [i for i, it in enumerate(items) if it.split == split]
            k = views if split == "train" else 0
            write_split(out, cache, [digests[i] for i in rows], [index[items[i].label] for i in rows],
                        [items[i].path for i in rows],
                        {**attrs, "split": split, "augmented_views": k, "augment": spec if k else ""}, k, spec)
            log.info("%s: %d images%s → %s", split, len(rows), f" + {k} augmented views each" if k else "", out)
    total = time.perf_counter() - t0
    result = {
        "images": len(items), "computed": computed, "reused": cached_before,
        # Forward passes (images and augmented views) per second of the compute loop, decode included.
        "images_per_second": round((computed + views_computed) / seconds, 2) if seconds > 0 else None,
        "compute_seconds": round(seconds, 2), "augmented_views_computed": views_computed,
        "total_seconds": round(total, 2), "device": "GPU" if on_gpu else "CPU", "engine": engine,
        "precision": precision, "batch_size": batch_size, "executor": params.extract.executor,
    }
    log.info("%d images: %d computed (%s img/s), %d unique reused from the cache, %.1fs in all",
             len(items), computed, result["images_per_second"], cached_before, total)
    if metrics is not None:
        write_json(metrics, result)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--classes", type=Path, required=True)
    for split in SPLITS:
        ap.add_argument(f"--{split}", type=Path, required=True, help=f"output HDF5 for the {split} split")
    ap.add_argument("--metrics", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="content-addressed feature cache kept between runs (not a DVC out)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "extract", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest, classes_json=args.classes,
            outs={s: getattr(args, s) for s in SPLITS}, params=params, metrics=args.metrics,
            cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
