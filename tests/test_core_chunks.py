"""The chunk-commit protocol under both on-disk caches (pipeline/core/chunks.py): the keys file is the commit, so a
chunk is all there or invisible; a damaged chunk is skipped with a warning; several writers (two extract runs, or
Ray actors) commit into one folder without overwriting each other; reads map a bounded number of chunks."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from pipeline.core import chunks
from pipeline.core.chunks import DIGEST_BYTES, MAX_MAPPED_CHUNKS, ChunkStore, write_chunk

ARRAYS = ("acts", "scale")


def _keys(tag: int, n: int) -> list[bytes]:
    return [bytes([tag, i]) * (DIGEST_BYTES // 2) for i in range(n)]


def _arrays(tag: int, n: int) -> dict[str, np.ndarray]:
    return {"acts": np.full((n, 2, 3), tag, np.float16) + np.arange(n, dtype=np.float16)[:, None, None],
            "scale": np.full(n, tag * 10, np.float32)}


def _mapped_chunk_files(folder) -> set[str]:
    """The files of ``folder`` this process has memory-mapped now (what counts towards its RSS)."""
    with open(f"/proc/{os.getpid()}/maps") as fh:
        return {line.split()[-1] for line in fh if str(folder) in line}


def test_rows_come_back_by_key_in_the_order_asked(tmp_path):
    store = ChunkStore(tmp_path, ARRAYS)
    store.add(_keys(1, 3), _arrays(1, 3))
    store.add(_keys(2, 2), _arrays(2, 2))
    rows = store.read([_keys(2, 2)[1], _keys(1, 3)[0], _keys(1, 3)[2]])
    np.testing.assert_array_equal(np.stack(rows["acts"]), np.stack([_arrays(2, 2)["acts"][1], _arrays(1, 3)["acts"][0],
                                                                     _arrays(1, 3)["acts"][2]]))
    assert [float(s) for s in rows["scale"]] == [20.0, 10.0, 10.0]
    assert not any(isinstance(r, np.memmap) or r.base is not None for r in rows["acts"])  # copies, not file views
    assert len(store) == 5 and _keys(1, 3)[1] in store and _keys(3, 1)[0] not in store
    assert len(ChunkStore(tmp_path, ARRAYS)) == 5  # a fresh reader finds every committed chunk


def test_two_writers_opened_on_the_same_folder_keep_both_chunks(tmp_path):
    a = ChunkStore(tmp_path, ARRAYS)
    b = ChunkStore(tmp_path, ARRAYS)  # opened before a wrote anything, as a second process
    ids = {a.add(_keys(1, 2), _arrays(1, 2)), b.add(_keys(2, 3), _arrays(2, 3)),
           write_chunk(tmp_path, _keys(3, 1), _arrays(3, 1))}  # an actor writing without an index
    assert len(ids) == 3 and len(list(tmp_path.glob("*.keys.npy"))) == 3
    assert a.refresh() == 2 and len(a) == 6  # b's chunk and the actor's
    assert b.refresh() == 2 and a.refresh() == 0  # each chunk indexed once
    np.testing.assert_array_equal(np.stack(a.read(_keys(2, 3))["acts"]), _arrays(2, 3)["acts"])
    np.testing.assert_array_equal(np.stack(b.read(_keys(3, 1))["acts"]), _arrays(3, 1)["acts"])


def test_a_chunk_whose_keys_never_landed_is_invisible(tmp_path):
    store = ChunkStore(tmp_path, ARRAYS)
    # A writer killed between its renames leaves arrays without keys: not a chunk.
    np.save(tmp_path / "0000-dead.acts.npy", np.ones((2, 2, 3), np.float16))
    np.save(tmp_path / "0000-dead.scale.npy", np.ones(2, np.float32))
    (tmp_path / ".0000-dead.keys.npy.tmp-123.npy").write_bytes(b"torn")
    assert store.refresh() == 0 and len(ChunkStore(tmp_path, ARRAYS)) == 0


def _damage(folder, how: str) -> None:
    chunk = next(folder.glob("*.keys.npy")).name[:-len(".keys.npy")]
    if how == "keys malformed":
        np.save(folder / f"{chunk}.keys.npy", np.zeros((2, DIGEST_BYTES - 1), np.uint8))
    elif how == "keys not a .npy":
        (folder / f"{chunk}.keys.npy").write_bytes(b"not numpy at all")
    elif how == "array missing":
        (folder / f"{chunk}.scale.npy").unlink()
    elif how == "array rows differ":
        np.save(folder / f"{chunk}.acts.npy", np.zeros((3, 2, 3), np.float16))
    elif how == "array truncated":
        path = folder / f"{chunk}.acts.npy"
        path.write_bytes(path.read_bytes()[:-5])


@pytest.mark.parametrize("how", ["keys malformed", "keys not a .npy", "array missing", "array rows differ",
                                 "array truncated"])
def test_a_damaged_chunk_is_skipped_with_a_warning_and_the_others_served(tmp_path, caplog, how):
    bad = tmp_path / "bad"
    write_chunk(bad, _keys(1, 2), _arrays(1, 2))
    _damage(bad, how)
    for name in os.listdir(bad):
        os.replace(bad / name, tmp_path / name)
    good = write_chunk(tmp_path, _keys(2, 3), _arrays(2, 3))
    with caplog.at_level(logging.WARNING, logger="pipeline.core.chunks"):
        store = ChunkStore(tmp_path, ARRAYS)
    assert len(store) == 3 and not any(k in store for k in _keys(1, 2))  # computed again by the caller
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 1 and good not in damaged[0], damaged
    np.testing.assert_array_equal(np.stack(store.read(_keys(2, 3))["acts"]), _arrays(2, 3)["acts"])


def test_a_read_of_missing_keys_names_how_many_before_reading_anything(tmp_path):
    ChunkStore(tmp_path, ARRAYS).add(_keys(1, 2), _arrays(1, 2))
    store = ChunkStore(tmp_path, ARRAYS)
    with pytest.raises(KeyError, match=rf"2 of 3 keys are not in the cache {tmp_path}"):
        store.read([_keys(1, 2)[0], *_keys(9, 2)])
    assert _mapped_chunk_files(tmp_path) == set()  # the present key was not read either


def test_at_most_max_mapped_chunks_are_mapped_at_once(tmp_path):
    store = ChunkStore(tmp_path, ARRAYS)
    n_chunks = MAX_MAPPED_CHUNKS + 3
    for c in range(n_chunks):
        store.add(_keys(c, 2), _arrays(c, 2))
    for c in range(n_chunks):  # a long run touches every chunk
        rows = store.read(_keys(c, 2))
        np.testing.assert_array_equal(np.stack(rows["acts"]), _arrays(c, 2)["acts"])
        mapped = _mapped_chunk_files(tmp_path)
        assert len(mapped) <= MAX_MAPPED_CHUNKS * len(ARRAYS), sorted(mapped)
    assert len(mapped) == MAX_MAPPED_CHUNKS * len(ARRAYS)  # the most recent chunks stay mapped


def test_a_chunk_must_hold_one_row_per_key_and_the_stores_arrays(tmp_path):
    with pytest.raises(ValueError, match=r"a chunk of 2 keys with arrays of \{'acts': 2, 'scale': 3\} rows"):
        write_chunk(tmp_path, _keys(1, 2), {"acts": np.zeros((2, 1)), "scale": np.zeros(3)})
    with pytest.raises(ValueError, match=r"a chunk of arrays \('acts',\) for a store of \('acts', 'scale'\)"):
        ChunkStore(tmp_path, ARRAYS).add(_keys(1, 2), {"acts": np.zeros((2, 1))})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_chunk_ids_sort_by_age_and_never_collide():
    ids = [chunks.new_chunk_id() for _ in range(200)]
    assert len(set(ids)) == 200 and ids == sorted(ids, key=lambda i: int(i.split("-")[0]))
