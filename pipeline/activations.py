"""Boundary activations of the frozen bottom (:mod:`pipeline.split`), one per view of each image,
computed once on an inference engine and kept in a content-addressed float16 cache.

Fine-tuning trains only the top of the network; the bottom's output for a view of an image is
fixed, so it is computed once, batched, on ONNX Runtime on CPU (TensorFlow on a GPU;
:mod:`pipeline.engines`), instead of forward through the frozen layers in every training step.

An entry is keyed by the image's content sha256 and which view it is: the clean image, or
fine-tuning's augmented view ``k`` under ``seed`` (:func:`view_key`), rounded to uint8 as a
decoded image is (as ``extract`` rounds its views). Fine-tuning's views are deliberately *not*
extract's (:func:`pipeline.augment.view_key`): the head was fitted on those, so on them the
stacked model's training loss starts near zero and fine-tuning learns little (measured on
simpsons_dev: epoch-1 training loss 0.030 on extract's views against 0.109 on its own, val
loss 0.426 against 0.391 after 2 epochs; docs/finetune.md). A cache folder per *key* =
everything that decides the values: backbone provenance (weights digest, size, preprocessing),
the boundary layer, engine and version, library versions, storage dtype.

Stored float16: relative rounding 2^-11 (≈ 5e-4), measured harmless (docs/finetune.md), and half
the bytes of float32 (43 KB per view at 14 × 14 × 112). bfloat16 keeps only 8 bits of mantissa
(8x the error) for no gain here.

Layout: ``<root>/<key>/meta.json``, chunks ``<id>.acts.npy`` (M, h, w, c) float16 and
``<id>.keys.npy`` (M, 32) uint8, the keys written last (the commit), each file atomically; as
:mod:`pipeline.feature_cache`, a kill loses at most the chunk being filled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pipeline.augment import augment_uint8
from pipeline.inference import Infer, batched_images
from pipeline.io_utils import atomic_path, write_json
from pipeline.params import AugmentParams, as_dict

log = logging.getLogger(__name__)

FORMAT = 2  # 2: float16 rows scaled by their own max |a| (a float32 scale per row)
DTYPE = np.float16
DIGEST_BYTES = 32
CHUNK = 256  # activations per committed chunk (~11 MB at 14 x 14 x 112 float16)


def cache_key(provenance: dict, boundary: str, engine: dict, versions: dict) -> tuple[str, dict]:
    """(hex key, description) of the activations a bottom computes: what decides their values."""
    desc = {"format": FORMAT, "dtype": np.dtype(DTYPE).name, "boundary": boundary,
            "provenance": {k: v for k, v in provenance.items() if k != "class_names"}, "engine": engine,
            "versions": versions}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32], desc


def view_key(digest: bytes, seed: int, view: int) -> list[int]:
    """The augmentation key (:func:`pipeline.augment.augment`) of fine-tuning's view ``view`` of image ``digest``
    under ``seed``: a function of the image's content, not of its place in the manifest."""
    h = hashlib.sha256(digest + b"finetune-view" + (seed % 2**64).to_bytes(8, "little") + view.to_bytes(4, "little"))
    return [int.from_bytes(h.digest()[i:i + 4], "little") for i in range(0, 16, 4)]


def entry(digest: bytes, view: Optional[int], augment: AugmentParams, seed: int) -> bytes:
    """Cache key of image ``digest``: clean (``view`` None) or view ``view`` under ``augment`` and ``seed``."""
    if view is None:
        return hashlib.sha256(b"clean\0" + digest).digest()
    spec = json.dumps({"augment": as_dict(augment), "seed": seed}, sort_keys=True)
    return hashlib.sha256(b"view\0" + digest + view.to_bytes(4, "little") + spec.encode()).digest()


class ActivationCache:
    """Content-addressed (h, w, c) activations under ``root/key``, stored as row-scaled float16; read as float32."""

    def __init__(self, root: Path, key: str, desc: dict, shape: Sequence[int]):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            write_json(meta, desc)
        self.shape = tuple(int(d) for d in shape)
        self._index: dict[bytes, tuple[str, int]] = {}
        self._maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._known: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Index chunks committed since the last look (by this or another writer)."""
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            chunk = keys_file.name[:-len(".keys.npy")]
            if chunk in self._known:
                continue
            keys = np.load(keys_file)
            for row, k in enumerate(keys):
                self._index.setdefault(k.tobytes(), (chunk, row))
            self._known.add(chunk)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: Sequence[bytes], acts: np.ndarray) -> None:
        """Commit ``acts`` (M, h, w, c) float32 for ``keys`` as one chunk: activations and scales first, keys last.

        Each row is stored as float16 of ``a / max|a|`` with its float32 scale: float16's 11-bit relative
        precision then holds whatever the activations' magnitude (a randomly initialised backbone's are ~1e-8,
        below float16's normal range; others may pass its 65504 maximum).
        """
        if tuple(acts.shape[1:]) != self.shape:
            raise ValueError(f"activations of shape {acts.shape[1:]} for a cache of {self.shape}")
        acts = np.asarray(acts, np.float32)
        scale = np.abs(acts.reshape(len(acts), -1)).max(axis=1) if len(acts) else np.zeros(0, np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        chunk = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        with atomic_path(self.dir / f"{chunk}.acts.npy", suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(acts / scale[:, None, None, None], dtype=DTYPE))
        with atomic_path(self.dir / f"{chunk}.scale.npy", suffix=".npy") as tmp:
            np.save(tmp, scale)
        with atomic_path(self.dir / f"{chunk}.keys.npy", suffix=".npy") as tmp:
            np.save(tmp, np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), DIGEST_BYTES))
        self._known.add(chunk)
        for row, k in enumerate(keys):
            self._index.setdefault(bytes(k), (chunk, row))

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """``(len(keys), h, w, c)`` float32 (KeyError naming the count if any is missing)."""
        missing = sum(1 for k in keys if k not in self._index)
        if missing:
            raise KeyError(f"{missing} of {len(keys)} activations are not in {self.dir}")
        out = np.empty((len(keys), *self.shape), np.float32)
        for i, k in enumerate(keys):
            chunk, row = self._index[k]
            mapped = self._maps.get(chunk)
            if mapped is None:
                mapped = self._maps[chunk] = (np.load(self.dir / f"{chunk}.acts.npy", mmap_mode="r"),
                                              np.load(self.dir / f"{chunk}.scale.npy"))
            arr, scale = mapped
            out[i] = arr[row].astype(np.float32) * scale[row]
        return out


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
                images = augment_uint8(images, self.augment, [view_key(d, self.seed, view) for d in batch])
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
