"""Stage 1: a folder of images (one sub-folder per class) → checked images and a deterministic split.

Every image file is decoded by :func:`pipeline.data.images.load_image`, the decoder every later
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

An exclude list (``--exclude``, ``data/exclude.txt`` in dvc.yaml: one path relative to
``raw_dir`` per line, or a folder to leave out whole; ``#`` starts a comment line) leaves
files out of the manifest without touching the folder: each is reported in the quarantine
report with kind ``excluded``, and an entry that matches no image file is a warning naming
it. This is how a user acts on the audit stage's findings, as a reviewed, diffable commit.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from pipeline.core.io import setup_logging, user_errors, write_csv, write_json
from pipeline.core.manifest import SPLITS, Item, write_manifest
from pipeline.core.params import DataParams, load_params
from pipeline.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from pipeline.data.scanning import DatasetError, Quarantined, Scanner, printable

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("data",)

# The check decodes at the native input size of most backbones, through the same code path
# (JPEG draft scaling included) as extract. Whether a file decodes does not depend on the size:
# 1,200 truncated and byte-flipped JPEGs, baseline and progressive, gave the same outcome at
# 16, 64, 224, 640 and 2000 px.
CHECK_SIZE = 224

QUARANTINE_HEADER = ("path", "kind", "reason")


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


def _is_presplit(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val").is_dir()


def _scan_presplit(raw_dir: Path, sc: Scanner) -> tuple[list[str], list[_Candidate]]:
    """``raw_dir/{train,val[,test]}/<class>/…`` → (class names, candidates keeping their split)."""
    cands: list[_Candidate] = []
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
    return classes, cands


def _scan_flat(raw_dir: Path, sc: Scanner) -> tuple[list[str], list[_Candidate]]:
    """``raw_dir/<class>/…`` → (class names, candidates to be split by hash)."""
    cands: list[_Candidate] = []
    classes = sc.top_level(raw_dir, "", "the data folder")
    sc.reserve(raw_dir)
    for label in classes:
        sc.reserve(raw_dir / label)
    for label in classes:
        prefix = f"{label}/"
        for rel in sc.walk(str(raw_dir / label), prefix):
            cands.append(_Candidate(rel, label, rel[len(prefix):], None))
    return classes, cands


def _scan_files(raw_dir: Path) -> tuple[list[str], list[_Candidate], Scanner, bool]:
    """Walk ``raw_dir`` → (class names, candidate image files, the scanner with its report, presplit?)."""
    if not raw_dir.is_dir():
        raise DatasetError(
            f"data.raw_dir: {raw_dir} is not a folder; point data.raw_dir in params.yaml at a folder with one "
            "sub-folder of images per class (or run `dvc repro` for the default demo images)"
        )
    sc = Scanner()
    presplit = _is_presplit(raw_dir)
    classes, cands = (_scan_presplit if presplit else _scan_flat)(raw_dir, sc)
    return classes, cands, sc, presplit


@dataclass(frozen=True)
class ExcludeEntry:
    path: str  # relative to raw_dir, POSIX separators, no trailing slash
    line: int


def read_exclude_list(path: Path) -> list[ExcludeEntry]:
    """The entries of an exclude list: one path relative to ``data.raw_dir`` per line (a file, or a
    folder whose files are all left out); blank lines and lines starting with ``#`` are skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exclude list not found; create it (it may hold only comments) or fix "
                                "the --exclude path in dvc.yaml")
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        rel = text.strip("/")
        while rel.startswith("./"):
            rel = rel[2:]
        if not rel or ".." in rel.split("/") or os.path.isabs(text):
            raise DatasetError(f"{path}:{n}: {text!r} is not a path inside data.raw_dir; write it relative to "
                               "data.raw_dir as the manifest and the audit reports show it (e.g. cats/img001.jpg)")
        entries.append(ExcludeEntry(rel, n))
    return entries


