"""The chunk-commit protocol of the on-disk caches: rows keyed by 32-byte digests, appended in chunks.

One folder holds one namespace, described by its ``meta.json``. A chunk is a set of ``.npy``
files written side by side, one per named array (``<id>.<name>.npy``, each ``(M, ...)``), then
``<id>.keys.npy`` ``(M, 32)`` uint8 last: the keys file is the commit, so a chunk is visible only once
all of its arrays are on disk. Every file is written under a temporary name and renamed
(:func:`pipeline.core.io.atomic_path`), so a kill -9 loses at most the chunk being filled, and chunk
ids are unique per writer (time + random bits), so several writers (two runs, or the actors of a Ray
job) can commit into one folder at once.
A chunk whose keys file is malformed, or whose arrays are missing or hold another number of rows,
is damaged: it is skipped with a warning and its rows are computed again.

Two users: the feature cache (:mod:`pipeline.extraction.cache`, arrays ``feats``) and fine-tuning's
activation cache (:mod:`pipeline.finetuning.activations`, arrays ``acts`` and ``scale``). Reads
memory-map the chunks, at most :data:`MAX_MAPPED_CHUNKS` at a time: mapped pages count towards the
reader's RSS, and a long run touches every chunk.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.core.io import atomic_path, write_json

log = logging.getLogger(__name__)

DIGEST_BYTES = 32
KEYS = "keys"
META = "meta.json"
MAX_MAPPED_CHUNKS = 4


def new_chunk_id() -> str:
    """A chunk id no other writer can pick: nanosecond time (ids sort by age) + 48 random bits."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def write_chunk(folder: Path, keys: Sequence[bytes], arrays: Mapping[str, np.ndarray]) -> str:
    """Commit ``arrays`` (name → ``(M, ...)``, in the order given) for the ``M`` 32-byte ``keys`` into ``folder``:
    each array first, the keys last (the commit). Returns the chunk id."""
    rows = {name: len(a) for name, a in arrays.items()}
    if any(n != len(keys) for n in rows.values()):
        raise ValueError(f"a chunk of {len(keys)} keys with arrays of {rows} rows")
    chunk = new_chunk_id()
    for name, array in arrays.items():
        with atomic_path(Path(folder) / f"{chunk}.{name}.npy", suffix=".npy") as tmp:
            np.save(tmp, np.ascontiguousarray(array))
    packed = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), DIGEST_BYTES)
    with atomic_path(Path(folder) / f"{chunk}.{KEYS}.npy", suffix=".npy") as tmp:
        np.save(tmp, packed)
    return chunk


class ChunkStore:
    """The committed chunks of one folder, indexed by key; rows of the named ``arrays`` read by key."""

    def __init__(self, folder: Path, arrays: Sequence[str], meta: Mapping | None = None):
        """``meta``: what decides the namespace's values, written once as ``folder/meta.json`` (kept when there)."""
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.dir / META).is_file():
            write_json(self.dir / META, dict(meta))
        self.arrays = tuple(arrays)
        self._index: dict[bytes, tuple[str, int]] = {}
        self._seen: set[str] = set()
        self._open: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.refresh()

    def refresh(self) -> int:
        """Index the chunks committed since the last look (by this or another writer) → how many."""
        added = 0
        for keys_file in sorted(self.dir.glob(f"*.{KEYS}.npy")):
            chunk = keys_file.name[:-len(f".{KEYS}.npy")]
            if chunk in self._seen:
                continue
            self._seen.add(chunk)
            keys = self._intact(chunk, keys_file)
            if keys is None:
                log.warning("ignoring damaged cache chunk %s", keys_file)
                continue
            self._add_index(chunk, keys)
            added += 1
        return added

    def _intact(self, chunk: str, keys_file: Path) -> np.ndarray | None:
        """The chunk's keys ``(M, 32)`` when the keys and every array file are readable with ``M`` rows, else None."""
        try:
            keys = np.load(keys_file)
            if keys.ndim != 2 or keys.shape[1] != DIGEST_BYTES:
                return None
            for name in self.arrays:
                if np.load(self.dir / f"{chunk}.{name}.npy", mmap_mode="r").shape[:1] != (len(keys),):
                    return None
        except (OSError, ValueError):
            return None
        return keys

    def _add_index(self, chunk: str, keys: Sequence) -> None:
        for row, k in enumerate(keys):
            self._index.setdefault(bytes(k), (chunk, row))

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: Sequence[bytes], arrays: Mapping[str, np.ndarray]) -> str:
        """Commit one chunk (:func:`write_chunk`) and index it → its id."""
        if tuple(arrays) != self.arrays:
            raise ValueError(f"a chunk of arrays {tuple(arrays)} for a store of {self.arrays}")
        chunk = write_chunk(self.dir, keys, arrays)
        self._seen.add(chunk)
        self._add_index(chunk, keys)
        return chunk

    def _mapped(self, chunk: str) -> dict[str, np.ndarray]:
        arrays = self._open.get(chunk)
        if arrays is None:
            arrays = self._open[chunk] = {n: np.load(self.dir / f"{chunk}.{n}.npy", mmap_mode="r")
                                          for n in self.arrays}
            if len(self._open) > MAX_MAPPED_CHUNKS:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(chunk)
        return arrays

    def read(self, keys: Sequence[bytes]) -> dict[str, list[np.ndarray]]:
        """The rows of ``keys`` in order, per array (copies, not views of the mapped files); KeyError naming how
        many keys are missing, before anything is read."""
        missing = sum(1 for k in keys if k not in self._index)
        if missing:
            raise KeyError(f"{missing} of {len(keys)} keys are not in the cache {self.dir}")
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.arrays}
        for k in keys:
            chunk, row = self._index[k]
            for name, array in self._mapped(chunk).items():
                out[name].append(np.array(array[row]))
        return out
