"""Stage 2: run the frozen backbone once over every image → cached features in HDF5.

Only images whose features are not in the content-addressed cache are computed (see
:mod:`pipeline.extraction.cache`): adding 10 images to 2,000 computes 10, and a killed run
resumes from its last committed chunk. Images go through :mod:`pipeline.runtime.inference` (decode
pool a few batches ahead, uint8 into the model) on the engine ``extract.engine`` picks
(:mod:`pipeline.runtime.engines`: ONNX Runtime on CPU, TensorFlow on a GPU). Computed features go to
the cache in chunks and the split files are streamed out of it, so memory stays bounded
whatever the dataset size. On a GPU with TensorFlow: mixed-precision inference (features
stored float32) and ``extract.gpu_batch_size``.

On ONNX Runtime the converted backbone is kept in the cache with the features it computes, so
a run whose converted model is cached and that draws no augmented views (they use TensorFlow's
image ops) never imports TensorFlow: no conversion, no seconds of import.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import h5py

from pipeline.backbones.registry import resolve
from pipeline.core.io import (
    atomic_path,
    file_digests,
    library_versions,
    read_json,
    setup_logging,
    user_errors,
    write_json,
)
from pipeline.core.manifest import SPLITS, read_manifest
from pipeline.core.params import Params, load_params
from pipeline.extraction.cache import FeatureCache, model_key, stored_dim
from pipeline.extraction.features import create_feature_file
from pipeline.extraction.ray_executor import actor_gpus, compute_missing_ray, require_ray
from pipeline.extraction.work import augment_spec, compute_missing, plan_work, view_digest
from pipeline.runtime.engines import backbone_infer, has_gpu, onnx_backbone, plan

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("backbone", "augment", "extract")

# Rows copied from the cache into a split file at a time (bounded memory).
WRITE_BLOCK = 1024


class SplitRows(NamedTuple):
    """One split's images, in manifest order: content digests, label indices, paths relative to data.raw_dir."""
    digests: list[bytes]
    labels: list[int]
    paths: list[str]


def write_split(out: Path, cache: FeatureCache, rows: SplitRows, attrs: dict, views: int = 0, spec: str = "") -> None:
    """Stream one split's features (and ``views`` augmented views per image, drawn as ``spec`` says) from the
    cache into ``out`` (atomically)."""
    digests = rows.digests
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            feats = create_feature_file(h5, cache.dim, rows.labels, rows.paths,
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
    backbone = resolve(params.backbone)
    ex = params.extract
    # The actors' devices, not the driver's, decide engine, precision and batch size under Ray.
    gpu = bool(actor_gpus(ex)) if ex.executor == "ray" else has_gpu()
    run_plan = plan(ex.engine, gpu, ex.batch_size, ex.gpu_batch_size)
    log.info("backbone %s at %dpx on %s with %s, batch %d", backbone.name, backbone.size,
             "GPU" if run_plan.on_gpu else "CPU", run_plan.engine, run_plan.batch_size)
    prov = {**backbone.provenance(), "class_names": list(classes)}
    engine_desc = run_plan.describe()
    key, desc = model_key(prov, engine_desc)

    t0 = time.perf_counter()
    paths = [str(raw_dir / it.path) for it in items]
    digests = file_digests(paths)
    views = ex.augmented_views
    spec = augment_spec(params.augment)
    with tempfile.TemporaryDirectory(prefix="feature-cache-") as scratch:
        root = cache_dir if cache_dir is not None else Path(scratch)
        infer = None
        dim = stored_dim(root, key)
        if dim is None:  # a new namespace: its feature size comes from the model itself
            infer, dim = backbone_infer(backbone, run_plan, root / key)
        cache = FeatureCache(root, key, desc, dim)
        cached_before = sum(1 for d in set(digests) if d in cache)
        work = plan_work(cache, paths, digests, [it.split == "train" for it in items],
                         views if "train" in outs else 0, spec)
        computed, views_computed = sum(w.clean for w in work), sum(len(w.views) for w in work)
        if not work:
            seconds = 0.0
        elif ex.executor == "ray":
            if run_plan.engine == "onnxruntime":
                onnx_backbone(backbone, cache.dir)  # converted once, here; the actors read it from the cache
            seconds = compute_missing_ray(cache, work, params.backbone, ex, params.augment, spec, run_plan)
        else:
            if infer is None:  # converted / loaded / traced before any clock starts: a one-off, not throughput
                infer, _ = backbone_infer(backbone, run_plan, cache.dir)
            seconds = compute_missing(infer, cache, work, params.augment, spec, backbone.size, run_plan.batch_size)
        attrs = {**prov, **library_versions(), **engine_desc, "feature_dim": dim, "cache_key": key}
        for split, out in outs.items():
            rows = [i for i, it in enumerate(items) if it.split == split]
            k = views if split == "train" else 0
            split_rows = SplitRows([digests[i] for i in rows], [index[items[i].label] for i in rows],
                                   [items[i].path for i in rows])
            write_split(out, cache, split_rows,
                        {**attrs, "split": split, "augmented_views": k, "augment": spec if k else ""}, k, spec)
            log.info("%s: %d images%s → %s", split, len(rows), f" + {k} augmented views each" if k else "", out)
    total = time.perf_counter() - t0
    result = {
        "images": len(items), "computed": computed, "reused": cached_before,
        # Forward passes (images and augmented views) per second of the compute loop, decode included.
        "images_per_second": round((computed + views_computed) / seconds, 2) if seconds > 0 else None,
        "compute_seconds": round(seconds, 2), "augmented_views_computed": views_computed,
        "total_seconds": round(total, 2), "device": "GPU" if run_plan.on_gpu else "CPU", "engine": run_plan.engine,
        "precision": run_plan.precision, "batch_size": run_plan.batch_size, "executor": ex.executor,
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
