"""What extract computes (pipeline/extraction/work.py): the images with anything missing from the feature cache,
once per content digest, views only for training rows; each decoded batch turned into clean and view features under
their cache digests; committed to the cache a chunk at a time."""
import hashlib

import numpy as np
import pytest
from conftest import make_images

from pipeline.core.io import file_digests
from pipeline.core.params import AugmentParams
from pipeline.data.augment import augment_uint8, view_key
from pipeline.data.images import load_batch
from pipeline.extraction import work
from pipeline.extraction.cache import FeatureCache
from pipeline.extraction.work import Work, augment_spec, compute_missing, compute_work, plan_work, view_digest

SIZE = 16
AUG = AugmentParams()
SPEC = augment_spec(AUG)


def _d(i: int) -> bytes:
    return hashlib.sha256(bytes([i])).digest()


def _infer(batch: np.ndarray) -> np.ndarray:
    """A stand-in backbone: each image's mean colour and brightness spread (a pure function of the image)."""
    x = batch.astype(np.float32)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2, 3))[:, None]], axis=1)


def test_plan_lists_whats_missing_once_per_digest_views_first_in_manifest_order(tmp_path):
    cache = FeatureCache(tmp_path, "k", {}, dim=4)
    # d0 cached with both views; d1 cached clean with view 0; d2, d3 nothing.
    cache.add_chunk([_d(0), view_digest(_d(0), 0, SPEC), view_digest(_d(0), 1, SPEC), _d(1),
                     view_digest(_d(1), 0, SPEC)], np.zeros((5, 4), np.float32))
    rows = [("a.png", _d(0), True), ("b.png", _d(1), True), ("c.png", _d(2), False), ("v.png", _d(4), False),
            ("d.png", _d(3), True), ("c copy.png", _d(2), True), ("e.png", _d(3), False)]  # c again, in train
    paths, digests, train = zip(*rows)
    plan = plan_work(cache, paths, digests, train, views=2, spec=SPEC)
    assert plan == [Work(_d(1), "b.png", False, (1,)),  # with views to compute first, in manifest order
                    Work(_d(2), "c.png", True, (0, 1)),  # the first path of a digest, views from its train row
                    Work(_d(3), "d.png", True, (0, 1)),
                    Work(_d(4), "v.png", True, ())]  # then the rest (val and test), in manifest order
    assert plan_work(cache, paths[:1], digests[:1], train[:1], views=2, spec=SPEC) == []
    only_clean = plan_work(cache, ["c.png"], [_d(2)], [False], views=2, spec=SPEC)
    assert only_clean == [Work(_d(2), "c.png", True, ())]


def test_a_views_digest_depends_on_the_image_the_view_and_the_augment_params():
    other = augment_spec(AugmentParams(rotation=0.0))
    keys = {view_digest(_d(0), 0, SPEC), view_digest(_d(0), 1, SPEC), view_digest(_d(1), 0, SPEC),
            view_digest(_d(0), 0, other), _d(0)}
    assert len(keys) == 5


def test_compute_work_gives_clean_features_then_each_view_under_its_digest(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=1, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    digests = file_digests(paths)
    items = [Work(digests[0], paths[0], True, (0, 1)), Work(digests[1], paths[1], False, (1,)),
             Work(digests[2], paths[2], True, ())]
    images = load_batch(paths, SIZE)
    keys, feats = compute_work(_infer, images, items, AUG, SPEC)
    assert keys == [digests[0], digests[2], view_digest(digests[0], 0, SPEC), view_digest(digests[0], 1, SPEC),
                    view_digest(digests[1], 1, SPEC)]
    view = lambda i, k: _infer(augment_uint8(images[i:i + 1], AUG, [view_key(digests[i], k)]))[0]  # noqa: E731
    want = np.stack([_infer(images[:1])[0], _infer(images[2:3])[0], view(0, 0), view(0, 1), view(1, 1)])
    np.testing.assert_allclose(feats, want, rtol=1e-6)
    assert not np.allclose(feats[2], feats[0])  # a view is not the clean image


def test_compute_missing_commits_a_chunk_every_chunk_images_outputs(tmp_path, monkeypatch):
    raw = make_images(tmp_path / "raw", per_class=3, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    digests = file_digests(paths)
    cache = FeatureCache(tmp_path / "cache", "k", {}, dim=4)
    monkeypatch.setattr(work, "CHUNK_IMAGES", 4)
    todo = plan_work(cache, paths, digests, [True] * 9, views=1, spec=SPEC)  # 18 outputs
    assert compute_missing(_infer, cache, todo, AUG, SPEC, SIZE, batch_size=3) >= 0
    # Batches of 3 images give 6 outputs: each passes the 4-output mark, so one chunk per batch.
    assert len(list(cache.dir.glob("*.keys.npy"))) == 3
    assert len(cache) == 18 and plan_work(cache, paths, digests, [True] * 9, views=1, spec=SPEC) == []
    np.testing.assert_allclose(cache.get_many(digests), _infer(load_batch(paths, SIZE)), rtol=1e-6)
    with pytest.raises(KeyError):
        cache.get_many([view_digest(digests[0], 1, SPEC)])  # only the view asked for
