"""A content-addressed cache of per-image features, kept outside DVC's outs.

Why not ``persist: true``: DVC deletes a stage's outs before it runs, and a persisted out
would be hashed in full on every run, pushed to remotes and restored by checkouts as if it
were a result. This cache is a memo instead, like ccache: an entry is keyed by
everything that determines a feature vector, so a hit is by construction the value a
fresh computation would produce, and ``extract`` stays a pure function of its declared
deps and params. Deleting the folder only costs time.

Key = sha256 of the image file's bytes, inside a namespace (one sub-folder) per *model
key* (:func:`model_key`) = hash of what decides a feature vector's value, and nothing else:

- the backbone as resolved (:class:`pipeline.registry.Backbone`): architecture name, weights
  sha256, image size, pooling, decoder and preprocessing mode;
- the engine, its version (ONNX Runtime's with tf2onnx's, the opset and TensorFlow's, which
  converts), the precision and, on TensorFlow, the batch shape;
- the versions of the libraries on the image → feature path (Pillow, NumPy, TensorFlow, Keras);
- the code that computes features (:func:`code_fingerprint`): the definitions reachable from
  the decoder, the augmentation, the network builder, the converter and the engines' runners
  (:data:`FEATURE_CODE`), by their syntax tree, so comments, docstrings and annotations are not
  part of it, nor is any code the roots do not reach (params.py, fine-tune-only code in
  backbones.py, train/eval/export stages).

The namespace also holds the converted backbone that ONNX Runtime runs (``backbone.onnx``,
:func:`pipeline.engines.onnx_backbone`): the same key decides it.

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

from pipeline.imports import definition_closure
from pipeline.io_utils import atomic_path, dist_version, sha256_digest, write_json

log = logging.getLogger(__name__)

DIGEST_BYTES = 32
MAX_MAPPED_CHUNKS = 4
# The code that decides feature values, as the definitions it starts from: decode, augmented views,
# network builder (and every registered backbone's), ONNX conversion, both engines' runners, the
# clean/view arrangement. Everything they reach in pipeline/ is followed (derived, never listed by
# hand; pipeline.imports.definition_closure).
FEATURE_CODE = (
    "pipeline.images.load_image",
    "pipeline.augment.augment_uint8", "pipeline.augment.view_key",
    "pipeline.backbones.build_backbone", "pipeline.registry.REGISTRY",
    "pipeline.converters.to_onnx",
    "pipeline.engines.backbone_infer", "pipeline.engines.onnx_session", "pipeline.engines.session_infer",
    "pipeline.inference.compile_uint8",
    "pipeline.feature_work.compute_work",
)
# Reached, but what they return is in the key by value (the resolved backbone's provenance, the
# weights file's digest) or is an error message: their code decides no feature.
FEATURE_CODE_EXCLUDE = (
    "pipeline.registry.resolve", "pipeline.registry.Backbone", "pipeline.registry.get_spec",
    "pipeline.registry.keras_cache_dir", "pipeline.registry.lite0_weights_path",
    "pipeline.efficientnet_lite.default_weights_path",
)
# Libraries on the image → feature path whose version is part of the key.
FEATURE_LIBRARIES = ("PIL", "numpy", "tensorflow", "keras")


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


def feature_code(root: Path | None = None) -> list[tuple[str, str, str]]:
    """(file, definition, code) of everything that computes features (:data:`FEATURE_CODE`), read below
    ``root`` (the project; default this one)."""
    return definition_closure(*FEATURE_CODE, root=root, exclude=FEATURE_CODE_EXCLUDE)


def feature_code_files() -> list[str]:
    """Source files (relative to the project root) holding code that decides the feature values."""
    return sorted({f for f, _, _ in feature_code()})


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over :func:`feature_code`: changes when code that computes features does, not with comments,
    docstrings, annotations, layout or any code features do not depend on."""
    h = hashlib.sha256()
    for file, name, code in feature_code(root):
        h.update(f"{file}:{name}\0{code}\0".encode())
    return h.hexdigest()


def model_key(provenance: dict, engine: dict, libraries: dict | None = None) -> tuple[str, dict]:
    """(short key, the full description it hashes).

    ``provenance``: the backbone's (:meth:`pipeline.registry.Backbone.provenance`); ``engine``:
    ``engine``, ``engine_version``, ``precision`` and ``batch_shape`` of the run
    (:meth:`pipeline.engines.EnginePlan.describe`): the same image gives features that differ in
    the last bits between engines (and, on TensorFlow, between batch shapes), so each has its own
    namespace. ``libraries``: module → version (default: the installed :data:`FEATURE_LIBRARIES`).
    """
    if libraries is None:
        libraries = {m: dist_version(m) for m in FEATURE_LIBRARIES}
    desc = {
        **{k: provenance[k] for k in ("backbone", "weights_id", "weights_sha256", "image_size", "pooling",
                                      "preprocessing")},
        **{k: engine[k] for k in ("engine", "engine_version", "precision", "batch_shape")},
        "libraries": dict(sorted(libraries.items())), "code": code_fingerprint(),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]
    return key, desc


def stored_dim(root: Path, key: str) -> int | None:
    """The feature size recorded in namespace ``key`` under ``root``, None when it has none yet."""
    meta = Path(root) / key / "meta.json"
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["feature_dim"])
    except (ValueError, KeyError, TypeError):
        return None


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
