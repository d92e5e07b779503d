"""What extract computes, shared by its executors: the features missing from the cache, as work items.

A :class:`Work` item is one distinct image (by content digest) whose clean features and/or
some of its augmented views (:mod:`pipeline.data.augment`, ``extract.augmented_views``) are not
in the feature cache. :func:`plan_work` lists them in manifest order; :func:`compute_work`
turns one decoded batch of them into (cache digests, features), decoding each image once for
its clean pass and all of its views. The local executor (:func:`compute_missing`) and the Ray
actors (:mod:`pipeline.extraction.ray_executor`) run the same :func:`compute_work`, so their features are
the same bits: the engines give an image's output independently of the batch around it
(:func:`pipeline.runtime.inference.compile_uint8`, :func:`pipeline.runtime.engines.compile_onnx`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.core.params import AugmentParams, as_dict
from pipeline.extraction.cache import FeatureCache
from pipeline.runtime.inference import Infer, batched_images

# Features are committed to the cache every this many outputs: what a kill -9 can lose.
CHUNK_IMAGES = 256


def augment_spec(augment: AugmentParams) -> str:
    """The augment params as canonical JSON: part of every view's cache key."""
    return json.dumps(as_dict(augment), sort_keys=True)


def view_digest(digest: bytes, view: int, spec: str) -> bytes:
    """Cache key of view ``view`` of an image: its content digest, the view index and the augment params."""
    return hashlib.sha256(b"view\0" + digest + view.to_bytes(4, "little") + spec.encode()).digest()


@dataclass(frozen=True)
class Work:
    """One image to run: its digest (32-byte sha256), a path to it, whether its clean features are
    missing, and which of its augmented views are."""
    digest: bytes
    path: str
    clean: bool
    views: tuple[int, ...]


def plan_work(cache: FeatureCache, paths: Sequence[str], digests: Sequence[bytes], train: Sequence[bool],
              views: int, spec: str) -> list[Work]:
    """The images with anything missing from ``cache``, once per digest: those with views to compute
    first, then the rest, each in manifest order (so decoded batches are alike and the engine's
    batches full).

    ``paths``, ``digests`` and ``train`` are parallel (one per manifest row); only training rows
    get ``views`` augmented views.
    """
    todo: dict[bytes, tuple[str, bool, set[int]]] = {}
    for path, digest, is_train in zip(paths, digests, train):
        path_, clean, missing = todo.get(digest, (path, False, set()))
        clean = clean or digest not in cache
        if is_train:
            missing |= {k for k in range(views) if view_digest(digest, k, spec) not in cache}
        if clean or missing:
            todo[digest] = (path_, clean, missing)
    work = [Work(d, p, c, tuple(sorted(v))) for d, (p, c, v) in todo.items()]
    return sorted(work, key=lambda w: not w.views)  # stable: manifest order within each group


def compute_work(infer: Infer, images: np.ndarray, work: Sequence[Work], augment: AugmentParams,
                 spec: str) -> tuple[list[bytes], np.ndarray]:
    """``images`` (M, S, S, 3) uint8, decoded from ``work``'s M paths → (cache digests, (R, D) float32 features).

    The clean images go through ``infer`` as they are; view k of an image is drawn from the
    key :func:`pipeline.data.augment.view_key` (digest, k), rounded to uint8 as a decoded image is,
    and goes through the same ``infer``.
    """
    digests: list[bytes] = []
    feats: list[np.ndarray] = []
    if any(w.views for w in work):
        # Views are drawn with TensorFlow's image ops: imported only when there are views to compute.
        from pipeline.data.augment import augment_uint8, view_key
    clean = [i for i, w in enumerate(work) if w.clean]
    if clean:
        feats.append(infer(images[clean]))
        digests += [work[i].digest for i in clean]
    for k in sorted({k for w in work for k in w.views}):
        rows = [i for i, w in enumerate(work) if k in w.views]
        keys = [view_key(work[i].digest, k) for i in rows]
        feats.append(infer(augment_uint8(images[rows], augment, keys)))
        digests += [view_digest(work[i].digest, k, spec) for i in rows]
    return digests, np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def compute_missing(infer: Infer, cache: FeatureCache, work: Sequence[Work], augment: AugmentParams, spec: str,
                    size: int, batch_size: int) -> float:
    """Run ``work`` in this process, committing a cache chunk every :data:`CHUNK_IMAGES` outputs → seconds."""
    pending_d: list[bytes] = []
    pending_f: list[np.ndarray] = []
    start = 0
    t0 = time.perf_counter()
    for images, _ in batched_images([w.path for w in work], size, batch_size, desc="extract"):
        batch = work[start:start + len(images)]
        start += len(images)
        digests, feats = compute_work(infer, images, batch, augment, spec)
        if digests:
            pending_d += digests
            pending_f.append(feats)
        if len(pending_d) >= CHUNK_IMAGES:
            cache.add_chunk(pending_d, np.concatenate(pending_f))
            pending_d, pending_f = [], []
    if pending_d:
        cache.add_chunk(pending_d, np.concatenate(pending_f))
    if start != len(work):
        raise RuntimeError(f"extracted {start} of {len(work)} images")
    return time.perf_counter() - t0
