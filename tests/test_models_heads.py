"""What is trained and shipped (pipeline/models/heads.py): the logistic-regression head as a Keras softmax layer, the
temperature layer, model files with their provenance sidecar, and the head's predictions read in blocks."""
import json

import h5py
import keras
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.extraction.features import ProvenanceError, create_feature_file, open_features
from pipeline.models.calibration import apply_temperature
from pipeline.models.heads import (
    TEMPERATURE_LAYER,
    build_head,
    load_model,
    logreg_to_dense_weights,
    meta_path,
    model_temperature,
    predict_features,
    save_model,
    with_temperature,
    without_temperature,
)


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


def _head_with_temperature(t):
    keras.utils.set_random_seed(0)
    head = build_head(6, 3)
    head.get_layer("probs").set_weights([np.random.default_rng(0).normal(0, 2, (6, 3)).astype(np.float32),
                                         np.zeros(3, np.float32)])
    return head, with_temperature(head, t)


def test_temperature_layer_changes_probabilities_and_survives_save_and_reload(tmp_path):
    head, calibrated = _head_with_temperature(2.5)
    x = np.random.default_rng(1).normal(0, 1, (16, 6)).astype(np.float32)
    p, q = head.predict_on_batch(x), calibrated.predict_on_batch(x)
    assert np.max(np.abs(p - q)) > 0.05  # T != 1 changes the probabilities ...
    np.testing.assert_allclose(q, apply_temperature(p, 2.5), atol=1e-6)  # ... exactly as numpy's definition
    assert model_temperature(calibrated) == 2.5 and model_temperature(head) == 1.0
    # with_temperature replaces, never stacks; without_temperature gives back the uncalibrated function.
    again = with_temperature(calibrated, 0.5)
    assert sum(layer.name == TEMPERATURE_LAYER for layer in again.layers) == 1
    np.testing.assert_allclose(again.predict_on_batch(x), apply_temperature(p, 0.5), atol=1e-6)
    np.testing.assert_allclose(without_temperature(calibrated).predict_on_batch(x), p, atol=1e-7)

    save_model(calibrated, tmp_path / "head.keras", {"kind": "head", "temperature": 2.5})
    loaded, meta = load_model(tmp_path / "head.keras")
    assert model_temperature(loaded) == 2.5 and meta["temperature"] == 2.5
    np.testing.assert_allclose(loaded.predict_on_batch(x), q, atol=1e-7)
    # A sidecar that names another temperature than the model applies is refused.
    side = json.loads(meta_path(tmp_path / "head.keras").read_text())
    meta_path(tmp_path / "head.keras").write_text(json.dumps({**side, "temperature": 1.0}))
    with pytest.raises(ProvenanceError, match="temperature"):
        load_model(tmp_path / "head.keras")


def test_a_model_file_swapped_under_its_sidecar_is_refused(tmp_path):
    provenance = {"backbone": "efficientnet_lite0", "image_size": 64, "class_names": ["circle", "square"]}
    save_model(build_head(4, 2), tmp_path / "head.keras", {"kind": "head", "provenance": provenance})
    save_model(build_head(4, 3), tmp_path / "other.keras", {"kind": "head", "provenance": provenance})
    model, meta = load_model(tmp_path / "head.keras", provenance)
    assert meta["kind"] == "head" and model.output_shape == (None, 2)
    (tmp_path / "other.keras").replace(tmp_path / "head.keras")  # another model under the head's sidecar
    with pytest.raises(ProvenanceError, match=r"head.json does not describe .*head.keras \(sha256 differs\)"):
        load_model(tmp_path / "head.keras")
    # A consistent pair from a run with another backbone: refused by provenance.
    (tmp_path / "other.json").replace(tmp_path / "head.json")
    with pytest.raises(ProvenanceError,
                       match="backbone: artifact has 'efficientnet_lite0', params give 'mobilenet_v2'"):
        load_model(tmp_path / "head.keras", {**provenance, "backbone": "mobilenet_v2"})
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "gone.keras")


def test_block_predictions_equal_whole_array_predictions(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 3)).astype(np.float32)
    with h5py.File(tmp_path / "val.h5", "w") as h5:
        create_feature_file(h5, 3, np.arange(9) % 3, [f"{i}.jpg" for i in range(9)], {"complete": True}, 4)[...] = feats
    head = build_head(3, 3)
    with open_features(tmp_path / "val.h5") as ff:
        np.testing.assert_allclose(predict_features(head, ff, rows=4), head.predict(feats, verbose=0), atol=1e-6)
