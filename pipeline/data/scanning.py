"""The one folder walker: image files below a folder, and a report of everything it skipped.

Used by prepare (class folders → candidate images + the quarantine report) and by predict
(folders given on the command line). Symlinks are followed, but each real folder and file
is read once (links back up the tree and second links to a file are reported, not
followed); hidden entries, non-image names, pipes and names that are not UTF-8 are
reported with the reason. Order is sorted by name at every level, so it does not depend
on the file system.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.core.io import PipelineError
from pipeline.data.images import IMAGE_EXTENSIONS, is_image_file


class DatasetError(PipelineError):
    """The image folder cannot be used as asked; the message says how to fix it."""


# Files that operating systems and tools drop into folders: ignored without a hint.
OS_JUNK = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
# Image formats Pillow cannot decode here, with the hint the report gives.
UNSUPPORTED = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".raw": "camera RAW", ".cr2": "camera RAW",
               ".nef": "camera RAW", ".arw": "camera RAW", ".dng": "camera RAW", ".svg": "SVG (vector)",
               ".jfif": "JFIF (a JPEG with another name)", ".ico": "ICO"}


@dataclass(frozen=True)
class Quarantined:
    """A file or folder under raw_dir that is not in the manifest.

    ``kind``: ``rejected`` (an image file that cannot be used; counts towards
    ``data.max_rejected_fraction``), ``ignored`` (not an image file by name, hidden, a
    duplicate link; never counted) or ``excluded`` (named by the exclude list; never counted).
    """

    path: str  # relative to raw_dir, POSIX separators
    kind: str
    reason: str



def printable(path: str) -> str:
    """A path as text that survives CSV/JSON even when the name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in the name, kept by Python as surrogates
        return False


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


class Scanner:
    """Walks class folders (following symlinks, each real folder and file once)."""

    def __init__(self) -> None:
        self.seen_dirs: set[tuple[int, int]] = set()
        # raw_dir, split and class folders: a link to one of them from inside a class is a
        # loop or a second path to images that are scanned anyway.
        self.reserved: set[tuple[int, int]] = set()
        self.seen_files: dict[tuple[int, int], str] = {}
        self.quarantined: list[Quarantined] = []

    def skip(self, rel: str, kind: str, reason: str) -> None:
        self.quarantined.append(Quarantined(printable(rel), kind, reason))

    def top_level(self, folder: Path, rel: str, what: str) -> list[str]:
        """Non-hidden sub-folder names of ``folder`` (sorted); everything else is reported."""
        names = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            r = f"{rel}{entry.name}"
            st = _stat(entry.path)
            if entry.name.startswith("."):
                self.skip(r, "ignored", "hidden " + ("folder" if _is_dir(st) else "file"))
            elif _is_dir(st):  # follows a symlinked folder
                if not utf8_ok(entry.name):
                    raise DatasetError(
                        f"{printable(str(folder / entry.name))}: folder name is not valid UTF-8; rename it "
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
                if not utf8_ok(entry.name):
                    self.skip(r, "rejected", "folder name is not valid UTF-8; rename it (its images are not used)")
                else:
                    out += self.walk(entry.path, r + "/", top=False)
                continue
            image_name = is_image_file(entry.name)
            kind = "rejected" if image_name else "ignored"
            if not utf8_ok(entry.name):
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


def image_files(folder: str | Path) -> list[str]:
    """Every image file below ``folder`` (recursively, as :class:`Scanner` walks) as sorted full paths."""
    folder = str(folder)
    return sorted(os.path.join(folder, rel) for rel in Scanner().walk(folder, ""))
