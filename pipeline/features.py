"""Cached bottleneck features in HDF5, with provenance that readers check.

Layout of ``features/<split>.h5``: ``features`` (N, D) float32, ``labels`` (N,) int64 class
indices, ``paths`` (N,) UTF-8 paths relative to ``data.raw_dir``, and in the train split
``views`` (N, K, D) float32, the features of ``extract.augmented_views`` = K augmented views of
each image (attrs ``augmented_views``, ``augment``); attrs: the provenance of
:func:`pipeline.backbones.backbone_provenance` plus class names and library versions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.io_utils import PipelineError

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


def create_feature_file(h5: h5py.File, n: int, dim: int, labels: Sequence[int], paths: Sequence[str],
                        attrs: dict, chunk_rows: int, views: int = 0) -> h5py.Dataset:
    """Create the datasets of an open (temporary) file; features (and ``views``) are filled in chunks later."""
    feats = h5.create_dataset("features", shape=(n, dim), dtype="float32",
                              chunks=(max(1, min(chunk_rows, n)), dim) if n else None)
    if views:
        h5.create_dataset("views", shape=(n, views, dim), dtype="float32",
                          chunks=(max(1, min(chunk_rows, n)), views, dim) if n else None)
    h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    h5.create_dataset("paths", data=list(paths), dtype=h5py.string_dtype("utf-8"))
    h5.attrs.update(encode_attrs(attrs))
    return feats


def read_features(path: str | Path, expected: dict | None = None) -> FeatureSet:
    """Read a feature file and, when ``expected`` is given, check its provenance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature file not found; run `dvc repro extract`")
    try:
        with h5py.File(path, "r") as h5:
            attrs = decode_attrs(h5.attrs)
            if not attrs.get("complete"):
                raise ProvenanceError(f"{path}: incomplete feature file (extraction was interrupted); rerun extract")
            if expected is not None:
                check_provenance(str(path), attrs, expected, "re-run `dvc repro extract` (or fix params.yaml)")
            return FeatureSet(
                features=h5["features"][...],
                labels=h5["labels"][...],
                paths=[p.decode() if isinstance(p, bytes) else p for p in h5["paths"][...]],
                attrs=attrs,
                views=h5["views"][...] if "views" in h5 else None,
            )
    except (OSError, KeyError) as exc:  # h5py: truncated/corrupt file, or a dataset missing
        raise ProvenanceError(
            f"{path}: not a readable feature file ({exc}); delete it and re-run `dvc repro extract`"
        ) from exc
