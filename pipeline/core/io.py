"""Atomic writes, hashing and small JSON/CSV helpers shared by every stage.

Every output is written to a temporary name in the destination folder, flushed and fsynced,
then renamed over the target, so a killed stage never leaves a half-written file where a
later stage would take it as valid.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm


class PipelineError(ValueError):
    """A problem with the user's inputs, params or artifacts; the message says what to do.

    A stage's ``main()`` reports it as one line (see :func:`user_errors`), not a traceback.
    """


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging for a stage's ``main()`` (never at import time)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # TensorFlow's C++ and absl chatter drowns the stage logs in DVC's output.
    logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """In a stage's ``main()``: a :class:`PipelineError` or a missing input becomes one ``error:`` line
    on stderr and exit status 1 (DVC shows it under the stage's name); anything else is a bug
    and keeps its traceback."""
    try:
        yield
    except (PipelineError, FileNotFoundError) as exc:
        logging.getLogger("pipeline").error("%s", exc)
        sys.exit(1)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    ``suffix`` is appended to the temporary name for writers that insist on an extension
    (Keras needs ``.keras``). On an exception the temporary file is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        # The rename itself must reach the disk for the write to survive a crash.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    Readers see the old folder or the new one, never a half-written one; on an exception the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run the stage that produces it (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


def sha256_digest(path: str | Path, chunk: int = 1 << 20) -> bytes:
    """sha256 of a file's bytes, read in chunks (32 raw bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.digest()


def file_digests(paths: Sequence[str | Path], workers: int = 4) -> list[bytes]:
    """sha256 of every file, in order (hashlib releases the GIL on large buffers, so threads overlap I/O);
    a tqdm bar, as hashing a large or networked folder takes minutes."""
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(sha256_digest, paths, chunksize=64), total=len(paths), desc="hash images",
                         unit="img", file=sys.stderr))


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes as hex."""
    return sha256_digest(path).hex()


# Distribution names a module may be installed under (importlib.metadata knows distributions, not modules).
_DISTRIBUTIONS = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel",
                                 "tf-nightly"),
                  "sklearn": ("scikit-learn",), "PIL": ("pillow", "Pillow")}


def dist_version(module: str) -> str:
    """The installed version of ``module`` without importing it (TensorFlow's import alone takes seconds);
    ``""`` when it is not installed."""
    from importlib import metadata

    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def library_versions() -> dict[str, str]:
    """Versions that change what a model computes; recorded in every artifact's provenance (nothing imported)."""
    return {
        "tensorflow": dist_version("tensorflow"),
        "keras": dist_version("keras"),
        "numpy": dist_version("numpy"),
        "scikit-learn": dist_version("sklearn"),
        "h5py": dist_version("h5py"),
        "python": sys.version.split()[0],
    }
