"""Heads, backbones and the stacking parity that ties extract, train_head and finetune together."""

import keras
import numpy as np
import pytest
from conftest import as_params, pipeline_until_head, tiny_params
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline import finetune, train_head
from pipeline.backbones.build import (
    block_boundaries,
    build_backbone,
    get_base,
)
from pipeline.backbones.registry import BackboneError, resolve
from pipeline.core.params import parse_params
from pipeline.data.images import load_batch
from pipeline.extraction.features import ProvenanceError, read_features
from pipeline.finetuning.parity import ParityError, check_parity
from pipeline.finetuning.recipe import fold_bn_scale, unfreeze_from
from pipeline.models.heads import build_head, build_stacked, load_model, logreg_to_dense_weights


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_head_equals_sklearn(n_classes):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2, (n_classes, 16))
    y = rng.integers(0, n_classes, 300)
    x = (centers[y] + rng.normal(0, 1.5, (300, 16)) * rng.uniform(0.1, 5, 16)).astype(np.float32)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=0.5, max_iter=2000).fit(scaler.transform(x), y)
    head = build_head(16, n_classes)
    head.get_layer("probs").set_weights(list(logreg_to_dense_weights(clf.coef_, clf.intercept_, scaler.mean_,
                                                                     scaler.scale_, n_classes)))
    ref = clf.predict_proba(scaler.transform(x))
    got = head.predict_on_batch(x)
    assert got.shape == (300, n_classes)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(ref - 0.5).min() < 0.45  # probabilities are not trivially 0/1 everywhere




@pytest.mark.parametrize("backbone,weights", [
    ("efficientnet_lite0", "imagenet"),  # tf-style scaling, our port
    ("mobilenet_v2", "none"),  # tf-style scaling, keras.applications
    ("resnet50", "none"),  # caffe: BGR + mean
    ("efficientnetb0", "none"),  # rescaling inside the model
])
def test_stacked_model_computes_exactly_the_cached_features(tmp_path, backbone, weights):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"backbone.name": backbone,
                                                                "backbone.weights": weights})
    val = read_features(feats["val"])
    head, _ = load_model(out / "head.keras")
    stacked = build_stacked(build_backbone(params.backbone), head)
    images = load_batch([str(raw / p) for p in val.paths], 64).astype(np.float32)
    diff = check_parity(stacked, head, images, val.features)
    assert diff <= 1e-4  # README: stacking parity (TensorFlow stacked model vs head on cached features) within 1e-4
    # And the backbone alone (TensorFlow) reproduces the cached features (ONNX Runtime) within the engines' documented
    # 3e-5 (pipeline/runtime/engines.py; measured here 1.6e-5 on efficientnet_lite0's features up to ~5).
    np.testing.assert_allclose(build_backbone(params.backbone).predict_on_batch(images), val.features, rtol=0,
                               atol=3e-5)


def test_parity_catches_drift(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path)
    val = read_features(feats["val"])
    head, _ = load_model(out / "head.keras")
    drifted = parse_params({**tiny_params(str(raw)), "backbone": {**tiny_params()["backbone"], "pooling": "max",
                                                                 "image_size": 64}})
    stacked = build_stacked(build_backbone(drifted.backbone), head)
    images = load_batch([str(raw / p) for p in val.paths], 64).astype(np.float32)
    with pytest.raises(ParityError, match="drifted"):
        check_parity(stacked, head, images, val.features)


def test_train_head_refuses_features_from_other_params(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path)
    other = as_params(tiny_params(str(raw), **{"backbone.image_size": 96}))
    with pytest.raises(ProvenanceError, match="image_size"):
        train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=out / "classes.json",
                       head_out=out / "head2.keras", metrics_out=out / "m2.json", history_out=out / "h2.csv",
                       params=other)


def test_dense_head_trains_and_writes_history(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"head.type": "dense", "head.dense.epochs": 5})
    rows = (out / "h.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,accuracy,val_loss,val_accuracy" and len(rows) >= 2
    head, meta = load_model(out / "head.keras")
    assert meta["head_type"] == "dense" and meta["class_names"] == ["circle", "square", "stripes"]


# A fine-tune made to move on tiny data: a rate well above the default, no EMA, 2 epochs, an explicit boundary.
MOVING_FINETUNE = {"finetune.epochs": 2, "finetune.learning_rate": 3e-3, "finetune.ema": 0.0,
                   "finetune.patience": 5, "finetune.unfreeze_from": "block6a_expand_conv"}


def _weights_by_layer(base: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in base.layers if layer.weights}


def test_finetune_changes_exactly_the_unfrozen_weights_and_keeps_a_trained_epoch(tmp_path):
    """What finetune saved, against a fresh backbone folded the same way: below the boundary and every
    BatchNorm bit-identical, some kernel above it and the head changed, and a fine-tuned epoch kept."""
    raw, out, feats, params = pipeline_until_head(tmp_path, **MOVING_FINETUNE)
    metrics = finetune.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                           val_features=feats["val"], head_path=out / "head.keras", model_out=out / "model.keras",
                           history_out=out / "ft.csv", metrics_out=out / "ft.json", params=params)
    rows = (out / "ft.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + params.finetune.epochs, rows
    assert metrics["parity_max_abs_diff"] <= 1e-4
    # Epoch 0 is the head-only model: a kept epoch >= 1 means trained weights were kept, with a lower val loss.
    assert metrics["best_epoch"] >= 1, rows
    assert metrics["val_loss"] < metrics["head_only_val_loss"], rows
    model, meta = load_model(out / "model.keras")
    assert meta["kind"] == "finetuned" and meta["best_epoch"] == metrics["best_epoch"]
    boundary = meta["finetune_params"]["unfreeze_from"]
    assert boundary == MOVING_FINETUNE["finetune.unfreeze_from"]

    # The reference: a fresh backbone, unfrozen at the same boundary and folded as finetune folds it.
    fresh = get_base(build_backbone(params.backbone))
    unfreeze_from(fresh, boundary, params.backbone.name)
    assert fold_bn_scale(fresh) > 0
    ref = _weights_by_layer(fresh)
    tuned_base = get_base(model)
    got = _weights_by_layer(tuned_base)
    assert set(got) == set(ref)
    names = [layer.name for layer in fresh.layers]
    start = names.index(boundary)
    changed_above = []
    n_below = n_bn = 0
    for i, layer in enumerate(fresh.layers):
        if layer.name not in ref:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(got[layer.name], ref[layer.name]))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"BatchNorm {layer.name} changed: its gamma, beta and statistics must stay frozen"
            n_bn += 1
        elif i < start:
            assert same, f"{layer.name} is below the unfreeze boundary {boundary} but changed"
            n_below += 1
        elif not same:
            changed_above.append(layer.name)
    assert n_below > 0 and n_bn > 0
    assert changed_above, f"no layer at or above {boundary} changed: the backbone did not train"
    head, _ = load_model(out / "head.keras")
    tuned_head = next(layer for layer in model.layers if layer.name == head.name)
    # The softmax layer's kernel and bias only (a dropout layer's seed state moves without any training).
    assert any(not np.array_equal(a, b) for a, b in zip(tuned_head.get_layer("probs").get_weights(),
                                                         head.get_layer("probs").get_weights())), \
        "the head's weights did not change"


