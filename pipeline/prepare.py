"""Stage 1: a folder of images (one sub-folder per class) → checked images and a deterministic split.

Every image file is decoded by :func:`pipeline.data.images.load_image`, the decoder every later
stage uses (in parallel threads: Pillow releases the GIL while it decodes), so nothing that
enters the manifest can fail to decode later. Files that cannot be used go to the quarantine
report (path, kind, reason), and the good images proceed: the run fails only when the
rejected share exceeds ``data.max_rejected_fraction`` or a class ends up with fewer than
``data.min_images_per_class`` images.

A file's split comes from a hash of (data.seed, its group's key), so the split does not depend
on the machine or on directory listing order, and adding images never moves an existing image,
unless the new image joins its group (a near-copy of it, or one that links two groups: the
merged group takes one split) or becomes its group's smallest path (a near-copy group's key).
Each class ends in about the given fractions (each image or group is one draw), not exactly.
Related images share a group, and so a split: those whose path gives the same text to
``data.group_pattern``'s capture group (an episode, a patient, a session), and near-copies,
whose perceptual hashes (:mod:`pipeline.data.near_copies`, computed from the same decode as the
check) are within ``data.group_hash_bits`` bits, joined transitively. A group's key is the
smallest captured text among its images, else the smallest path inside a class folder; an image
in no group keys on its own path, as before groups existed. The manifest records each image's
hash and its group (empty when alone), and the log reports the groups, the largest, and how many
images follow their group's split rather than their own.

If ``raw_dir`` already holds ``train/`` and ``val/`` (optionally ``test/``) folders with class
sub-folders, that split is kept; without ``test/``, the test split is carved out of ``train/``
by the same group hash. A ``data.test_dir`` with class sub-folders is the test split as given
(paths in the manifest relative to ``raw_dir``, e.g. ``../test/cats/1.jpg``), and ``raw_dir`` is
split into train and val only. Near-copies across given splits cannot be regrouped: they are
counted and warned about.

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
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from pipeline.core.io import setup_logging, user_errors, write_csv, write_json
from pipeline.core.manifest import SPLITS, Item, write_manifest
from pipeline.core.params import DataParams, load_params
from pipeline.data.images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from pipeline.data.near_copies import (
    DEFAULT_BITS,
    closest,
    components,
    near_copy_edges,
    near_copy_elsewhere,
    phash,
    to_hex,
)
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

# A group larger than this many images and this share of all is warned about: one group takes one
# split, so a chain of near-copies (or many blank frames, which all hash alike) can skew the split.
LARGE_GROUP_IMAGES = 10
LARGE_GROUP_SHARE = 0.02


@dataclass(frozen=True)
class _Candidate:
    """An image file found by the scan, before the decode check."""

    path: str  # relative to raw_dir
    label: str
    split_key: str  # path relative to the class folder: what the split hash sees when it has no group
    given_split: Optional[str]  # the split folder it sits in (pre-split layout, data.test_dir), else None


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


def _relative_prefix(test_dir: Path, raw_dir: Path) -> str:
    """``test_dir`` relative to ``raw_dir`` with a trailing slash, as ``raw_dir / prefix`` reaches it: the
    plain relative path (the same in every clone) unless a symlink in ``raw_dir`` makes the kernel's ``..``
    land elsewhere, then the one between their real paths."""
    plain = os.path.relpath(os.path.abspath(test_dir), os.path.abspath(raw_dir))
    if os.path.realpath(os.path.join(raw_dir, plain)) != os.path.realpath(test_dir):
        plain = os.path.relpath(os.path.realpath(test_dir), os.path.realpath(raw_dir))
    return plain.replace(os.sep, "/") + "/"


def _scan_test_dir(test_dir: Path, prefix: str, classes: list[str], sc: Scanner) -> list[_Candidate]:
    """``test_dir/<class>/…`` → candidates of the test split, paths relative to ``raw_dir``; [] when
    ``test_dir`` has no class sub-folders (no separate test set)."""
    if not test_dir.is_dir():
        raise DatasetError(f"data.test_dir: {test_dir} is not a folder; create it (with no class sub-folders "
                           "there is no separate test set) or point data.test_dir at your test images")
    found = sorted(e.name for e in os.scandir(test_dir) if not e.name.startswith(".") and e.is_dir())
    if not found:
        return []
    if found != classes:
        raise DatasetError(f"data.test_dir: {test_dir} has class folders {found}, data.raw_dir {classes}; the test "
                           "folder needs the same class sub-folders (rename or add them)")
    sc.reserve(test_dir)
    cands = []
    for label in classes:
        sc.reserve(test_dir / label)
        for rel in sc.walk(str(test_dir / label), f"{prefix}{label}/"):
            cands.append(_Candidate(rel, label, rel[len(prefix) + len(label) + 1:], "test"))
    log.info("data.test_dir %s: %d test image files; data.raw_dir is split into train and val only", test_dir,
             len(cands))
    return cands


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
        parts = rel.split("/")
        ups = next((k for k, part in enumerate(parts) if part != ".."), len(parts))
        # Leading ../ only: images of data.test_dir, as the manifest shows them (../test/cats/x.jpg).
        if not rel or ".." in parts[ups:] or ups == len(parts) or os.path.isabs(text):
            raise DatasetError(f"{path}:{n}: {text!r} is not a path inside data.raw_dir; write it relative to "
                               "data.raw_dir as the manifest and the audit reports show it (e.g. cats/img001.jpg, "
                               "or ../test/cats/img001.jpg for an image of data.test_dir)")
        entries.append(ExcludeEntry(rel, n))
    return entries


def _check_entries_outside(entries: list[ExcludeEntry], source: Optional[Path], test_prefix: Optional[str]) -> None:
    """An entry starting with ``../`` must name an image of data.test_dir (``test_prefix``): else
    :class:`DatasetError`."""
    for e in entries:
        if e.path.startswith("../") and not (test_prefix and (e.path + "/").startswith(test_prefix)):
            raise DatasetError(f"{source}:{e.line}: {e.path!r} is not a path inside data.raw_dir" + (
                f" or data.test_dir ({test_prefix}…)" if test_prefix else "") + "; write it relative to "
                "data.raw_dir as the manifest and the audit reports show it (e.g. cats/img001.jpg)")


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


def check_images(raw_dir: Path, paths: list[str], max_pixels: int,
                 workers: Optional[int] = None) -> list[tuple[str, int]]:
    """Decode every file (relative to ``raw_dir``) with the pipeline's decoder, in parallel, and hash it.

    Returns one ``(reason, phash)`` per path, in order: ``("", hash)`` when it decodes, else
    ``(why not, 0)``. The hash is :func:`pipeline.data.near_copies.phash` of the decoded image.
    """

    def check(rel: str) -> tuple[str, int]:
        try:
            return "", phash(load_image(str(raw_dir / rel), CHECK_SIZE, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            return exc.reason, 0

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


@dataclass(frozen=True)
class Grouping:
    """Each usable image's group key (what its split hash sees) and what the grouping did."""

    keys: list[str]
    member_of: list[str]  # the group's key for an image in a group of two or more, else ""
    n_groups: int  # groups of two or more images
    largest: int  # images in the largest group (1 when none)
    largest_example: str  # a path of the largest group
    unmatched: list[str]  # paths group_pattern did not match (each its own group)


