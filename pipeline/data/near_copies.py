"""Perceptual hashes and near-copy search: which images are (nearly) the same picture.

A 64-bit pHash (:func:`imagehash.phash`: the signs of the 8 x 8 lowest DCT frequencies of the
image in grey at 32 x 32) barely moves when a picture is re-encoded, resized, or is the next
frame of a video, while two different photos differ in about half their bits. Prepare hashes
every image it decodes and keeps images within ``data.group_hash_bits`` bits of each other in
one split; evaluate counts test images that near-copy a training image; the audit lists pairs.

The search is a multi-index hash (Norouzi et al., 2012), not all pairs: two hashes within
``k`` bits agree exactly on at least one of ``k + 1`` disjoint chunks of their bits
(pigeonhole), so only hashes that share a chunk value are compared. With k = 4 the chunks are
12-13 bits wide; the cost grows with the number of hashes sharing a chunk value, about N² / 2¹²
comparisons at N images for uniform hashes instead of N² / 2 (docs/benchmarks/grouping.md).

Imports from pipeline: nothing. Third-party: numpy, scipy, imagehash, Pillow.
"""
from __future__ import annotations

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# 64 bits: imagehash's default 8 x 8 DCT corner.
HASH_BITS = 64
# Bits within which two images are near-copies where no param says otherwise (data.group_hash_bits'
# default): every re-encoded or resized copy planted in three real photo sets was within 4.
DEFAULT_BITS = 4


def phash(image: np.ndarray) -> int:
    """pHash of an (H, W, 3) uint8 RGB image → a 64-bit int (bit 63 = the DCT's first coefficient)."""
    bits = imagehash.phash(Image.fromarray(image)).hash.reshape(-1)
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def to_hex(h: int) -> str:
    """A hash as 16 hex digits, as the manifest stores it."""
    return f"{h:016x}"


def from_hex(texts: list[str]) -> np.ndarray:
    """Hex hashes (as :func:`to_hex` writes them) → (N,) uint64; ValueError on an empty or bad one."""
    return np.array([int(t, 16) for t in texts], dtype=np.uint64)


def _chunks(max_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of ``max_bits + 1`` disjoint chunks covering the 64 bits."""
    m = max_bits + 1
    widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def _value_pairs(values: np.ndarray, max_bits: int) -> np.ndarray:
    """Pairs (a < b) of indices into the distinct ``values`` (M,) uint64 within ``max_bits`` bits → (P, 2) int64."""
    m = len(values)
    if m < 2 or max_bits < 0:
        return np.zeros((0, 2), np.int64)
    if max_bits >= HASH_BITS - 1:  # every pair; chunks would be empty
        a, b = np.triu_indices(m, 1)
        return np.stack([a, b], 1).astype(np.int64)
    found = []
    for shift, width in _chunks(max_bits):
        keys = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        sizes = np.diff(np.r_[starts, m])
        for s, n in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[s:s + n]
            a, b = np.triu_indices(n, 1)
            ia, ib = members[a], members[b]
            close = np.bitwise_count(values[ia] ^ values[ib]) <= max_bits
            lo, hi = np.minimum(ia[close], ib[close]), np.maximum(ia[close], ib[close])
            found.append(lo.astype(np.int64) * m + hi)
    if not found:
        return np.zeros((0, 2), np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // m, codes % m], 1)


def near_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Every pair (i < j) of images whose (N,) uint64 hashes differ in at most ``max_bits`` bits
    → (P, 2) int64, sorted. ``max_bits`` -1: none. Identical hashes are pairs too."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if max_bits < 0 or len(hashes) < 2:
        return np.zeros((0, 2), np.int64)
    values, inverse = np.unique(hashes, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    out = []
    for g in members:  # identical hashes
        if len(g) > 1:
            a, b = np.triu_indices(len(g), 1)
            out.append(np.stack([g[a], g[b]], 1))
    for va, vb in _value_pairs(values, max_bits):
        ga, gb = members[va], members[vb]
        out.append(np.stack([np.repeat(ga, len(gb)), np.tile(gb, len(ga))], 1))
    if not out:
        return np.zeros((0, 2), np.int64)
    pairs = np.sort(np.concatenate(out).astype(np.int64), axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by ``edges`` (E, 2) → (n,) int component label."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def near_copy_edges(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Edges (E, 2) that join every image to its near-copies (within ``max_bits``), without listing
    every pair of a large set of identical images: each image with a hash that others share is
    linked to the first of them, and one image per distinct hash to its near-copies'."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if max_bits < 0 or len(hashes) < 2:
        return np.zeros((0, 2), np.int64)
    values, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    same = np.stack([np.arange(len(hashes)), first[inverse]], 1)
    same = same[same[:, 0] != same[:, 1]]
    close = first[_value_pairs(values, max_bits)]
    return np.concatenate([same, close.reshape(-1, 2)]).astype(np.int64)


def near_copy_elsewhere(hashes: np.ndarray, labels: np.ndarray, max_bits: int) -> np.ndarray:
    """Which images have a near-copy (within ``max_bits`` bits) whose label (e.g. split id, (N,) small ints
    < 63) differs from theirs → (N,) bool. Works on distinct hash values, so a thousand identical blank
    frames cost one comparison, not half a million pairs."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    labels = np.asarray(labels, dtype=np.int64)
    if max_bits < 0 or len(hashes) < 2:
        return np.zeros(len(hashes), bool)
    values, inverse = np.unique(hashes, return_inverse=True)
    own = np.zeros(len(values), np.int64)
    np.bitwise_or.at(own, inverse, np.left_shift(1, labels))
    seen = own.copy()
    pairs = _value_pairs(values, max_bits)
    np.bitwise_or.at(seen, pairs[:, 0], own[pairs[:, 1]])
    np.bitwise_or.at(seen, pairs[:, 1], own[pairs[:, 0]])
    return (seen[inverse] & ~np.left_shift(1, labels)) != 0


def closest(hashes: np.ndarray, i: int, among: np.ndarray) -> int:
    """The index, among the rows where ``among`` (N,) bool is true, whose hash is closest to row ``i``'s."""
    rows = np.flatnonzero(among)
    return int(rows[np.argmin(np.bitwise_count(hashes[rows] ^ hashes[i]))])