def apply_exclude_list(cands: list[_Candidate], entries: list[ExcludeEntry],
                       source: Path) -> tuple[list[_Candidate], list[Quarantined]]:
    """Split ``cands`` into those kept and the quarantine entries of those an entry names; warn
    about each entry that matches no candidate image file."""
    if not entries:
        return cands, []
    exact = {e.path: e for e in entries}
    kept, excluded, used = [], [], set()
    for c in cands:
        hit = exact.get(c.path)
        if hit is None:  # a folder entry: any parent folder of the file
            parts = c.path.split("/")
            hit = next((exact[p] for p in ("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                        if p in exact), None)
        if hit is None:
            kept.append(c)
        else:
            used.add(hit.path)
            excluded.append(Quarantined(printable(c.path), "excluded", f"listed in {source} line {hit.line}"))
    for e in entries:
        if e.path not in used:
            log.warning("%s:%d: %r matches no image file under data.raw_dir; fix the path or delete the line",
                        source, e.line, e.path)
    if excluded:
        log.info("%d image file(s) left out by %s", len(excluded), source)
    return kept, excluded


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


def _report(raw_dir: Path, report: list[Quarantined], n_files: int, n_good: int,
            quarantine: Optional[Path]) -> str:
    """Write the quarantine report (when asked) and log a summary; returns where to look for details."""
    rejected = [q for q in report if q.kind == "rejected"]
    n_excluded = sum(q.kind == "excluded" for q in report)
    if quarantine is not None:
        write_csv(quarantine, QUARANTINE_HEADER, [(q.path, q.kind, q.reason) for q in report])
    where = f"see {quarantine} for every file and reason" if quarantine else "every file and reason is logged"
    log.info("%s: %d image files, %d usable, %d rejected, %d excluded, %d other entries ignored", raw_dir, n_files,
             n_good, len(rejected), n_excluded, len(report) - len(rejected) - n_excluded)
    for q in rejected[:20]:
        log.warning("rejected %s: %s", q.path, q.reason)
    if len(rejected) > 20:
        log.warning("... and %d more rejected files (%s)", len(rejected) - 20, where)
    return where


def _check_usable(raw_dir: Path, classes: list[str], good: list[_Candidate], rejected_labels: Counter,
                  rejected: list[Quarantined], where: str, params: DataParams) -> None:
    """Enough classes, files, usable share and images per class, or :class:`DatasetError` saying what to do."""
    n_files = len(good) + len(rejected)
    if len(classes) < 2:
        raise DatasetError(
            f"data.raw_dir: {raw_dir} has {len(classes)} class folder(s) {classes}; a classifier needs at least 2 "
            "sub-folders, one per class, each holding that class's images"
        )
    if n_files == 0:
        raise DatasetError(f"data.raw_dir: no image files ({' '.join(IMAGE_EXTENSIONS)}) under {raw_dir}")
    share = len(rejected) / n_files
    if share > params.max_rejected_fraction:
        raise DatasetError(
            f"{len(rejected)} of {n_files} image files ({share:.1%}) under {raw_dir} cannot be used, more than "
            f"data.max_rejected_fraction = {params.max_rejected_fraction} allows ({where}; e.g. "
            f"{_fail_message_examples(rejected)}). Fix or delete those files, or raise "
            "data.max_rejected_fraction to proceed without them"
        )
    per_class = Counter(c.label for c in good)
    small = [c for c in classes if per_class[c] < params.min_images_per_class]
    if small:
        detail = ", ".join(f"{c!r}: {per_class[c]} usable" + (f" ({rejected_labels[c]} rejected)"
                                                             if rejected_labels[c] else "") for c in small)
        raise DatasetError(
            f"class(es) with fewer than data.min_images_per_class = {params.min_images_per_class} images under "
            f"{raw_dir}: {detail}; add images to those class folders, remove a folder that is not a class (an "
            "empty folder counts as a class), or lower data.min_images_per_class"
        )


def _split(raw_dir: Path, good: list[_Candidate], presplit: bool, params: DataParams) -> list[Item]:
    """Each usable image's split: its folder's (pre-split layout), else the path hash's. Sorted."""
    items = []
    for c in good:
        if presplit:
            split = c.given_split
            if split == "train" and not (raw_dir / "test").is_dir():
                split = "test" if hash_fraction(params.seed, c.split_key) < params.test_fraction else "train"
        else:
            split = assign_split(params.seed, c.split_key, params.val_fraction, params.test_fraction)
        items.append(Item(c.path, c.label, split))
    order = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))
    return items


def _check_every_split(raw_dir: Path, classes: list[str], items: list[Item], params: DataParams) -> None:
    """Every class has an image in every split (test only when one is asked for)."""
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


def scan(raw_dir: Path, params: DataParams, workers: Optional[int] = None,
         quarantine: Optional[Path] = None,
         exclude: Optional[Path] = None) -> tuple[list[str], list[Item], list[Quarantined]]:
    """Walk, check and split ``raw_dir`` → (class names, manifest items, quarantine entries).

    Items are sorted by split, class, path; quarantine entries by path. When ``quarantine`` is
    given the report is written there before any check can fail, so a failed run still says
    which files were refused and why. ``exclude``: an exclude list (:func:`read_exclude_list`);
    the files it names are neither checked nor split, and are reported as ``excluded``.
    """
    entries = read_exclude_list(exclude) if exclude is not None else []
    classes, cands, sc, presplit = _scan_files(raw_dir)
    cands, excluded = apply_exclude_list(cands, entries, exclude)
    reasons = check_images(raw_dir, [c.path for c in cands], params.max_image_pixels, workers)
    good = [c for c, r in zip(cands, reasons) if not r]
    report = sorted(sc.quarantined + excluded + [Quarantined(printable(c.path), "rejected", r)
                                                 for c, r in zip(cands, reasons) if r], key=lambda q: q.path)
    rejected = [q for q in report if q.kind == "rejected"]
    where = _report(raw_dir, report, len(good) + len(rejected), len(good), quarantine)
    _check_usable(raw_dir, classes, good, Counter(c.label for c, r in zip(cands, reasons) if r), rejected, where,
                  params)
    items = _split(raw_dir, good, presplit, params)
    _check_every_split(raw_dir, classes, items, params)
    return classes, items, report


def run(*, raw_dir: Path, manifest: Path, classes_out: Path, params: DataParams,
        quarantine: Optional[Path] = None, workers: Optional[int] = None,
        exclude: Optional[Path] = None) -> list[Item]:
    """Scan, check, split; write the manifest CSV (path, label, split), the class list JSON and
    (when given) the quarantine report CSV (path, kind, reason). ``exclude``: the exclude list whose
    files are left out. Returns the manifest items."""
    classes, items, _ = scan(raw_dir, params, workers, quarantine, exclude)
    write_manifest(manifest, items)
    counts = {s: {c: sum(1 for it in items if it.split == s and it.label == c) for c in classes} for s in SPLITS}
    write_json(classes_out, {"classes": classes, "counts": counts})
    for s in SPLITS:
        log.info("%-5s %5d images  %s", s, sum(counts[s].values()), counts[s])
    return items


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--classes", type=Path, required=True)
    ap.add_argument("--quarantine", type=Path, default=None,
                    help="CSV report of every file not in the manifest (path, kind, reason)")
    ap.add_argument("--exclude", type=Path, default=None,
                    help="exclude list: files (or folders) relative to --raw-dir to leave out, one per line")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "prepare", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest, classes_out=args.classes, params=params.data,
            quarantine=args.quarantine, exclude=args.exclude)


if __name__ == "__main__":
    main()
