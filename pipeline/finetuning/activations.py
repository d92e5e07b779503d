"""Boundary activations of the frozen bottom (:mod:`pipeline.finetuning.cut`), one per view of each image,
computed once on an inference engine and kept in a content-addressed float16 cache.

Fine-tuning trains only the top of the network; the bottom's output for a view of an image is
fixed, so it is computed once, batched, on ONNX Runtime on CPU (TensorFlow on a GPU;
:mod:`pipeline.runtime.engines`), instead of forward through the frozen layers in every training step.

An entry is keyed by the image's content sha256 and which view it is: the clean image, or
fine-tuning's augmented view ``k`` under ``seed`` (:func:`pipeline.data.augment.view_key` in the
namespace :func:`pipeline.data.augment.finetune_views`), rounded to uint8 as a
decoded image is (as ``extract`` rounds its views). Fine-tuning's views are deliberately *not*
extract's (:data:`pipeline.data.augment.EXTRACT_VIEWS`): the head was fitted on those, so on them the
stacked model's training loss starts near zero and fine-tuning learns little (measured on
simpsons_dev: epoch-1 training loss 0.030 on extract's views against 0.109 on its own, val
loss 0.426 against 0.391 after 2 epochs; docs/benchmarks/finetune.md). A cache folder per *key* =
everything that decides the values: backbone provenance (weights digest, size, preprocessing),
the boundary layer, engine and version, library versions, storage dtype.

Stored float16: relative rounding 2^-11 (≈ 5e-4), measured harmless (docs/benchmarks/finetune.md), and half
the bytes of float32 (43 KB per view at 14 × 14 × 112). bfloat16 keeps only 8 bits of mantissa
(8x the error) for no gain here.

Layout: ``<root>/<key>/meta.json`` and chunks of ``<id>.acts.npy`` (M, h, w, c) float16 with
``<id>.scale.npy`` (M,) float32 under the chunk-commit protocol of :mod:`pipeline.core.chunks` (keys written
last; a kill loses at most the chunk being filled; damaged chunks skipped; bounded memory maps).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pipeline.core.chunks import ChunkStore
from pipeline.core.params import AugmentParams, as_dict
from pipeline.data.augment import augment_uint8, finetune_views, view_key
from pipeline.runtime.engines import Engine, engine_version, has_gpu, resolve_engine
from pipeline.runtime.inference import Infer, batched_images

log = logging.getLogger(__name__)

FORMAT = 2  # 2: float16 rows scaled by their own max |a| (a float32 scale per row)
DTYPE = np.float16
CHUNK = 256  # activations per committed chunk (~11 MB at 14 x 14 x 112 float16)
# Images per pass of the frozen bottom (ONNX Runtime: any batch gives the same bits; TensorFlow: this one shape).
BOTTOM_BATCH = 32


def bottom_engine() -> tuple[Engine, dict]:
    """The engine that runs the frozen bottom (ONNX Runtime on CPU, TensorFlow on a GPU) and its description
    (part of the activation cache key and of the checkpoint fingerprint)."""
    engine = resolve_engine("auto", has_gpu())
    # TensorFlow's outputs are bit-identical at one batch shape only (pipeline.runtime.inference.compile_uint8).
    return engine, {"engine": engine, "engine_version": engine_version(engine),
                    "batch_shape": BOTTOM_BATCH + 1 if engine == "tensorflow" else "any"}


def cache_key(provenance: dict, boundary: str, engine: dict, versions: dict) -> tuple[str, dict]:
    """(hex key, description) of the activations a bottom computes: what decides their values."""
    desc = {"format": FORMAT, "dtype": np.dtype(DTYPE).name, "boundary": boundary,
            "provenance": {k: v for k, v in provenance.items() if k != "class_names"}, "engine": engine,
            "versions": versions}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32], desc


def entry(digest: bytes, view: Optional[int], augment: AugmentParams, seed: int) -> bytes:
    """Cache key of image ``digest``: clean (``view`` None) or view ``view`` under ``augment`` and ``seed``."""
    if view is None:
        return hashlib.sha256(b"clean\0" + digest).digest()
    spec = json.dumps({"augment": as_dict(augment), "seed": seed}, sort_keys=True)
    return hashlib.sha256(b"view\0" + digest + view.to_bytes(4, "little") + spec.encode()).digest()


class ActivationCache:
    """Content-addressed (h, w, c) activations under ``root/key``, stored as row-scaled float16; read as float32."""

    def __init__(self, root: Path, key: str, desc: dict, shape: Sequence[int]):
        self.shape = tuple(int(d) for d in shape)
        self._store = ChunkStore(Path(root) / key, ("acts", "scale"), meta=desc)
        self.dir = self._store.dir

    def refresh(self) -> None:
        """Index chunks committed since the last look (by this or another writer)."""
        self._store.refresh()

    def __contains__(self, key: bytes) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)

    def add(self, keys: Sequence[bytes], acts: np.ndarray) -> None:
        """Commit ``acts`` (M, h, w, c) float32 for ``keys`` as one chunk.

        Each row is stored as float16 of ``a / max|a|`` with its float32 scale: float16's 11-bit relative
        precision then holds whatever the activations' magnitude (a randomly initialised backbone's are ~1e-8,
        below float16's normal range; others may pass its 65504 maximum).
        """
        if tuple(acts.shape[1:]) != self.shape:
            raise ValueError(f"activations of shape {acts.shape[1:]} for a cache of {self.shape}")
        acts = np.asarray(acts, np.float32)
        scale = np.abs(acts.reshape(len(acts), -1)).max(axis=1) if len(acts) else np.zeros(0, np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        self._store.add(keys, {"acts": np.ascontiguousarray(acts / scale[:, None, None, None], dtype=DTYPE),
                               "scale": scale})

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """``(len(keys), h, w, c)`` float32 (KeyError naming the count if any is missing)."""
        if not keys:
            return np.empty((0, *self.shape), np.float32)
        rows = self._store.read(keys)
        return np.stack(rows["acts"]).astype(np.float32) * np.stack(rows["scale"])[:, None, None, None]


class Activations:
    """The activations of one run: ``cache`` filled on demand by ``make_infer()``'s engine (built on first need,
    so a run whose activations are all cached converts nothing)."""

    def __init__(self, cache: ActivationCache, make_infer: Callable[[], Infer], augment: AugmentParams, seed: int,
                 size: int, batch_size: int):
        self.cache = cache
        self._make_infer = make_infer
        self._infer: Optional[Infer] = None
        self.augment = augment
        self.seed = seed
        self.size = size
        self.batch_size = batch_size
        self.computed = 0
        self.seconds = 0.0

    def keys(self, digests: Sequence[bytes], view: Optional[int]) -> list[bytes]:
        return [entry(d, view, self.augment, self.seed) for d in digests]

    def ensure(self, paths: Sequence[str], digests: Sequence[bytes], view: Optional[int]) -> int:
        """Compute and cache the activations of ``view`` (None: clean) of every image not cached yet → how many.

        ``paths`` and ``digests`` are parallel; an image present twice is computed once.
        """
        todo: dict[bytes, str] = {}
        for path, d in zip(paths, digests):
            if d not in todo and entry(d, view, self.augment, self.seed) not in self.cache:
                todo[d] = path
        if not todo:
            return 0
        if self._infer is None:
            self._infer = self._make_infer()
        t0 = time.perf_counter()
        work = list(todo.items())
        pending_k: list[bytes] = []
        pending_a: list[np.ndarray] = []
        start = 0
        what = "clean" if view is None else f"view {view}"
        for images, _ in batched_images([p for _, p in work], self.size, self.batch_size, desc=f"bottom ({what})"):
            batch = [d for d, _ in work[start:start + len(images)]]
            start += len(images)
            if view is not None:
                namespace = finetune_views(self.seed)
                images = augment_uint8(images, self.augment, [view_key(d, view, namespace) for d in batch])
            pending_k += self.keys(batch, view)
            pending_a.append(np.asarray(self._infer(images), np.float32))
            if len(pending_k) >= CHUNK:
                self.cache.add(pending_k, np.concatenate(pending_a))
                pending_k, pending_a = [], []
        if pending_k:
            self.cache.add(pending_k, np.concatenate(pending_a))
        seconds = time.perf_counter() - t0
        self.computed += len(work)
        self.seconds += seconds
        log.info("bottom: %d activations (%s) in %.1fs (%.1f img/s)", len(work), what, seconds, len(work) / seconds)
        return len(work)
