"""A content-addressed cache of per-image features, kept outside DVC's outs.

Why not ``persist: true``: DVC deletes a stage's outs before it runs, and a persisted out
would be hashed in full on every run, pushed to remotes and restored by checkouts as if it
were a result. This cache is a memo instead, like ccache: an entry is keyed by
everything that determines a feature vector, so a hit is by construction the value a
fresh computation would produce, and ``extract`` stays a pure function of its declared
deps and params. Deleting the folder only costs time.

Key = sha256 of the image file's bytes, inside a namespace (one sub-folder) per *model
key* = hash of backbone, weights sha256, image size, pooling, preprocessing, the inference
engine with its version and precision, TensorFlow / Keras versions and the source of every
module that decodes images, builds the backbone or runs it (:func:`feature_code_files`, derived from the imports).

Layout: ``<cache_dir>/<model_key>/meta.json`` and chunks ``<id>.feats.npy`` (M, D) float32 +
``<id>.keys.npy`` (M, 32) uint8 digests. A chunk is committed when its keys file appears
(written last, atomically), so a kill -9 loses at most the chunk being filled and a
rerun resumes from the committed ones. Chunk ids are unique per writer (time + random), so
several writers (two extract runs, or the actors of ``extract.executor: ray``) can commit
into one folder at once without overwriting each other; an image computed by two writers
has the same features in both chunks, so either copy serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.imports import import_closure
from pipeline.io_utils import atomic_path, sha256_digest, write_json

log = logging.getLogger(__name__)

DIGEST_BYTES = 32
MAX_MAPPED_CHUNKS = 4
# The modules whose code decides the feature values: the backbone builder, the engines and the
# image → output path, and the augmentation of cached views, with everything they import
# (derived, never listed by hand). An edit to any of them invalidates the cache.
FEATURE_CODE = ("pipeline.backbones", "pipeline.engines", "pipeline.inference", "pipeline.augment")


def new_chunk_id() -> str:
    """A chunk id no other writer can pick: nanosecond time (ids sort by age) + 48 random bits."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def write_chunk(key_dir: Path, digests: Sequence[bytes], features: np.ndarray) -> str:
    """Commit ``features`` (M, D) float32 for ``digests`` into ``key_dir``: feats first, keys last (the commit).

    Safe with concurrent writers and kills: each file is written under a temporary name and
    renamed, and the keys file that makes the chunk visible appears only after its features.
    Returns the chunk id.
    """
    chunk = new_chunk_id()
    features = np.ascontiguousarray(features, dtype=np.float32)
    with atomic_path(Path(key_dir) / f"{chunk}.feats.npy", suffix=".npy") as tmp:
        np.save(tmp, features)
    keys = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), DIGEST_BYTES)
    with atomic_path(Path(key_dir) / f"{chunk}.keys.npy", suffix=".npy") as tmp:
        np.save(tmp, keys)
    return chunk


def file_digests(paths: Sequence[str], workers: int = 4) -> list[bytes]:
    """sha256 of every file (hashlib releases the GIL on large buffers, so threads overlap I/O)."""
    with ThreadPoolExecutor(workers) as pool:
        # Minutes on a large or networked folder: a bar like extract's own.
        return list(tqdm(pool.map(sha256_digest, paths, chunksize=64), total=len(paths), desc="hash images",
                         unit="img", file=sys.stderr))


def feature_code_files() -> list[str]:
    """Source files (relative to the project root) that decide the feature values."""
    return import_closure(*FEATURE_CODE)


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over the names and bytes of :func:`feature_code_files`, read below ``root`` (the project)."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in feature_code_files():
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()


def model_key(provenance: dict, versions: dict, engine: dict) -> tuple[str, dict]:
    """(short key, the full description it hashes).

    ``engine``: ``engine``, ``engine_version``, ``precision`` and ``batch_shape`` of the run; the same
    image gives features that differ in the last bits between engines (and, on TensorFlow, between
    batch shapes), so each has its own namespace.
    """
    desc = {
        **{k: provenance[k] for k in ("backbone", "weights_id", "weights_sha256", "image_size", "pooling",
                                      "preprocessing")},
        **{k: engine[k] for k in ("engine", "engine_version", "precision", "batch_shape")},
        "tensorflow": versions["tensorflow"], "keras": versions["keras"], "code": code_fingerprint(),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]
    return key, desc


class FeatureCache:
    """Per-image feature vectors of one model key; append-only, crash-safe."""

    def __init__(self, root: Path, key: str, desc: dict, dim: int):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        meta = self.dir / "meta.json"
        if not meta.is_file():
            write_json(meta, {**desc, "feature_dim": dim})
        self._index: dict[bytes, tuple[int, int]] = {}
        self._chunks: list[Path] = []
        self._seen: set[str] = set()
        # Memory-mapped pages count towards RSS, so only a few chunks stay mapped at a time.
        self._open: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self.refresh()

    def refresh(self) -> int:
        """Index the chunks committed since the last scan (by other writers too); returns how many."""
        added = 0
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            chunk = keys_file.name[:-len(".keys.npy")]
            if chunk in self._seen:
                continue
            self._seen.add(chunk)
            feats_file = self.dir / f"{chunk}.feats.npy"
            keys = np.load(keys_file)
            if not feats_file.is_file() or keys.ndim != 2 or keys.shape[1] != DIGEST_BYTES:
                log.warning("ignoring damaged cache chunk %s", keys_file)
                continue
            slot = len(self._chunks)
            self._chunks.append(feats_file)
            for row, digest in enumerate(keys):
                self._index[digest.tobytes()] = (slot, row)
            added += 1
        return added

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._index

    def add_chunk(self, digests: Sequence[bytes], features: np.ndarray) -> None:
        """Commit ``features`` (M, D) float32 for ``digests`` (see :func:`write_chunk`) and index them."""
        if len(digests) == 0:
            return
        chunk = write_chunk(self.dir, digests, features)
        self._seen.add(chunk)
        slot = len(self._chunks)
        self._chunks.append(self.dir / f"{chunk}.feats.npy")
        for row, d in enumerate(digests):
            self._index[d] = (slot, row)

    def get_many(self, digests: Iterable[bytes]) -> np.ndarray:
        """Features for ``digests`` in order → (M, D) float32; chunks are memory-mapped, not loaded."""
        out = []
        for d in digests:
            slot, row = self._index[d]
            arr = self._open.get(slot)
            if arr is None:
                arr = self._open[slot] = np.load(self._chunks[slot], mmap_mode="r")
                if len(self._open) > MAX_MAPPED_CHUNKS:
                    self._open.popitem(last=False)
            else:
                self._open.move_to_end(slot)
            out.append(np.array(arr[row]))
        return np.stack(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)
