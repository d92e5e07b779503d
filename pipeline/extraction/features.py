"""Cached bottleneck features in HDF5, with provenance that readers check.

Layout of ``features/<split>.h5``: ``features`` (N, D) float32, ``labels`` (N,) int64 class
indices, ``paths`` (N,) UTF-8 paths relative to ``data.raw_dir``, and in the train split
``views`` (N, K, D) float32, the features of ``extract.augmented_views`` = K augmented views of
each image (attrs ``augmented_views``, ``augment``); attrs: the provenance of
:func:`pipeline.backbones.build.backbone_provenance` plus class names and library versions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.core.io import PipelineError

# Provenance keys that must match between features and the current params/classes.
CHECKED_KEYS = ("backbone", "weights_id", "weights_sha256", "image_size", "pooling", "preprocessing", "class_names")


class ProvenanceError(PipelineError):
    """An artifact was produced with other settings than the current params."""


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    attrs: dict
    # (N, K, D) float32 features of K augmented views of each image (train split), or None.
    views: "np.ndarray | None" = None


def encode_attrs(attrs: dict) -> dict:
    """HDF5 attrs hold scalars and strings; lists/dicts go in as JSON."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in attrs.items()}


def decode_attrs(raw: h5py.AttributeManager) -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


def check_provenance(source: str, found: dict, expected: dict, fix: str) -> None:
    """Raise :class:`ProvenanceError` listing every key whose value differs."""
    diffs = [
        f"{k}: artifact has {found.get(k)!r}, params give {expected[k]!r}"
        for k in CHECKED_KEYS
        if k in expected and found.get(k) != expected[k]
    ]
    if diffs:
        raise ProvenanceError(f"{source} does not match the current params ({'; '.join(diffs)}); {fix}")


def create_feature_file(h5: h5py.File, dim: int, labels: Sequence[int], paths: Sequence[str],
                        attrs: dict, chunk_rows: int, views: int = 0) -> h5py.Dataset:
    """Create the datasets of an open (temporary) file for ``len(labels)`` images; features (and ``views``)
    are filled in chunks later."""
    n = len(labels)
    feats = h5.create_dataset("features", shape=(n, dim), dtype="float32",
                              chunks=(max(1, min(chunk_rows, n)), dim) if n else None)
    if views:
        h5.create_dataset("views", shape=(n, views, dim), dtype="float32",
                          chunks=(max(1, min(chunk_rows, n)), views, dim) if n else None)
    h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    h5.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype("utf-8"))
    h5.attrs.update(encode_attrs(attrs))
    return feats


def unreadable(path: Path, exc: BaseException) -> ProvenanceError:
    """The error for a feature file h5py cannot read (truncated, corrupt, a dataset missing)."""
    return ProvenanceError(f"{path}: not a readable feature file ({exc}); delete it and re-run `dvc repro extract`")


class FeatureFile:
    """An open feature file whose features are read in row blocks: labels and paths (N small values each)
    are loaded, the (N, D) features and (N, K, D) views are not, so no reader holds all N × D floats.

    Use as a context manager; :func:`open_features` checks the file first.
    """

    def __init__(self, path: Path, h5: h5py.File, attrs: dict):
        self.path = path
        self._h5 = h5
        self.attrs = attrs
        self.labels: np.ndarray = h5["labels"][...]
        self.paths: list[str] = [p.decode() if isinstance(p, bytes) else p for p in h5["paths"][...]]
        self.n, self.dim = (int(d) for d in h5["features"].shape)
        self.n_views = int(h5["views"].shape[1]) if "views" in h5 else 0

    def features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the features → (M, D) float32."""
        return self._h5["features"][start:stop]

    def views(self, start: int = 0, stop: int | None = None) -> "np.ndarray | None":
        """Rows ``start:stop`` of the augmented views → (M, K, D) float32, or None without views."""
        return self._h5["views"][start:stop] if self.n_views else None

    def load(self) -> FeatureSet:
        """The whole file in memory (small splits; L-BFGS needs the whole matrix)."""
        try:
            return FeatureSet(features=self.features(), labels=self.labels, paths=self.paths, attrs=self.attrs,
                              views=self.views())
        except (OSError, KeyError) as exc:
            raise unreadable(self.path, exc) from exc

    def blocks(self, rows: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of consecutive blocks of at most ``rows`` rows covering the file."""
        return [(a, min(a + rows, self.n)) for a in range(0, self.n, max(1, rows))]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_features(path: str | Path, expected: dict | None = None) -> FeatureFile:
    """Open a feature file for block reads and, when ``expected`` is given, check its provenance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file not found; run `dvc repro extract`")
    h5 = None
    try:
        h5 = h5py.File(path, "r")
        attrs = decode_attrs(h5.attrs)
        if not attrs.get("complete"):
            raise ProvenanceError(f"{path}: incomplete feature file (extraction was interrupted); rerun extract")
        if expected is not None:
            check_provenance(str(path), attrs, expected, "re-run `dvc repro extract` (or fix params.yaml)")
        return FeatureFile(path, h5, attrs)
    except BaseException as exc:
        if h5 is not None:
            h5.close()
        if isinstance(exc, (OSError, KeyError)):  # h5py: truncated/corrupt file, or a dataset missing
            raise unreadable(path, exc) from exc
        raise


def read_features(path: str | Path, expected: dict | None = None) -> FeatureSet:
    """Read a whole feature file into memory (small splits, tests) and, with ``expected``, check its provenance."""
    with open_features(path, expected) as ff:
        return ff.load()