def group_captures(good: list[_Candidate], pattern: Optional[str]) -> list[Optional[str]]:
    """Each image's ``data.group_pattern`` capture (None: no pattern, no match, or an empty capture)."""
    if pattern is None:
        return [None] * len(good)
    rx = re.compile(pattern)
    return [m.group(1) or None if (m := rx.search(c.path)) else None for c in good]


def group_images(good: list[_Candidate], hashes: list[int], params: DataParams) -> Grouping:
    """Join related images (same ``data.group_pattern`` capture, pHash within ``data.group_hash_bits``)
    into groups, transitively → each image's group key.

    A group's key is the smallest captured text among its images, else the smallest path inside a
    class folder; an image alone keys on its own path (so a folder without related images splits
    as before grouping existed).
    """
    n = len(good)
    captures = group_captures(good, params.group_pattern)
    unmatched = [c.path for c, cap in zip(good, captures) if cap is None] if params.group_pattern is not None else []
    edges = [near_copy_edges(np.array(hashes, dtype=np.uint64), params.group_hash_bits)]
    first: dict[str, int] = {}
    links = [(i, first.setdefault(cap, i)) for i, cap in enumerate(captures) if cap is not None]
    edges.append(np.array(links, dtype=np.int64).reshape(-1, 2))
    label = components(n, np.concatenate(edges)) if n else np.zeros(0, np.int64)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(label.tolist()):
        members.setdefault(g, []).append(i)
    keys = [c.split_key for c in good]
    member_of = [""] * n
    largest, example, n_groups = 1, "", 0
    for idx in members.values():
        caps = [captures[i] for i in idx if captures[i] is not None]
        if len(idx) == 1 and not caps:
            continue
        key = min(caps) if caps else min(good[i].split_key for i in idx)
        for i in idx:
            keys[i] = key
        if len(idx) > 1:
            n_groups += 1
            for i in idx:
                member_of[i] = key
            if len(idx) > largest:
                largest, example = len(idx), min(good[i].path for i in idx)
    return Grouping(keys, member_of, n_groups, largest, example, unmatched)


