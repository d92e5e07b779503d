"""Stage 1: a folder of images (one sub-folder per class) → checked images and a deterministic split.

    python -m pipeline.prepare --raw-dir data/demo --manifest data/prepared/manifest.csv \
        --classes data/prepared/classes.json --quarantine data/prepared/quarantine.csv

Every image file is decoded by :func:`pipeline.images.load_image`, the decoder every later
stage uses (in parallel threads: Pillow releases the GIL while it decodes), so nothing that
enters the manifest can fail to decode later. Files that cannot be used go to the quarantine
report (path, kind, reason), and the good images proceed: the run fails only when the
rejected share exceeds ``data.max_rejected_fraction`` or a class ends up with fewer than
``data.min_images_per_class`` images.

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
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from pipeline.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from pipeline.io_utils import setup_logging, write_csv, write_json
from pipeline.params import DataParams, load_params

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# The check decodes at the native input size of most backbones, through the same code path
# (JPEG draft scaling included) as extract. Whether a file decodes does not depend on the size:
# 1,200 truncated and byte-flipped JPEGs, baseline and progressive, gave the same outcome at
# 16, 64, 224, 640 and 2000 px.
CHECK_SIZE = 224

# Files that operating systems and tools drop into folders: ignored without a hint.
OS_JUNK = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
# Image formats Pillow cannot decode here, with the hint the report gives.
UNSUPPORTED = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".raw": "camera RAW", ".cr2": "camera RAW",
               ".nef": "camera RAW", ".arw": "camera RAW", ".dng": "camera RAW", ".svg": "SVG (vector)",
               ".jfif": "JFIF (a JPEG with another name)", ".ico": "ICO"}

QUARANTINE_HEADER = ("path", "kind", "reason")


class DatasetError(ValueError):
    """The image folder cannot be split as asked; the message says how to fix it."""


@dataclass(frozen=True)
class Item:
    path: str  # relative to raw_dir, POSIX separators
    label: str
    split: str


@dataclass(frozen=True)
class Quarantined:
    """A file or folder under raw_dir that is not in the manifest.

    ``kind``: ``rejected`` (an image file that cannot be used; counts towards
    ``data.max_rejected_fraction``) or ``ignored`` (not an image file by name, hidden, a
    duplicate link; never counted).
    """

    path: str  # relative to raw_dir, POSIX separators
    kind: str
    reason: str


@dataclass(frozen=True)
class _Candidate:
    """An image file found by the scan, before the decode check."""

    path: str  # relative to raw_dir
    label: str
    split_key: str  # path relative to the class folder: what the split hash sees
    given_split: Optional[str]  # the split folder it sits in (pre-split layout), else None


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


def _printable(path: str) -> str:
    """A path as text that survives CSV/JSON even when the name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in the name, kept by Python as surrogates
        return False


