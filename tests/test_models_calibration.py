"""Temperature scaling, ECE / reliability / coverage, the Temperature layer in saved and exported models, TTA."""
import json

import keras
import numpy as np
import onnxruntime as ort
import pytest
from conftest import pipeline_until_head

from pipeline import evaluate, export, finetune
from pipeline.data.images import load_batch
from pipeline.extraction.features import ProvenanceError, read_features
from pipeline.models.calibration import (
    COVERAGE_THRESHOLDS,
    apply_temperature,
    coverage_curve,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
)
from pipeline.models.heads import (
    TEMPERATURE_LAYER,
    build_head,
    load_model,
    meta_path,
    model_temperature,
    save_model,
    with_temperature,
    without_temperature,
)
from pipeline.runtime import tta


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _overconfident(n=20000, k=5, sharpen=2.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports softmax(sharpen * z): over-confident by T = sharpen."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = _softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p_true])
    return _softmax(sharpen * z), y, p_true


def test_fit_temperature_recovers_a_known_overconfidence_and_fixes_ece():
    probs, y, _ = _overconfident(sharpen=2.0)
    t = fit_temperature(probs, y)
    assert 1.85 < t < 2.15
    cal = apply_temperature(probs, t)
    assert nll(cal, y) < nll(probs, y) - 0.05
    assert ece(cal, y) < 0.02 < 0.05 < ece(probs, y)
    np.testing.assert_array_equal(cal.argmax(1), probs.argmax(1))  # accuracy never changes
    under, y2, _ = _overconfident(sharpen=0.5, seed=1)
    assert 0.45 < fit_temperature(under, y2) < 0.55  # under-confident: T < 1 sharpens


def test_a_val_split_without_mistakes_does_not_send_the_temperature_to_its_bound():
    probs, y, _ = _overconfident(n=100, seed=2)
    y = probs.argmax(1)  # every val image right: the likelihood alone always wants a sharper model
    assert fit_temperature(probs, y, prior_sd=None) < 0.1
    assert 0.15 < fit_temperature(probs, y) < 1.0  # the prior holds it well inside [T_MIN, 1)


def test_apply_temperature_identity_inverse_and_change():
    probs, _, _ = _overconfident(n=50)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)
    np.testing.assert_allclose(apply_temperature(apply_temperature(probs, 2.5), 1 / 2.5), probs, atol=1e-10)
    assert np.max(np.abs(apply_temperature(probs, 2.5) - probs)) > 0.05
    np.testing.assert_allclose(apply_temperature(probs, 3.0).sum(1), 1.0)


def test_ece_and_reliability_bins_by_hand():
    # 4 rows at confidence 0.9 (3 right), 2 rows at 0.6 (both right), 15 bins of width 1/15.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 0, 0])
    bins = reliability_bins(probs, y)
    assert [(round(b["confidence"], 6), b["accuracy"], b["count"]) for b in bins] == [(0.6, 1.0, 2), (0.9, 0.75, 4)]
    assert bins[0]["lower"] < 0.6 <= bins[0]["upper"] and bins[1]["lower"] < 0.9 <= bins[1]["upper"]
    assert ece(probs, y) == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.15)
    # A confidence of exactly 1 falls in the last bin, not out of range.
    assert reliability_bins(np.array([[1.0, 0.0]]), np.array([0]))[-1]["upper"] == 1.0


def test_coverage_curve():
    probs = np.array([[0.95, 0.05], [0.8, 0.2], [0.7, 0.3], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1])  # the two most confident right, the two least wrong
    rows = {r["min_confidence"]: r for r in coverage_curve(probs, y)}
    assert rows[0.0]["coverage"] == 1.0 and rows[0.0]["accuracy"] == 0.5
    assert rows[0.75]["coverage"] == 0.5 and rows[0.75]["accuracy"] == 1.0
    assert rows[0.9]["n"] == 1
    assert 0.96 not in rows  # no prediction that confident: no row
    assert set(rows) <= set(COVERAGE_THRESHOLDS.tolist())


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


