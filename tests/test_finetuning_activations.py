"""Fine-tuning's data path: the frozen bottom run once per view, the top trained on stored activations.

The activations the top trains on must be what the full model computes at the boundary (to the
float16 storage), the views must be extract's views (the head was fitted on them), the top must
continue the stacked model exactly, and a run from a warm activation cache must equal a cold one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import finetune
from pipeline.backbones.build import (
    Preprocess,
    backbone_provenance,
    build_backbone,
    get_base,
    resolve_unfreeze_from,
)
from pipeline.backbones.registry import BackboneError, image_size
from pipeline.core.io import file_digests, library_versions, read_json
from pipeline.core.manifest import read_manifest
from pipeline.data.augment import augment_uint8, finetune_views, view_key
from pipeline.data.images import load_batch
from pipeline.finetuning.activations import ActivationCache, Activations, bottom_engine, cache_key
from pipeline.finetuning.cut import cut_at
from pipeline.finetuning.parity import CUT_TOLERANCE
from pipeline.finetuning.recipe import fold_bn_scale, unfreeze_from
from pipeline.finetuning.stream import epoch_view
from pipeline.models.heads import build_stacked, load_model
from pipeline.runtime.engines import compile_engine
from tests.conftest import pipeline_until_head

# float16 keeps 11 significant bits: relative rounding <= 2^-11 ≈ 4.9e-4; ONNX Runtime vs TensorFlow
# adds ~1e-5 absolute (features within 1e-5, README "Inference engines").
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


def test_a_run_from_a_warm_activation_cache_equals_a_cold_one(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"finetune.epochs": 3, "finetune.views": 2,
                                                    "finetune.patience": 5})
    cache = tmp_path / "acts"

    def tune(name: str) -> dict:
        return finetune.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                            val_features=feats["val"], head_path=out / "head.keras",
                            model_out=out / f"{name}.keras", history_out=out / f"{name}.csv",
                            metrics_out=out / f"{name}_metrics.json", params=params, activation_cache=cache)

    cold = tune("cold")
    n_train = len(read_manifest(out / "manifest.csv", splits=("train",)))
    n_val = len(read_manifest(out / "manifest.csv", splits=("val",)))
    # 3 epochs cycle 2 views: the bottom ran over 2 views of every train image and the clean val images.
    assert cold["bottom_images_computed"] == 2 * n_train + n_val
    assert cold["split_parity_max_abs_diff"] <= CUT_TOLERANCE
    warm = tune("warm")
    assert warm["bottom_images_computed"] == 0
    assert (out / "warm.csv").read_text() == (out / "cold.csv").read_text()
    a, _ = load_model(out / "cold.keras")
    b, _ = load_model(out / "warm.keras")
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    # The saved model is the full backbone + head, as the stacked model always was.
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert get_base(a).get_layer(resolve_unfreeze_from(params.finetune.unfreeze_from, params.backbone.name)) is not None
    assert read_json(out / "cold.json")["best_epoch"] == cold["best_epoch"]


def test_a_cut_that_a_skip_connection_crosses_is_refused():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1, name="a")(inp)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    c = keras.layers.Add(name="c")([a, keras.layers.Conv2D(4, 1, name="d")(b)])
    base = keras.Model(inp, c, name="base")
    image = keras.Input((8, 8, 3))
    x = Preprocess("tf", name="preprocess")(image)
    backbone = keras.Model(image, keras.layers.GlobalAveragePooling2D(name="avg_pool")(base(x)))
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    cut_at(backbone, head, "b")  # only a crosses: fine
    with pytest.raises(BackboneError, match="skip connection"):
        cut_at(backbone, head, "d")  # a and b cross