def _split(good: list[_Candidate], keys: list[str], presplit: bool, separate_test: bool,
           params: DataParams) -> list[str]:
    """Each usable image's split: its folder's (pre-split layout, data.test_dir), else its group key's hash."""
    out = []
    for c, key in zip(good, keys):
        if c.given_split == "test" or (presplit and c.given_split == "val"):
            split = c.given_split
        elif presplit:
            carve = not separate_test and hash_fraction(params.seed, key) < params.test_fraction
            split = "test" if carve else "train"
        elif separate_test:
            split = "val" if hash_fraction(params.seed, key) < params.val_fraction else "train"
        else:
            split = assign_split(params.seed, key, params.val_fraction, params.test_fraction)
        out.append(split)
    return out


def _report_groups(grouping: Grouping, good: list[_Candidate], splits: list[str], params: DataParams,
                   keys_alone: list[str], presplit: bool, separate_test: bool) -> int:
    """Log what the grouping did → images whose split differs from the one their own path would get."""
    if params.group_pattern is not None:
        n_un = len(grouping.unmatched)
        log.info("data.group_pattern matched %d of %d images", len(good) - n_un, len(good))
        if n_un:
            log.warning("data.group_pattern %r did not match %d image(s), each its own group (e.g. %s); fix the "
                        "pattern if they belong to groups", params.group_pattern, n_un,
                        ", ".join(grouping.unmatched[:3]))
    alone = _split(good, keys_alone, presplit, separate_test, params)
    moved = sum(a != b for a, b in zip(alone, splits))
    if grouping.n_groups:
        log.info("groups: %d image(s) in %d group(s) of 2 or more (largest: %d images, with %s); %d image(s) "
                 "follow their group's split instead of their own", sum(1 for m in grouping.member_of if m),
                 grouping.n_groups, grouping.largest, grouping.largest_example, moved)
    else:
        log.info("groups: none (no data.group_pattern matches shared, no near-copies within %d bits)",
                 params.group_hash_bits)
    if grouping.largest > max(LARGE_GROUP_IMAGES, LARGE_GROUP_SHARE * len(good)):
        log.warning("one group holds %d of %d images (with %s) and takes one split whole. If they are not related "
                    "(blank or flat frames hash alike, and near-copies join in chains), exclude the unrelated ones "
                    "(data/exclude.txt), lower data.group_hash_bits or narrow data.group_pattern", grouping.largest,
                    len(good), grouping.largest_example)
    return moved


