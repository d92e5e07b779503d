"""The split manifest that prepare writes and every later stage reads.

``manifest.csv``: one row per usable image, ``path`` (relative to ``data.raw_dir``, POSIX
separators; ``../`` for images of ``data.test_dir`` outside it), ``label`` (its class folder),
``split`` (train, val or test), ``phash`` (16 hex digits, :mod:`pipeline.data.near_copies`) and
``group`` (the key of its group of related images, which share a split; empty when alone),
sorted by split, class, path. A manifest from before the last two columns reads with them empty.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline.core.io import write_csv

SPLITS = ("train", "val", "test")
HEADER = ("path", "label", "split", "phash", "group")


@dataclass(frozen=True)
class Item:
    path: str  # relative to raw_dir, POSIX separators
    label: str
    split: str
    phash: str = ""  # 16 hex digits; "" in a manifest written before hashes
    group: str = ""


def write_manifest(path: Path, items: Sequence[Item]) -> None:
    write_csv(path, HEADER, [(it.path, it.label, it.split, it.phash, it.group) for it in items])


def read_manifest(path: Path, splits: Sequence[str] = SPLITS) -> list[Item]:
    """The manifest's items whose split is in ``splits``, in file order."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run `dvc repro prepare`")
    with open(path, newline="", encoding="utf-8") as fh:
        return [Item(r["path"], r["label"], r["split"], r.get("phash") or "", r.get("group") or "")
                for r in csv.DictReader(fh) if r["split"] in splits]
