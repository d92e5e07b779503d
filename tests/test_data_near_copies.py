"""pipeline.data.near_copies: pHash of decoded images, the multi-index near-copy search, components."""
import io

import numpy as np
import pytest
from conftest import render

from pipeline.data.images import load_image
from pipeline.data.near_copies import (
    closest,
    components,
    from_hex,
    near_copy_edges,
    near_copy_elsewhere,
    near_pairs,
    phash,
    to_hex,
)


@pytest.mark.parametrize("k", [0, 1, 3, 4, 6, 9])
def test_multi_index_search_equals_brute_force(k):
    rng = np.random.default_rng(k)
    h = rng.integers(0, 2**63, 300, dtype=np.uint64) | (rng.integers(0, 2, 300, dtype=np.uint64) << np.uint64(63))
    for i in range(0, 300, 7):  # near-copies at every distance 0..k+2, and exact repeats
        flips = rng.choice(64, size=rng.integers(0, k + 3), replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    h[200:205] = h[3]
    brute = [(i, j) for i in range(300) for j in range(i + 1, 300) if bin(int(h[i] ^ h[j])).count("1") <= k]
    assert [tuple(p) for p in near_pairs(h, k)] == brute
    assert len(brute) > 10
    # Components from the sparse edges are those of every pair.
    assert np.array_equal(_canonical(components(300, near_copy_edges(h, k))),
                          _canonical(components(300, np.array(brute).reshape(-1, 2))))


def _canonical(labels):
    first = {}
    return np.array([first.setdefault(v, len(first)) for v in labels])


def test_off_finds_nothing():
    h = np.zeros(5, np.uint64)
    assert len(near_pairs(h, -1)) == 0 and len(near_copy_edges(h, -1)) == 0
    assert len(near_pairs(h, 0)) == 10


def test_a_resized_reencoded_copy_hashes_close_and_another_image_far(tmp_path):
    img = render("circle", np.random.default_rng(1), 200)
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.resize((130, 130)).save(buf, format="JPEG", quality=40)
    (tmp_path / "b.jpg").write_bytes(buf.getvalue())
    render("stripes", np.random.default_rng(2), 200).save(tmp_path / "c.png")
    a, b, c = (phash(load_image(str(tmp_path / n), 224)) for n in ("a.png", "b.jpg", "c.png"))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ c).count("1")


def test_hex_round_trip_and_bit_order_match_imagehash():
    import imagehash
    from PIL import Image

    img = np.asarray(render("circle", np.random.default_rng(4), 64))
    h = phash(img)
    assert from_hex([to_hex(h)])[0] == h and len(to_hex(h)) == 16
    assert to_hex(h) == str(imagehash.phash(Image.fromarray(img)))  # imagehash's own hex form


def test_near_copy_elsewhere_equals_brute_force_and_stays_small_on_many_identical_hashes():
    rng = np.random.default_rng(5)
    h = rng.integers(0, 2**63, 200, dtype=np.uint64)
    for i in range(0, 200, 9):
        h[i + 1] = h[i] ^ np.uint64(0b1011)
    h[150:180] = h[0]  # thirty identical hashes
    labels = rng.integers(0, 3, 200)
    brute = np.array([any(bin(int(h[i] ^ h[j])).count("1") <= 4 and labels[i] != labels[j] for j in range(200))
                      for i in range(200)])
    got = near_copy_elsewhere(h, labels, 4)
    assert np.array_equal(got, brute) and got.sum() > 10
    assert not near_copy_elsewhere(h, np.zeros(200, int), 4).any()  # one label: nothing elsewhere
    assert not near_copy_elsewhere(h, labels, -1).any()
    i = int(np.flatnonzero(got)[0])
    j = closest(h, i, labels != labels[i])
    assert labels[j] != labels[i] and bin(int(h[i] ^ h[j])).count("1") <= 4
