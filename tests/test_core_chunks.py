"""Several writers on one feature cache folder (two extract runs, or Ray actors): nothing is overwritten."""
from __future__ import annotations

import numpy as np

from pipeline.extraction.cache import FeatureCache, write_chunk


def _digests(tag: int, n: int) -> list[bytes]:
    return [bytes([tag, i]) * 16 for i in range(n)]


def test_two_writers_opened_on_the_same_folder_keep_both_chunks(tmp_path):
    a = FeatureCache(tmp_path, "key", {"k": 1}, dim=3)
    b = FeatureCache(tmp_path, "key", {"k": 1}, dim=3)  # opened before a wrote anything, as a second process
    fa = np.arange(6, dtype=np.float32).reshape(2, 3)
    fb = -np.arange(9, dtype=np.float32).reshape(3, 3)
    a.add_chunk(_digests(1, 2), fa)
    b.add_chunk(_digests(2, 3), fb)
    write_chunk(a.dir, _digests(3, 1), np.ones((1, 3), np.float32))  # an actor writing without an index
    assert len(list(a.dir.glob("*.keys.npy"))) == 3
    assert a.refresh() == 2 and len(a) == 6  # b's chunk and the actor's
    np.testing.assert_array_equal(a.get_many(_digests(2, 3)), fb)
    fresh = FeatureCache(tmp_path, "key", {"k": 1}, dim=3)
    expected = np.concatenate([fa, np.ones((1, 3), np.float32)])
    np.testing.assert_array_equal(fresh.get_many(_digests(1, 2) + _digests(3, 1)), expected)


def test_a_chunk_whose_keys_never_landed_is_invisible(tmp_path):
    cache = FeatureCache(tmp_path, "key", {"k": 1}, dim=3)
    # A writer killed between its two renames leaves features without keys: not a chunk.
    np.save(cache.dir / "0000-dead.feats.npy", np.ones((2, 3), np.float32))
    (cache.dir / ".0001-dead.keys.npy.tmp-123.npy").write_bytes(b"torn")
    assert cache.refresh() == 0 and len(FeatureCache(tmp_path, "key", {"k": 1}, dim=3)) == 0