def _cross_split_near_copies(good: list[_Candidate], hashes: list[int], splits: list[str],
                             params: DataParams) -> int:
    """Images of a given (not hashed) split with a near-copy in another split, warned about with their
    closest partner → their number. Within ``data.group_hash_bits``, or 4 when grouping is off."""
    bits = params.group_hash_bits if params.group_hash_bits >= 0 else DEFAULT_BITS
    h = np.array(hashes, dtype=np.uint64)
    split_id = np.array([SPLITS.index(sp) for sp in splits], np.int64)
    given = np.array([c.given_split is not None for c in good])
    flagged = np.flatnonzero(near_copy_elsewhere(h, split_id, bits) & given)
    if len(flagged):
        ex = "; ".join(f"{good[i].path} ({splits[i]}) ≈ {good[j].path} ({splits[j]})" for i in flagged[:3]
                       for j in [closest(h, i, split_id != split_id[i])])
        log.warning("%d image(s) of a split you gave (a test/ or val/ folder, data.test_dir) have a near-copy "
                    "(pHash within %d bits) in another split, which no grouping can move: e.g. %s. Their test "
                    "metrics measure memory; exclude the train copy of each pair (data/exclude.txt)",
                    len(flagged), bits, ex)
    return len(flagged)


def _cross_split_pattern_groups(good: list[_Candidate], splits: list[str], params: DataParams) -> int:
    """Groups named by ``data.group_pattern`` with images in a given split and in another, warned about
    (a given split is never regrouped) → their number."""
    if params.group_pattern is None:
        return 0
    where: dict[str, set[str]] = {}
    given: set[str] = set()
    for c, sp, cap in zip(good, splits, group_captures(good, params.group_pattern)):
        if cap is not None:
            where.setdefault(cap, set()).add(sp)
            if c.given_split is not None:
                given.add(cap)
    split_groups = sorted(g for g in given if len(where[g]) > 1)
    if split_groups:
        log.warning("%d data.group_pattern group(s) have images in a split you gave (a test/ or val/ folder, "
                    "data.test_dir) and in another split, which no grouping can move: e.g. %s", len(split_groups),
                    ", ".join(f"{g!r} ({', '.join(sorted(where[g]))})" for g in split_groups[:3]))
    return len(split_groups)


def _check_every_split(raw_dir: Path, classes: list[str], items: list[Item], params: DataParams,
                       separate_test: bool, test_dir: Optional[Path]) -> None:
    """Every class has an image in every split (test only when one is asked for)."""
    counts = Counter((it.split, it.label) for it in items)
    for label in classes:
        for split in SPLITS:
            if split == "test" and params.test_fraction == 0 and not separate_test:
                continue
            if counts[(split, label)] == 0:
                total = sum(counts[(s, label)] for s in SPLITS)
                if split == "test" and test_dir is not None:
                    raise DatasetError(f"class {label!r} has no usable image in data.test_dir {test_dir}; add test "
                                       f"images to {test_dir / label}")
                groups = " or data.group_pattern / data.group_hash_bits (a group takes one split whole)" \
                    if params.group_pattern is not None or params.group_hash_bits >= 0 else ""
                raise DatasetError(
                    f"class {label!r} has no {split} image ({total} usable image(s) in all under {raw_dir}); add "
                    f"images to that class folder or change data.val_fraction / data.test_fraction / data.seed{groups}"
                )


@dataclass(frozen=True)
class Prepared:
    """What :func:`scan` found: class names, manifest items (sorted), quarantine entries, the grouping."""

    classes: list[str]
    items: list[Item]
    report: list[Quarantined]
    grouping: Grouping
    moved_by_groups: int  # images whose split follows their group's instead of their own path's
    given_split_near_copies: int  # images of a given split with a near-copy in another split


