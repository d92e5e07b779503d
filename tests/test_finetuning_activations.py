"""The frozen bottom's activations (pipeline/finetuning/activations.py): stored as row-scaled float16 under the
chunk protocol, read back within float16's precision, each (image, view) computed once and the engine built only
when something is missing; on a real backbone, what the full model computes at the boundary, and a view is the
bottom on the image augmented by its own key (fine-tuning's views, not extract's)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ACTIVATION_SHAPE, StandInBottom, make_images, pipeline_until_head, stand_in_activations

from pipeline.backbones.build import (
    Preprocess,
    backbone_provenance,
    build_backbone,
    get_base,
    resolve_unfreeze_from,
)
from pipeline.backbones.registry import image_size
from pipeline.core.chunks import MAX_MAPPED_CHUNKS
from pipeline.core.io import file_digests, library_versions
from pipeline.core.manifest import read_manifest
from pipeline.core.params import AugmentParams
from pipeline.data.augment import augment_uint8, finetune_views, view_key
from pipeline.data.images import load_batch
from pipeline.finetuning import activations
from pipeline.finetuning.activations import ActivationCache, Activations, bottom_engine, cache_key, entry
from pipeline.finetuning.cut import cut_at
from pipeline.finetuning.recipe import fold_bn_scale, unfreeze_from
from pipeline.finetuning.stream import epoch_view
from pipeline.models.heads import build_stacked, load_model
from pipeline.runtime.engines import compile_engine

FLOAT16_REL = 2.0 ** -11  # float16's relative rounding


def _keys(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) * 16 for i in range(n)]


def test_rows_are_stored_as_row_scaled_float16_and_read_back_within_its_precision(tmp_path):
    rng = np.random.default_rng(0)
    magnitudes = [1e-8, 1.0, 3e5, 0.0, 70.0]  # below float16's normal range, ordinary, above its 65504 maximum
    acts = np.stack([rng.normal(size=ACTIVATION_SHAPE) * m for m in magnitudes]).astype(np.float32)
    cache = ActivationCache(tmp_path, "key", {"k": 1}, ACTIVATION_SHAPE)
    cache.add(_keys(5), acts)
    (stored,) = cache.dir.glob("*.acts.npy")
    (scale,) = cache.dir.glob("*.scale.npy")
    assert np.load(stored).dtype == np.float16 and np.abs(np.load(stored)).max() <= 1.0
    assert np.load(scale).dtype == np.float32  # half the bytes of float32, a float32 scale per row
    got = cache.get_many(_keys(5)[::-1])[::-1]
    assert got.dtype == np.float32 and got.shape == (5, *ACTIVATION_SHAPE)
    for row, want in zip(got, acts):
        bound = FLOAT16_REL * np.abs(want).max()
        assert np.abs(row - want).max() <= bound, (np.abs(want).max(), np.abs(row - want).max())
    np.testing.assert_array_equal(got[3], 0.0)


def test_each_add_is_one_committed_chunk_that_any_reader_of_the_folder_finds(tmp_path):
    a = ActivationCache(tmp_path, "key", {"k": 1}, ACTIVATION_SHAPE)
    b = ActivationCache(tmp_path, "key", {"k": 2}, ACTIVATION_SHAPE)  # a second run, opened before a wrote
    a.add(_keys(3, 1), np.ones((3, *ACTIVATION_SHAPE), np.float32))
    b.add(_keys(2, 2), np.full((2, *ACTIVATION_SHAPE), 2.0, np.float32))
    assert len(list(a.dir.glob("*.keys.npy"))) == 2 and (a.dir / "meta.json").read_text().count('"k": 1') == 1
    assert _keys(2, 2)[0] not in a
    a.refresh()
    assert len(a) == 5 and len(ActivationCache(tmp_path, "key", {}, ACTIVATION_SHAPE)) == 5
    np.testing.assert_array_equal(a.get_many(_keys(2, 2)), 2.0)
    assert a.get_many([]).shape == (0, *ACTIVATION_SHAPE)
    with pytest.raises(KeyError, match="2 of 3 keys are not in the cache"):
        a.get_many([_keys(3, 1)[0], *_keys(2, 9)])
    with pytest.raises(ValueError, match=r"activations of shape \(2, 2, 4\) for a cache of \(2, 2, 3\)"):
        a.add(_keys(1, 3), np.ones((1, 2, 2, 4), np.float32))


def test_reads_across_many_chunks_keep_few_mapped(tmp_path):
    cache = ActivationCache(tmp_path, "key", {}, ACTIVATION_SHAPE)
    for c in range(MAX_MAPPED_CHUNKS + 4):
        cache.add(_keys(2, c), np.full((2, *ACTIVATION_SHAPE), c, np.float32))
    for c in range(MAX_MAPPED_CHUNKS + 4):
        np.testing.assert_array_equal(cache.get_many(_keys(2, c)), c)
        with open(f"/proc/{os.getpid()}/maps") as fh:
            mapped = {line.split()[-1] for line in fh if str(cache.dir) in line}
        assert len(mapped) <= 2 * MAX_MAPPED_CHUNKS, sorted(mapped)  # acts + scale per chunk


@pytest.fixture
def images(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=3, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    shutil.copy(paths[0], tmp_path / "raw" / "copy.png")  # the same image under another name
    return [*paths, str(tmp_path / "raw" / "copy.png")]


def test_ensure_computes_each_image_once_per_view_and_builds_the_engine_only_when_needed(tmp_path, images,
                                                                                         monkeypatch):
    monkeypatch.setattr(activations, "CHUNK", 3)
    digests = file_digests(images)
    bottom = StandInBottom()
    acts = stand_in_activations(tmp_path / "cache", bottom)
    assert acts.ensure(images, digests, None) == 9 and bottom.images == 9  # 10 paths, 9 distinct images
    assert len(list(acts.cache.dir.glob("*.keys.npy"))) == 3  # batches of 4, 4, 1 → chunks at 4, 4 and the rest
    assert acts.ensure(images, digests, None) == 0 and bottom.images == 9
    assert acts.ensure(images[:5], digests[:5], 1) == 5 and acts.ensure(images, digests, 1) == 4
    assert bottom.builds == 1 and bottom.images == 18 and acts.computed == 18
    # Another run on the warm cache converts no model and computes nothing.
    warm_bottom = StandInBottom()
    warm = stand_in_activations(tmp_path / "cache", warm_bottom)
    assert warm.ensure(images, digests, None) == 0 and warm.ensure(images, digests, 1) == 0
    assert warm_bottom.builds == 0
    np.testing.assert_array_equal(warm.cache.get_many(warm.keys(digests, None)),
                                  acts.cache.get_many(acts.keys(digests, None)))


def test_a_view_is_the_bottom_on_the_image_augmented_by_its_key(tmp_path, images):
    digests = file_digests(images)
    acts = stand_in_activations(tmp_path / "cache", StandInBottom(), seed=5)
    acts.ensure(images, digests, None)
    acts.ensure(images, digests, 2)
    clean, view = acts.cache.get_many(acts.keys(digests, None)), acts.cache.get_many(acts.keys(digests, 2))
    pixels = load_batch(images, 16)
    want = StandInBottom.compute(augment_uint8(pixels, acts.augment, [view_key(d, 2, finetune_views(5))
                                                                      for d in digests]))
    np.testing.assert_allclose(view, want, rtol=0, atol=FLOAT16_REL)
    np.testing.assert_allclose(clean, StandInBottom.compute(pixels), rtol=0, atol=FLOAT16_REL)
    assert np.abs(view - clean).max() > 0.01
    # An entry is keyed by content and view; a view also by the seed and the augment params.
    d = digests[0]
    other = AugmentParams(rotation=0.0)
    assert entry(d, None, acts.augment, 5) == entry(d, None, other, 1) == entry(digests[-1], None, other, 1)
    assert len({entry(d, None, acts.augment, 5), entry(d, 0, acts.augment, 5), entry(d, 2, acts.augment, 5),
                entry(d, 2, acts.augment, 6), entry(d, 2, other, 5), entry(digests[1], 2, acts.augment, 5)}) == 6


# On a real backbone: float16 keeps 11 significant bits (relative rounding <= 2^-11 ≈ 4.9e-4); ONNX Runtime vs
# TensorFlow adds ~1e-5 absolute (features within 1e-5, README "Inference engines").
REL_TOL, ABS_TOL = 1e-3, 1e-3


def test_stored_activations_are_the_full_models_boundary_and_extracts_views(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path)
    size = image_size(params.backbone)
    head, _ = load_model(out / "head.keras")
    backbone = build_backbone(params.backbone)
    stacked = build_stacked(backbone, head)
    base = get_base(backbone)
    cut = resolve_unfreeze_from(params.finetune.unfreeze_from, params.backbone.name)
    unfreeze_from(base, cut, params.backbone.name)
    fold_bn_scale(base)
    split = cut_at(backbone, head, cut)

    train = read_manifest(out / "manifest.csv", splits=("train",))
    paths = [str(raw / it.path) for it in train]
    digests = file_digests(paths)
    _, desc = bottom_engine()
    key, kdesc = cache_key(backbone_provenance(params.backbone), split.boundary, desc, library_versions())
    with tempfile.TemporaryDirectory() as scratch:
        cache = ActivationCache(Path(scratch), key, kdesc, split.activation_shape)
        acts = Activations(cache, lambda: compile_engine(split.bottom, size, "onnxruntime", 8), params.augment,
                           params.seed, size, 8)
        assert acts.ensure(paths, digests, None) == len(set(digests))
        assert acts.ensure(paths, digests, 0) == len(set(digests))
        assert acts.ensure(paths, digests, 0) == 0  # cached: nothing computed twice
        clean = cache.get_many(acts.keys(digests, None))
        view0 = cache.get_many(acts.keys(digests, 0))

    # What the full model computes at the boundary, in TensorFlow: the base's own tensor on preprocessed pixels.
    inner = keras.Model(base.input, base.get_layer(split.boundary).input)
    images = load_batch(paths, size).astype(np.float32)
    ref = inner(Preprocess(backbone.get_layer("preprocess").mode)(images)).numpy()
    assert clean.shape == ref.shape == (len(paths), *split.activation_shape)
    err = np.abs(clean - ref)
    assert np.all(err <= REL_TOL * np.abs(ref) + ABS_TOL), f"max error {err.max():.2e}"
    assert err.max() > 0  # float16 storage rounds: the comparison is not vacuous

    # The top continues exactly where the stacked model is (the same layers, the same weights).
    np.testing.assert_allclose(split.top.predict_on_batch(ref), stacked.predict_on_batch(images), atol=1e-5)

    # View 0 is the bottom's output on the image augmented by its own key (content, seed, view), rounded to
    # uint8 like a decoded image: what the full model computes at the boundary for that view.
    keys = [view_key(d, 0, finetune_views(params.seed)) for d in digests]
    ref_view = inner(Preprocess(backbone.get_layer("preprocess").mode)(
        augment_uint8(load_batch(paths, size), params.augment, keys).astype(np.float32))).numpy()
    err = np.abs(view0 - ref_view)
    assert np.all(err <= REL_TOL * np.abs(ref_view) + ABS_TOL), f"max error {err.max():.2e}"
    assert np.abs(view0 - clean).max() > 1.0  # the view is augmented, not the clean image
    # Fine-tuning's views are not extract's (the head was fitted on those): every key differs.
    assert all(k != view_key(d, 0) for k, d in zip(keys, digests))
    assert epoch_view(0, params.finetune.views) == 0 == epoch_view(params.finetune.views, params.finetune.views)
