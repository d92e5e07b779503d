"""``extract.executor: ray``: the features missing from the cache, computed by Ray Data actors.

The driver (the ``extract`` stage) sends only work items (:class:`pipeline.extraction.work.Work`:
file path, sha256 digest, which outputs are missing); each actor (:class:`FeatureActor`)
loads the backbone on the run's engine once (on ONNX Runtime the model the driver converted
into the cache, without TensorFlow; on TensorFlow built and traced), decodes its paths itself with
the local executor's decode pool, runs :func:`pipeline.extraction.work.compute_work` (the clean
image and its augmented views, exactly as the local executor does) and commits every Ray
batch as one chunk of the content-addressed cache (:func:`pipeline.extraction.cache.write_features`:
unique chunk names, keys written last). Pixels never pass through the driver, features never
through Ray's object store.

Why the features equal the local executor's bit for bit: both engines give an image's output
independently of the other images in its batch and of the batch size (TensorFlow because
every pass runs at one padded shape, :func:`pipeline.runtime.inference.compile_uint8`; ONNX Runtime by
itself), so Ray Data's reordering and re-batching at block edges (batches of one appear)
cannot change a feature. One Ray row still holds one model batch of work, so an actor runs
full batches. tests/test_ray_extract.py checks the split files are the same bytes.

Faults: Ray Data restarts a dead actor and retries its batch (its default for actor pools);
a killed actor leaves at most a temporary file, never a visible torn chunk. After the run
the driver re-reads the cache and fails if any output is missing; a rerun computes only what
is missing.

The cache folder and the images must be readable (the cache also writable) at the same
absolute paths on every Ray node: a shared file system on a cluster.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from pipeline.core.io import PipelineError
from pipeline.core.params import AugmentParams, BackboneParams, ExtractParams, RayParams
from pipeline.extraction.cache import FeatureCache, write_features
from pipeline.extraction.work import Work, compute_work, view_digest
from pipeline.runtime.engines import EnginePlan

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pipeline package
# Ray is an optional install tier (docs/install.md): its wheels and pyarrow/pandas are ~0.5 GB.
RAY_INSTALL = "pip install -r requirements-ray.txt"


def require_ray() -> None:
    """Stop with one line naming the install command when Ray Data is not installed.

    Called before any work, so a run asked for ``extract.executor: ray`` never half-starts
    on a machine without Ray. Only looks the packages up (importing Ray takes seconds).
    """
    import importlib.util

    missing = [name for name in ("ray", "pyarrow", "pandas") if importlib.util.find_spec(name) is None]
    if missing:
        raise PipelineError(f"extract.executor: ray needs Ray Data, which is not installed (missing: "
                            f"{', '.join(missing)}): run `{RAY_INSTALL}` (or `EXTRAS=ray bash scripts/setup.sh`), "
                            "or set extract.executor: local")


def actor_gpus(params: ExtractParams) -> list[str]:
    """The GPUs an actor gets, as extract's device check sees them: non-empty when ``gpus_per_actor`` > 0.

    The actors' devices, not the driver's, decide engine, precision and batch size (and so the cache key).
    """
    return ["GPU"] if params.ray.gpus_per_actor > 0 else []


class FeatureActor:
    """One Ray Data actor: the backbone built and compiled once, then Ray batches of work → committed chunks."""

    def __init__(self, backbone: BackboneParams, run: EnginePlan, threads: int, augment: AugmentParams, spec: str,
                 key_dir: str):
        from pipeline.backbones.registry import resolve
        from pipeline.runtime.engines import backbone_infer

        b = resolve(backbone)
        # The CPUs Ray gave this actor, not the host's: actors side by side must not oversubscribe.
        self.infer, _ = backbone_infer(b, run, Path(key_dir), threads)
        self.size, self.augment, self.spec = b.size, augment, spec
        self.key_dir = Path(key_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """R rows, each one model batch of work (``paths``, ``digests``, ``clean``, ``views``) → one row:
        the id of the chunk that now holds their outputs, and how many outputs."""
        from pipeline.runtime.inference import batched_images

        digests: list[bytes] = []
        feats: list[np.ndarray] = []
        for paths, ds, clean, views in zip(batch["paths"], batch["digests"], batch["clean"], batch["views"]):
            work = [Work(bytes(d), str(p), bool(c), tuple(int(k) for k in v))
                    for p, d, c, v in zip(paths, ds, clean, views)]
            for images, _ in batched_images([w.path for w in work], self.size, len(work), progress=False):
                if len(images) != len(work):
                    raise RuntimeError(f"decoded {len(images)} of {len(work)} images")
                d, f = compute_work(self.infer, images, work, self.augment, self.spec)
                digests += d
                feats.append(f)
        chunk = write_features(self.key_dir, digests, np.concatenate(feats))
        return {"chunk": np.array([chunk]), "outputs": np.array([len(digests)], np.int64)}


def job_runtime_env() -> dict:
    """Ray's job-level runtime env: workers import this package from its source, uploaded with the job,
    so a cluster needs only the libraries of requirements.txt. Pass it to your own ``ray.init``."""
    return {"py_modules": [str(PACKAGE_DIR)]}


def connect(params: RayParams) -> bool:
    """Join ``extract.ray.address`` / ``$RAY_ADDRESS``, else start Ray here; True when this call started it.

    An already initialized Ray (a notebook, a test) is used as it is: its ``ray.init`` must have
    been given :func:`job_runtime_env`.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    address = params.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=job_runtime_env(), logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, runtime_env=job_runtime_env(), logging_level=logging.WARNING)
    return True