def test_every_export_format_gives_the_calibrated_probabilities(tmp_path):
    """SavedModel, ONNX and TFLite, each reloaded in a fresh process, carry the temperature."""
    size, t = 32, 3.0
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(4, 3, strides=4)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    probs = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 3))(x)
    uncal = keras.Model(inputs, probs)
    save_model(with_temperature(uncal, t), tmp_path / "model.keras",
               {"kind": "finetuned", "class_names": ["a", "b", "c"], "provenance": {"image_size": size},
                "temperature": t})
    info = export.run(model_path=tmp_path / "model.keras", out_dir=tmp_path / "serving", meta_out=tmp_path / "s.json",
                      onnx_out=tmp_path / "m.onnx", tflite_out=tmp_path / "m.tflite")
    assert info["temperature"] == t
    pixels = np.random.default_rng(5).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    plain = uncal.predict_on_batch(pixels.astype(np.float32))
    want = apply_temperature(plain, t)
    assert np.max(np.abs(want - plain)) > 0.02
    got = {fmt: export.reload_probabilities(fmt, tmp_path / f"m.{fmt}", pixels)[0] for fmt in ("onnx", "tflite")}
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "serving")).signatures["serving_default"](images=tf.constant(pixels))
    got["savedmodel"] = served["probabilities"].numpy()
    for fmt, p in got.items():
        np.testing.assert_allclose(p, want, atol=1e-5, err_msg=fmt)
    # The ONNX file holds the temperature as a graph constant, not an input.
    assert [i.name for i in ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()] == ["images"]


def test_views_and_average():
    batch = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    original, flipped = tta.views(batch)
    np.testing.assert_array_equal(original, batch)
    np.testing.assert_array_equal(flipped[:, :, 0], batch[:, :, 3])  # column 0 of the mirror = last column
    np.testing.assert_array_equal(tta.views(flipped)[1], batch)
    p = tta.average([np.array([[0.8, 0.2]]), np.array([[0.4, 0.6]])])
    np.testing.assert_allclose(p, [[0.6, 0.4]])
    with pytest.raises(ValueError, match="unknown TTA view"):
        tta.views(batch, ("original", "vflip"))
    with pytest.raises(ValueError, match="RGB"):
        tta.views(batch[0])


def test_head_and_finetune_fit_their_own_temperatures_and_evaluate_reports_them(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"evaluate.tta": True})
    head, head_meta = load_model(out / "head.keras")
    head_metrics = json.loads((out / "m.json").read_text())
    assert head_meta["temperature"] == model_temperature(head) == head_metrics["calibration"]["temperature"]
    assert head_metrics["calibration"]["val_log_loss"] <= head_metrics["calibration"]["val_log_loss_uncalibrated"]
    ft = finetune.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                      val_features=feats["val"], head_path=out / "head.keras", model_out=out / "model.keras",
                      history_out=out / "ft.csv", metrics_out=out / "ft.json", params=params)
    model, meta = load_model(out / "model.keras")
    assert meta["temperature"] == model_temperature(model) == ft["calibration"]["temperature"]
    # Exactly one temperature, the fine-tuned model's own, at the end: the nested head was trained uncalibrated.
    assert [layer.name for layer in model.layers if layer.name == TEMPERATURE_LAYER] == [TEMPERATURE_LAYER]
    nested = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name == "head")
    assert TEMPERATURE_LAYER not in [layer.name for layer in nested.layers]
    val = read_features(feats["val"])
    images = load_batch([str(raw / p) for p in val.paths], 64).astype(np.float32)
    np.testing.assert_allclose(model.predict_on_batch(images),
                               apply_temperature(without_temperature(model).predict_on_batch(images),
                                                 meta["temperature"]), atol=1e-5)

    plots = out / "plots"
    report = evaluate.run(raw_dir=raw, classes_json=out / "classes.json", test_features=feats["test"],
                          head_path=out / "head.keras", model_path=out / "model.keras",
                          metrics_out=out / "metrics.json", per_class_out=out / "pc.json", plots_dir=plots,
                          mistakes_out=out / "mistakes.png", params=params)
    metrics = json.loads((out / "metrics.json").read_text())
    for name, t in (("head", head_meta["temperature"]), ("finetuned", meta["temperature"])):
        m = metrics[name]
        assert m["temperature"] == t
        assert {"ece", "ece_uncalibrated", "log_loss", "log_loss_uncalibrated", "single_view"} <= set(m)
        assert 0 <= m["ece"] <= 1 and 0 <= m["ece_uncalibrated"] <= 1
        if abs(t - 1) > 1e-3:
            assert m["log_loss"] != m["log_loss_uncalibrated"]
        rel = (plots / f"reliability_{name}.csv").read_text().splitlines()
        assert rel[0] == "confidence,accuracy,calibrated,count,bin_lower,bin_upper"
        assert sum(int(r.split(",")[3]) for r in rel[1:]) == m["n"]
        cov = (plots / f"coverage_{name}.csv").read_text().splitlines()
        assert cov[0] == "min_confidence,coverage,accuracy,n" and cov[1].startswith("0.0,1.0,")
    assert report["head"]["n"] == len(read_features(feats["test"]).labels)
    assert json.loads((out / "pc.json").read_text())["tta_views"] == ["original", "hflip"]
