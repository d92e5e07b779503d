"""Stage 1: a folder of images (one sub-folder per class) → a deterministic split manifest.

    python -m pipeline.prepare --raw-dir data/demo --manifest data/prepared/manifest.csv \
        --classes data/prepared/classes.json

A file's split comes from a hash of (data.seed, its path relative to its class folder), so
adding images never moves an existing image to another split, and the split does not depend
on the machine or on directory listing order. If ``raw_dir`` already holds ``train/`` and
``val/`` (optionally ``test/``) folders with class sub-folders, that split is kept; without
``test/``, the test split is carved out of ``train/`` by the same hash.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.images import is_image_file
from pipeline.io_utils import setup_logging, write_csv, write_json
from pipeline.params import DataParams, load_params

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The image folder cannot be split as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Item:
    path: str  # relative to raw_dir, POSIX separators
    label: str
    split: str


def hash_fraction(seed: int, relpath: str) -> float:
    """Uniform in [0, 1) from a stable hash of the seed and a file's path inside its class."""
    digest = hashlib.sha256(f"{seed}\x00{relpath}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(seed: int, relpath: str, val_fraction: float, test_fraction: float) -> str:
    u = hash_fraction(seed, relpath)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(class_dir: Path) -> list[str]:
    """Image files below a class folder (recursively), as sorted POSIX paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            full = os.path.join(dirpath, name)
            if is_image_file(full):
                out.append(Path(full).relative_to(class_dir).as_posix())
    return sorted(out)


def _is_presplit(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def scan(raw_dir: Path, params: DataParams) -> tuple[list[str], list[Item]]:
    """Walk ``raw_dir`` → (class names sorted, manifest items sorted by split, class, path)."""
    if not raw_dir.is_dir():
        raise DatasetError(
            f"data.raw_dir: {raw_dir} is not a folder; point it at a folder with one sub-folder of images per class"
        )
    items: list[Item] = []
    if _is_presplit(raw_dir):
        present = [s for s in SPLITS if (raw_dir / s).is_dir()]
        classes = _class_dirs(raw_dir / "train")
        for split in present:
            found = _class_dirs(raw_dir / split)
            if found != classes:
                raise DatasetError(
                    f"{raw_dir / split}: class folders {found} differ from train/'s {classes}; "
                    "every split folder needs the same class sub-folders"
                )
        log.info("keeping the existing split of %s (%s)", raw_dir, ", ".join(present))
        for split in present:
            for label in classes:
                for rel in _images_in(raw_dir / split / label):
                    s = split
                    if split == "train" and "test" not in present:
                        s = "test" if hash_fraction(params.seed, rel) < params.test_fraction else "train"
                    items.append(Item(f"{split}/{label}/{rel}", label, s))
    else:
        classes = _class_dirs(raw_dir)
        for label in classes:
            for rel in _images_in(raw_dir / label):
                items.append(Item(f"{label}/{rel}", label, assign_split(params.seed, rel, params.val_fraction,
                                                                       params.test_fraction)))
    if len(classes) < 2:
        raise DatasetError(
            f"data.raw_dir: {raw_dir} has {len(classes)} class folder(s) {classes}; a classifier needs at least 2 "
            "sub-folders, one per class, each holding that class's images"
        )
    counts = Counter((it.split, it.label) for it in items)
    for label in classes:
        for split in SPLITS:
            if split == "test" and params.test_fraction == 0 and not (raw_dir / "test").is_dir():
                continue
            if counts[(split, label)] == 0:
                total = sum(counts[(s, label)] for s in SPLITS)
                raise DatasetError(
                    f"class {label!r} has no {split} image ({total} image(s) in all under {raw_dir}); add images to "
                    f"that class folder or change data.val_fraction / data.test_fraction / data.seed"
                )
    order = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))
    return classes, items


def run(raw_dir: Path, manifest: Path, classes_out: Path, params: DataParams) -> list[Item]:
    """Scan, split, and write the manifest CSV (path, label, split) and the class list JSON."""
    classes, items = scan(raw_dir, params)
    write_csv(manifest, ("path", "label", "split"), [(it.path, it.label, it.split) for it in items])
    counts = {s: {c: sum(1 for it in items if it.split == s and it.label == c) for c in classes} for s in SPLITS}
    write_json(classes_out, {"classes": classes, "counts": counts})
    for s in SPLITS:
        log.info("%-5s %5d images  %s", s, sum(counts[s].values()), counts[s])
    return items


def read_manifest(path: Path) -> list[Item]:
    import csv

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run `dvc repro prepare`")
    with open(path, newline="", encoding="utf-8") as fh:
        return [Item(r["path"], r["label"], r["split"]) for r in csv.DictReader(fh)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--classes", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    run(args.raw_dir, args.manifest, args.classes, params.data)


if __name__ == "__main__":
    main()