def _has_image_ext(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _not_an_image_reason(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if name.lower() in OS_JUNK:
        return "operating-system metadata file"
    if ext in UNSUPPORTED:
        return (f"{UNSUPPORTED[ext]} files are not decoded; convert to JPEG or PNG (supported: "
                f"{' '.join(IMAGE_EXTENSIONS)})")
    return f"not an image file name (extension {ext or 'none'!r}; supported: {' '.join(IMAGE_EXTENSIONS)})"


def _stat(path: str) -> Optional[os.stat_result]:
    """``os.stat`` following links; None for a broken link, a link loop or no permission."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _is_dir(st: Optional[os.stat_result]) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)


class _Scanner:
    """Walks class folders (following symlinks, each real folder and file once)."""

    def __init__(self) -> None:
        self.seen_dirs: set[tuple[int, int]] = set()
        # raw_dir, split and class folders: a link to one of them from inside a class is a
        # loop or a second path to images that are scanned anyway.
        self.reserved: set[tuple[int, int]] = set()
        self.seen_files: dict[tuple[int, int], str] = {}
        self.quarantined: list[Quarantined] = []

    def skip(self, rel: str, kind: str, reason: str) -> None:
        self.quarantined.append(Quarantined(_printable(rel), kind, reason))

    def top_level(self, folder: Path, rel: str, what: str) -> list[str]:
        """Non-hidden sub-folder names of ``folder`` (sorted); everything else is reported."""
        names = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            r = f"{rel}{entry.name}"
            st = _stat(entry.path)
            if entry.name.startswith("."):
                self.skip(r, "ignored", "hidden " + ("folder" if _is_dir(st) else "file"))
            elif _is_dir(st):  # follows a symlinked folder
                if not _utf8_ok(entry.name):
                    raise DatasetError(
                        f"{_printable(str(folder / entry.name))}: folder name is not valid UTF-8; rename it "
                        "(class names are written to JSON and HDF5)")
                names.append(entry.name)
            else:
                self.skip(r, "ignored", "broken symlink or symlink loop" if st is None
                          else f"a file directly in {what}; images go inside a class sub-folder")
        return names

    def reserve(self, folder: Path) -> None:
        st = _stat(str(folder))
        if st is not None:
            self.reserved.add((st.st_dev, st.st_ino))

    def walk(self, folder: str, rel: str, top: bool = True) -> list[str]:
        """Image files below ``folder`` (recursively) as sorted paths relative to ``rel``'s root."""
        st = _stat(folder)
        key = None if st is None else (st.st_dev, st.st_ino)
        if key is None or key in self.seen_dirs or (not top and key in self.reserved):
            self.skip(rel.rstrip("/"), "ignored", "folder already scanned (a symlink loop or a second link to it)")
            return []
        self.seen_dirs.add(key)
        out = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.skip(rel.rstrip("/"), "ignored", f"cannot list folder: {exc.strerror or exc}")
            return []
        for entry in entries:
            r = f"{rel}{entry.name}"
            st = _stat(entry.path)  # follows symlinks; None for a broken link or a link loop
            if entry.name.startswith("."):
                self.skip(r, "ignored", "hidden " + ("folder" if _is_dir(st) else "file"))
                continue
            if _is_dir(st):  # symlinked folders are followed; loops are caught by seen_dirs
                if not _utf8_ok(entry.name):
                    self.skip(r, "rejected", "folder name is not valid UTF-8; rename it (its images are not used)")
                else:
                    out += self.walk(entry.path, r + "/", top=False)
                continue
            image_name = _has_image_ext(entry.name)
            kind = "rejected" if image_name else "ignored"
            if not _utf8_ok(entry.name):
                self.skip(r, kind, "file name is not valid UTF-8; rename it")
                continue
            if not image_name:
                self.skip(r, kind, _not_an_image_reason(entry.name))
                continue
            if st is not None and not stat.S_ISREG(st.st_mode):
                # Opening a named pipe would block the decode check forever.
                self.skip(r, kind, "not a regular file (a pipe, socket or device)")
                continue
            fkey = None if st is None else (st.st_dev, st.st_ino)
            if fkey is not None and fkey in self.seen_files:
                self.skip(r, "ignored", f"same file as {self.seen_files[fkey]} (a link); each image is used once")
                continue
            if fkey is not None:
                self.seen_files[fkey] = r
            out.append(r)  # a broken or looping symlink stays: the decode check reports why
        return out


def _is_presplit(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def _scan_files(raw_dir: Path) -> tuple[list[str], list[_Candidate], _Scanner, bool]:
    """Walk ``raw_dir`` → (class names, candidate image files, the scanner with its report, presplit?)."""
    if not raw_dir.is_dir():
        raise DatasetError(
            f"data.raw_dir: {raw_dir} is not a folder; point it at a folder with one sub-folder of images per class"
        )
    sc = _Scanner()
    cands: list[_Candidate] = []
    presplit = _is_presplit(raw_dir)
    if presplit:
        present = [s for s in sc.top_level(raw_dir, "", "the data folder") if s in SPLITS]
        for name in sorted(set(os.listdir(raw_dir)) - set(present)):
            if not name.startswith(".") and (raw_dir / name).is_dir():
                sc.skip(name, "ignored", f"not a split folder ({', '.join(SPLITS)}) beside train/ and val/")
        present = [s for s in SPLITS if s in present]
        classes = sc.top_level(raw_dir / "train", "train/", "train/")
        for split in present:
            found = classes if split == "train" else sc.top_level(raw_dir / split, f"{split}/", f"{split}/")
            if found != classes:
                raise DatasetError(
                    f"{raw_dir / split}: class folders {found} differ from train/'s {classes}; "
                    "every split folder needs the same class sub-folders"
                )
        log.info("keeping the existing split of %s (%s)", raw_dir, ", ".join(present))
        sc.reserve(raw_dir)
        for split in present:
            sc.reserve(raw_dir / split)
            for label in classes:
                sc.reserve(raw_dir / split / label)
        for split in present:
            for label in classes:
                prefix = f"{split}/{label}/"
                for rel in sc.walk(str(raw_dir / split / label), prefix):
                    cands.append(_Candidate(rel, label, rel[len(prefix):], split))
    else:
        classes = sc.top_level(raw_dir, "", "the data folder")
        sc.reserve(raw_dir)
        for label in classes:
            sc.reserve(raw_dir / label)
        for label in classes:
            prefix = f"{label}/"
            for rel in sc.walk(str(raw_dir / label), prefix):
                cands.append(_Candidate(rel, label, rel[len(prefix):], None))
    return classes, cands, sc, presplit


def check_images(raw_dir: Path, paths: list[str], max_pixels: int, workers: Optional[int] = None) -> list[str]:
    """Decode every file (relative to ``raw_dir``) with the pipeline's decoder, in parallel.

    Returns one entry per path, in order: "" when it decodes, else the reason it does not.
    """

    def check(rel: str) -> str:
        try:
            load_image(str(raw_dir / rel), CHECK_SIZE, max_pixels=max_pixels)
            return ""
        except ImageDecodeError as exc:
            return exc.reason

    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        return list(tqdm(pool.map(check, paths), total=len(paths), desc="check images", unit="img",
                         mininterval=1.0))


def _fail_message_examples(rejected: list[Quarantined], n: int = 5) -> str:
    shown = "; ".join(f"{q.path}: {q.reason}" for q in rejected[:n])
    more = f" (and {len(rejected) - n} more)" if len(rejected) > n else ""
    return shown + more


def scan(raw_dir: Path, params: DataParams, workers: Optional[int] = None,
         quarantine: Optional[Path] = None) -> tuple[list[str], list[Item], list[Quarantined]]:
    """Walk, check and split ``raw_dir`` → (class names, manifest items, quarantine entries).

    Items are sorted by split, class, path; quarantine entries by path. When ``quarantine`` is
    given the report is written there before any check can fail, so a failed run still says
    which files were refused and why.
    """
    classes, cands, sc, presplit = _scan_files(raw_dir)
    reasons = check_images(raw_dir, [c.path for c in cands], params.max_image_pixels, workers)
    good = [c for c, r in zip(cands, reasons) if not r]
    rejected = [Quarantined(_printable(c.path), "rejected", r) for c, r in zip(cands, reasons) if r]
    report = sorted(sc.quarantined + rejected, key=lambda q: q.path)
    rejected_all = [q for q in report if q.kind == "rejected"]
    n_files = len(good) + len(rejected_all)
    if quarantine is not None:
        write_csv(quarantine, QUARANTINE_HEADER, [(q.path, q.kind, q.reason) for q in report])
    where = f"see {quarantine} for every file and reason" if quarantine else "every file and reason is logged"
    log.info("%s: %d image files, %d usable, %d rejected, %d other entries ignored", raw_dir, n_files, len(good),
             len(rejected_all), len(report) - len(rejected_all))
    for q in rejected_all[:20]:
        log.warning("rejected %s: %s", q.path, q.reason)
    if len(rejected_all) > 20:
        log.warning("... and %d more rejected files (%s)", len(rejected_all) - 20, where)

    if len(classes) < 2:
        raise DatasetError(
            f"data.raw_dir: {raw_dir} has {len(classes)} class folder(s) {classes}; a classifier needs at least 2 "
            "sub-folders, one per class, each holding that class's images"
        )
    if n_files == 0:
        raise DatasetError(f"data.raw_dir: no image files ({' '.join(IMAGE_EXTENSIONS)}) under {raw_dir}")
    share = len(rejected_all) / n_files
    if share > params.max_rejected_fraction:
        raise DatasetError(
            f"{len(rejected_all)} of {n_files} image files ({share:.1%}) under {raw_dir} cannot be used, more than "
            f"data.max_rejected_fraction = {params.max_rejected_fraction} allows ({where}; e.g. "
            f"{_fail_message_examples(rejected_all)}). Fix or delete those files, or raise "
            "data.max_rejected_fraction to proceed without them"
        )
    per_class = Counter(c.label for c in good)
    rejected_per_class = Counter(c.label for c, r in zip(cands, reasons) if r)
    small = [c for c in classes if per_class[c] < params.min_images_per_class]
    if small:
        detail = ", ".join(f"{c!r}: {per_class[c]} usable" + (f" ({rejected_per_class[c]} rejected)"
                                                             if rejected_per_class[c] else "") for c in small)
        raise DatasetError(
            f"class(es) with fewer than data.min_images_per_class = {params.min_images_per_class} images under "
            f"{raw_dir}: {detail}; add images to those class folders, remove a folder that is not a class (an "
            "empty folder counts as a class), or lower data.min_images_per_class"
        )

    items = []
    for c in good:
        if presplit:
            split = c.given_split
            if split == "train" and not (raw_dir / "test").is_dir():
                split = "test" if hash_fraction(params.seed, c.split_key) < params.test_fraction else "train"
        else:
            split = assign_split(params.seed, c.split_key, params.val_fraction, params.test_fraction)
        items.append(Item(c.path, c.label, split))
    counts = Counter((it.split, it.label) for it in items)
    for label in classes:
        for split in SPLITS:
            if split == "test" and params.test_fraction == 0 and not (raw_dir / "test").is_dir():
                continue
            if counts[(split, label)] == 0:
                total = sum(counts[(s, label)] for s in SPLITS)
                raise DatasetError(
                    f"class {label!r} has no {split} image ({total} usable image(s) in all under {raw_dir}); add "
                    "images to that class folder or change data.val_fraction / data.test_fraction / data.seed"
                )
    order = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))
    return classes, items, report


def run(raw_dir: Path, manifest: Path, classes_out: Path, params: DataParams,
        quarantine: Optional[Path] = None, workers: Optional[int] = None) -> list[Item]:
    """Scan, check, split; write the manifest CSV (path, label, split), the class list JSON and
    (when given) the quarantine report CSV (path, kind, reason). Returns the manifest items."""
    classes, items, _ = scan(raw_dir, params, workers, quarantine)
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
    ap.add_argument("--quarantine", type=Path, default=None,
                    help="CSV report of every file not in the manifest (path, kind, reason)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    run(args.raw_dir, args.manifest, args.classes, params.data, quarantine=args.quarantine)


if __name__ == "__main__":
    main()