def scan(raw_dir: Path, params: DataParams, workers: Optional[int] = None,
         quarantine: Optional[Path] = None, exclude: Optional[Path] = None,
         test_dir: Optional[Path] = None) -> Prepared:
    """Walk, check, group and split ``raw_dir`` (and ``test_dir``, the test split when it has class folders).

    Items are sorted by split, class, path; quarantine entries by path. When ``quarantine`` is
    given the report is written there before any check can fail, so a failed run still says
    which files were refused and why. ``exclude``: an exclude list (:func:`read_exclude_list`);
    the files it names are neither checked nor split, and are reported as ``excluded``.
    """
    entries = read_exclude_list(exclude) if exclude is not None else []
    classes, cands, sc, presplit = _scan_files(raw_dir)
    test_prefix = _relative_prefix(test_dir, raw_dir) if test_dir is not None else None
    test_cands = _scan_test_dir(test_dir, test_prefix, classes, sc) if test_dir is not None else []
    if test_cands and presplit and (raw_dir / "test").is_dir():
        raise DatasetError(f"two test sets: {raw_dir / 'test'} and data.test_dir {test_dir}; keep one (move the "
                           "images of one into the other, or point data.test_dir at a folder without class folders)")
    _check_entries_outside(entries, exclude, test_prefix if test_cands else None)
    cands, excluded = apply_exclude_list(cands + test_cands, entries, exclude)
    checked = check_images(raw_dir, [c.path for c in cands], params.max_image_pixels, workers)
    good = [c for c, (r, _) in zip(cands, checked) if not r]
    hashes = [h for r, h in checked if not r]
    report = sorted(sc.quarantined + excluded + [Quarantined(printable(c.path), "rejected", r)
                                                 for c, (r, _) in zip(cands, checked) if r], key=lambda q: q.path)
    rejected = [q for q in report if q.kind == "rejected"]
    where = _report(raw_dir, report, len(good) + len(rejected), len(good), quarantine)
    _check_usable(raw_dir, classes, good, Counter(c.label for c, (r, _) in zip(cands, checked) if r), rejected,
                  where, params)
    separate_test = bool(test_cands) or (presplit and (raw_dir / "test").is_dir())
    # Images of a given split are never moved, so they take no part in the grouping (their
    # near-copies across splits are counted below instead).
    free = [i for i, c in enumerate(good) if c.given_split in (None, "train")]
    grouping = group_images([good[i] for i in free], [hashes[i] for i in free], params)
    keys = [c.split_key for c in good]
    member_of = [""] * len(good)
    for k, i in enumerate(free):
        keys[i], member_of[i] = grouping.keys[k], grouping.member_of[k]
    splits = _split(good, keys, presplit, separate_test, params)
    moved = _report_groups(grouping, [good[i] for i in free], [splits[i] for i in free], params,
                           [good[i].split_key for i in free], presplit, separate_test)
    given = 0
    if presplit or test_cands:
        given = _cross_split_near_copies(good, hashes, splits, params)
        _cross_split_pattern_groups(good, splits, params)
    items = [Item(c.path, c.label, sp, to_hex(h), g) for c, sp, h, g in zip(good, splits, hashes, member_of)]
    order = {s: i for i, s in enumerate(SPLITS)}
    items.sort(key=lambda it: (order[it.split], it.label, it.path))
    _check_every_split(raw_dir, classes, items, params, separate_test, test_dir if test_cands else None)
    return Prepared(classes, items, report, grouping, moved, given)


def run(*, raw_dir: Path, manifest: Path, classes_out: Path, params: DataParams,
        quarantine: Optional[Path] = None, workers: Optional[int] = None,
        exclude: Optional[Path] = None, test_dir: Optional[Path] = None) -> list[Item]:
    """Scan, check, group, split; write the manifest CSV (path, label, split, phash, group), the class
    list JSON and (when given) the quarantine report CSV (path, kind, reason). ``exclude``: the exclude
    list whose files are left out; ``test_dir``: data.test_dir. Returns the manifest items."""
    found = scan(raw_dir, params, workers, quarantine, exclude, test_dir)
    classes, items = found.classes, found.items
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
    ap.add_argument("--test-dir", type=Path, default=None,
                    help="data.test_dir: its class folders' images are the test split (none: no class folders)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "prepare", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest, classes_out=args.classes, params=params.data,
            quarantine=args.quarantine, exclude=args.exclude, test_dir=args.test_dir)


if __name__ == "__main__":
    main()
