"""Stage finetune (pipeline/finetune.py): backbone + head cut at the boundary, the top trained on cached
activations; what it saves changes exactly the unfrozen weights, a warm activation cache gives the same model as a
cold one, ``finetune.epochs: 0`` saves the head-only model, and the metrics report the kept epoch."""
from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import pipeline_until_head

from pipeline import finetune
from pipeline.backbones.build import build_backbone, get_base, resolve_unfreeze_from
from pipeline.core.io import read_json
from pipeline.core.manifest import read_manifest
from pipeline.data.images import load_batch
from pipeline.extraction.features import read_features
from pipeline.finetuning.checkpoint import TrainState
from pipeline.finetuning.parity import CUT_TOLERANCE
from pipeline.finetuning.recipe import fold_bn_scale, unfreeze_from
from pipeline.models.heads import load_model


def test_the_metrics_report_the_kept_epoch_beside_the_head_only_model():
    rows = [[0, "", "", 0.9, 0.5], [1, 0.8, 0.6, 0.7, 0.75], [2, 0.6, 0.7, 0.8, 0.8]]
    state = TrainState(epoch=2, rows=rows, best_loss=0.7, best_epoch=1)
    assert finetune._epoch_metrics(state) == {"best_epoch": 1, "val_loss": 0.7, "val_accuracy": 0.75,
                                              "head_only_val_loss": 0.9, "head_only_val_accuracy": 0.5}
    head_only = TrainState(epoch=0, rows=rows[:1], best_loss=0.9)
    assert finetune._epoch_metrics(head_only)["val_accuracy"] == 0.5


# A fine-tune made to move on tiny data: a rate well above the default, no EMA, 2 epochs, an explicit boundary.
MOVING_FINETUNE = {"finetune.epochs": 2, "finetune.learning_rate": 3e-3, "finetune.ema": 0.0,
                   "finetune.patience": 5, "finetune.unfreeze_from": "block6a_expand_conv"}


def _weights_by_layer(base: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in base.layers if layer.weights}


@pytest.mark.slow  # the stages up to the head, then 2 epochs of fine-tuning (~20 s)
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


@pytest.mark.slow  # the stages up to the head, then two 3-epoch fine-tunes (~30 s)
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
    # Where the seconds went: the parts add up to the run, and a warm run's bottom did nothing.
    for m in (cold, warm):
        parts = m["seconds_by_part"]
        assert set(parts) == {"setup", "bottom", "train", "validate", "checkpoint", "finish"}
        assert sum(parts.values()) == pytest.approx(m["seconds"], abs=0.5) and min(parts.values()) >= 0
        assert parts["train"] > 0 and parts["validate"] > 0 and parts["finish"] > 0
    assert cold["seconds_by_part"]["bottom"] > 0 and warm["seconds_by_part"]["bottom"] == 0
    assert (out / "warm.csv").read_text() == (out / "cold.csv").read_text()
    a, _ = load_model(out / "cold.keras")
    b, _ = load_model(out / "warm.keras")
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    # The saved model is the full backbone + head, as the stacked model always was.
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert get_base(a).get_layer(resolve_unfreeze_from(params.finetune.unfreeze_from, params.backbone.name)) is not None
    assert read_json(out / "cold.json")["best_epoch"] == cold["best_epoch"]