def compute_missing_ray(cache: FeatureCache, work: Sequence[Work], backbone: BackboneParams, params: ExtractParams,
                        augment: AugmentParams, spec: str, run: EnginePlan) -> float:
    """Run ``work`` (:func:`pipeline.extraction.work.plan_work`) on Ray actors → seconds.

    On return every output of ``work`` is in ``cache`` (re-read from disk), or this raises.
    """
    require_ray()
    import pyarrow as pa
    import ray

    rp = params.ray
    started = connect(rp)
    t0 = time.perf_counter()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, the driver's, in DVC's output
        # Rows = model batches of work; a Ray batch (one chunk) holds about extract.ray.batch_size
        # images, and one block per Ray batch keeps every actor fed.
        b = run.batch_size
        rows = max(1, rp.batch_size // b)
        blocks = []
        for start in range(0, len(work), rows * b):
            cuts = [work[i:i + b] for i in range(start, min(start + rows * b, len(work)), b)]
            blocks.append(pa.table({
                "paths": pa.array([[os.path.abspath(w.path) for w in c] for c in cuts], pa.list_(pa.string())),
                "digests": pa.array([[w.digest for w in c] for c in cuts], pa.list_(pa.binary())),
                "clean": pa.array([[w.clean for w in c] for c in cuts], pa.list_(pa.bool_())),
                "views": pa.array([[list(w.views) for w in c] for c in cuts], pa.list_(pa.list_(pa.int32())))}))
        total = sum(int(w.clean) + len(w.views) for w in work)
        ds = ray.data.from_arrow(blocks).map_batches(
            FeatureActor, batch_size=rows, batch_format="numpy",
            fn_constructor_kwargs={"backbone": backbone, "run": run, "threads": max(1, int(rp.cpus_per_actor)),
                                   "augment": augment, "spec": spec, "key_dir": str(cache.dir.resolve())},
            compute=ray.data.ActorPoolStrategy(size=rp.actors), num_cpus=rp.cpus_per_actor,
            num_gpus=rp.gpus_per_actor or None,
            runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})  # TF's C++ logs stay out of DVC's output
        with tqdm(total=total, desc="extract (ray)", unit="img", file=sys.stderr) as bar:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(int(out["outputs"].sum()))
    finally:
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    cache.refresh()
    missing = sum(1 for w in work if w.clean and w.digest not in cache)
    missing += sum(1 for w in work for k in w.views if view_digest(w.digest, k, spec) not in cache)
    if missing:
        raise RuntimeError(f"Ray extraction left {missing} of {total} outputs out of the cache {cache.dir}; "
                           "rerun extract (it computes only what is missing)")
    log.info("ray: %d outputs on %d actors (%s per actor, %s) in %.1fs", total, rp.actors,
             f"{rp.gpus_per_actor:g} GPU" if actor_gpus(params) else f"{rp.cpus_per_actor:g} CPU", run.engine, seconds)
    return seconds
