"""A content-addressed cache of per-image features, kept outside DVC's outs.

Why not ``persist: true``: DVC deletes a stage's outs before it runs, and a persisted out
would be hashed in full on every run, pushed to remotes and restored by checkouts as if it
were a result. This cache is a memo instead, like ccache: an entry is keyed by
everything that determines a feature vector, so a hit is by construction the value a
fresh computation would produce, and ``extract`` stays a pure function of its declared
deps and params. Deleting the folder only costs time.

Key = sha256 of the image file's bytes, inside a namespace (one sub-folder) per *model
key* (:func:`model_key`) = hash of what decides a feature vector's value, and nothing else:

- the backbone as resolved (:class:`pipeline.backbones.registry.Backbone`): architecture name, weights
  sha256, image size, pooling, decoder and preprocessing mode;
- the engine, its version (ONNX Runtime's with tf2onnx's, the opset and TensorFlow's, which
  converts), the precision and, on TensorFlow, the batch shape;
- the versions of the libraries on the image → feature path (Pillow, NumPy, TensorFlow, Keras);
- the code that computes features (:func:`code_fingerprint`): the definitions reachable from
  the decoder, the augmentation, the network builder, the converter and the engines' runners
  (:data:`FEATURE_CODE`), by their syntax tree, so comments, docstrings and annotations are not
  part of it, nor is any code the roots do not reach (params.py, fine-tune-only code in
  pipeline/finetuning/, train/eval/export stages).

The namespace also holds the converted backbone that ONNX Runtime runs (``backbone.onnx``,
:func:`pipeline.runtime.engines.onnx_backbone`): the same key decides it.

Layout: ``<cache_dir>/<model_key>/meta.json`` and chunks of ``<id>.feats.npy`` (M, D) float32 under the
chunk-commit protocol of :mod:`pipeline.core.chunks` (keys written last; a kill -9 loses at most the chunk
being filled; several writers, e.g. the actors of ``extract.executor: ray``, may commit into one folder at
once). An image computed by two writers has the same features in both chunks, so either copy serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.core.chunks import META, ChunkStore, write_chunk
from pipeline.core.imports import definition_closure
from pipeline.core.io import dist_version

log = logging.getLogger(__name__)

# The code that decides feature values, as the definitions it starts from: decode, augmented views,
# network builder (and every registered backbone's), ONNX conversion, both engines' runners, the
# clean/view arrangement. Everything they reach in pipeline/ is followed (derived, never listed by
# hand; pipeline.core.imports.definition_closure).
FEATURE_CODE = (
    "pipeline.data.images.load_image",
    "pipeline.data.augment.augment_uint8", "pipeline.data.augment.view_key",
    "pipeline.backbones.build.build_backbone", "pipeline.backbones.registry.REGISTRY",
    "pipeline.runtime.converters.to_onnx",
    "pipeline.runtime.engines.backbone_infer", "pipeline.runtime.engines.onnx_session",
    "pipeline.runtime.engines.session_infer",
    "pipeline.runtime.inference.compile_uint8",
    "pipeline.extraction.work.compute_work",
)
# Reached, but what they return is in the key by value (the resolved backbone's provenance, the
# weights file's digest) or is an error message: their code decides no feature.
FEATURE_CODE_EXCLUDE = (
    "pipeline.backbones.registry.resolve", "pipeline.backbones.registry.Backbone",
    "pipeline.backbones.registry.get_spec", "pipeline.backbones.registry.image_size",
    "pipeline.backbones.weights.keras_cache_dir", "pipeline.backbones.weights.lite_weights_path",
)
# Libraries on the image → feature path whose version is part of the key.
FEATURE_LIBRARIES = ("PIL", "numpy", "tensorflow", "keras")


# The cache's one array per chunk: (M, D) float32 features, ``<id>.feats.npy`` (pipeline.core.chunks).
FEATURES = "feats"


def write_features(key_dir: Path, digests: Sequence[bytes], features: np.ndarray) -> str:
    """Commit ``features`` (M, D) float32 for the image ``digests`` into namespace folder ``key_dir`` without an
    index (a Ray actor's write; :func:`pipeline.core.chunks.write_chunk`) → the chunk id."""
    return write_chunk(key_dir, digests, {FEATURES: np.ascontiguousarray(features, dtype=np.float32)})


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

    ``provenance``: the backbone's (:meth:`pipeline.backbones.registry.Backbone.provenance`); ``engine``:
    ``engine``, ``engine_version``, ``precision`` and ``batch_shape`` of the run
    (:meth:`pipeline.runtime.engines.EnginePlan.describe`): the same image gives features that differ in
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
    meta = Path(root) / key / META
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["feature_dim"])
    except (ValueError, KeyError, TypeError):
        return None


class FeatureCache:
    """Per-image feature vectors of one model key; append-only and crash-safe (:mod:`pipeline.core.chunks`)."""

    def __init__(self, root: Path, key: str, desc: dict, dim: int):
        self.dim = dim
        self._store = ChunkStore(Path(root) / key, (FEATURES,), meta={**desc, "feature_dim": dim})
        self.dir = self._store.dir

    def refresh(self) -> int:
        """Index the chunks committed since the last scan (by other writers too); returns how many."""
        return self._store.refresh()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._store

    def add_chunk(self, digests: Sequence[bytes], features: np.ndarray) -> None:
        """Commit ``features`` (M, D) float32 for ``digests`` as one chunk and index them."""
        if len(digests) == 0:
            return
        self._store.add(digests, {FEATURES: np.ascontiguousarray(features, dtype=np.float32)})

    def get_many(self, digests: Iterable[bytes]) -> np.ndarray:
        """Features for ``digests`` in order → (M, D) float32; chunks are memory-mapped, not loaded."""
        rows = self._store.read(list(digests))[FEATURES]
        return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, self.dim), np.float32)