def test_finetune_epochs_zero_saves_the_head_only_model(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"finetune.epochs": 0})
    metrics = finetune.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                           val_features=feats["val"], head_path=out / "head.keras", model_out=out / "model.keras",
                           history_out=out / "ft.csv", metrics_out=out / "ft.json", params=params)
    assert metrics["best_epoch"] == 0
    model, _ = load_model(out / "model.keras")
    val = read_features(feats["val"])
    head, _ = load_model(out / "head.keras")
    images = load_batch([str(raw / p) for p in val.paths], 64).astype(np.float32)
    np.testing.assert_allclose(model.predict_on_batch(images), head.predict_on_batch(val.features), atol=1e-4)


def test_unknown_unfreeze_layer_lists_block_boundaries():
    params = parse_params({"backbone": {"image_size": 64}})
    base = get_base(build_backbone(params.backbone))
    with pytest.raises(BackboneError) as exc:
        unfreeze_from(base, "block9z_nope", "efficientnet_lite0")
    msg = str(exc.value)
    assert "block6a_expand_conv" in msg and "top_conv" in msg
    assert block_boundaries(base, "efficientnet_lite0")[0] == "block1a_dwconv"


def test_imagenet_weights_missing_from_keras_cache_say_where_to_put_them(tmp_path, monkeypatch):
    # An empty Keras home, whatever this machine's ~/.keras holds (Keras reads KERAS_HOME once, at import).
    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    params = parse_params({"backbone": {"name": "xception", "weights": "imagenet"}})
    with pytest.raises(BackboneError) as exc:
        resolve(params.backbone)
    msg = str(exc.value)
    assert "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "keras_home" / "models") in msg and "KERAS_HOME" in msg


def test_explicit_weights_file_is_loaded_and_a_foreign_one_refused(tmp_path):
    src = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    src.set_weights([w + 0.01 for w in src.get_weights()])
    path = tmp_path / "mnv2.weights.h5"
    src.save_weights(path)
    params = parse_params({"backbone": {"name": "mobilenet_v2", "weights": str(path), "image_size": 64}})
    base = get_base(build_backbone(params.backbone))
    for a, b in zip(base.get_weights(), src.get_weights()):
        np.testing.assert_array_equal(a, b)
    wrong = parse_params({"backbone": {"name": "resnet50", "weights": str(path), "image_size": 64}})
    with pytest.raises(BackboneError, match="does not fit resnet50"):
        build_backbone(wrong.backbone)
    with pytest.raises(BackboneError, match="neither 'imagenet'"):
        resolve(parse_params({"backbone": {"weights": str(tmp_path / "missing.h5")}}).backbone)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2"])
def test_fold_bn_scale_keeps_the_function_and_folds_only_the_unfrozen_convs(backbone):
    # efficientnet_lite0 with its real ImageNet weights (BN scales far from 1); mobilenet_v2 from
    # keras.applications (random weights, offline): the conv → BN lookup on another graph.
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
    params = parse_params(tiny_params(**{"backbone.name": backbone, "backbone.weights": weights}))
    model = build_backbone(params.backbone)
    base = get_base(model)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    before = model(x, training=False).numpy()
    frozen_before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.layers
                     if isinstance(layer, keras.layers.BatchNormalization)}
    boundary = block_boundaries(base, backbone)[-3]
    unfreeze_from(base, boundary, backbone)
    folded = fold_bn_scale(base)
    after = model(x, training=False).numpy()
    assert folded > 0
    scale = np.abs(before).max()
    assert np.max(np.abs(after - before)) <= 1e-5 * max(scale, 1.0), "folding changed the backbone's output"
    n_unit = 0
    for layer in base.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        gamma, _, _, var = layer.get_weights()
        conv = layer._inbound_nodes[0].parent_nodes[0].operation
        if conv.trainable and isinstance(conv, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            assert np.allclose(gamma / np.sqrt(var + layer.epsilon), 1.0, atol=1e-6)
            n_unit += 1
        else:  # below the unfrozen blocks: untouched
            for w, w0 in zip(layer.get_weights(), frozen_before[layer.name]):
                np.testing.assert_array_equal(w, w0)
    assert n_unit == folded
