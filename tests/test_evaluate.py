"""Stage evaluate (pipeline/evaluate.py): the test-set metrics of both models, their plots' data, the gallery of the
most confident mistakes, each image decoded once for every view and model; with the stages before it, each model
scored with its own temperature."""
import json

import keras
import numpy as np
import pytest
from conftest import make_images, pipeline_until_head
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline import evaluate, finetune
from pipeline.core.io import PipelineError
from pipeline.data.images import load_batch, load_image
from pipeline.extraction.features import read_features
from pipeline.models.calibration import apply_temperature
from pipeline.models.heads import TEMPERATURE_LAYER, load_model, model_temperature, without_temperature

CLASSES = ["circle", "square", "stripes"]


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.5, 0.1, 0.4]])
    m = evaluate.classification_metrics(y, probs, CLASSES)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n"] == 5
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["per_class"]["circle"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["square"]["precision"] == 0.5 and m["per_class"]["stripes"]["recall"] == 0.5
    # Multiclass ROC-AUC: the mean one-vs-rest AUC of the classes present.
    want = np.mean([roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert m["roc_auc"] == pytest.approx(want)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(5), y])))
    # A class absent from the test split has no AUC: the mean is over the classes present.
    y2 = np.array([0, 0, 2, 2, 2])
    want2 = np.mean([roc_auc_score(y2 == c, probs[:, c]) for c in (0, 2)])
    assert evaluate.classification_metrics(y2, probs, CLASSES)["roc_auc"] == pytest.approx(want2)


def test_binary_auc_scores_the_positive_class_and_one_class_has_none():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.35, 0.65]])
    m = evaluate.classification_metrics(y, probs, ["cat", "dog"])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1])) == pytest.approx(0.75)
    assert evaluate.classification_metrics(np.array([1, 1]), probs[:2], ["cat", "dog"])["roc_auc"] is None
    assert evaluate.roc_points(np.array([1, 1]), probs[:2]) == []
    points = evaluate.roc_points(y, probs)
    assert points[0][:2] == (0.0, 0.0) and points[-1][:2] == (1.0, 1.0)
    assert all(0.0 <= thr <= 1.0 for _, _, thr in points)  # sklearn's first threshold (inf) is clipped to 1


def test_the_gallery_shows_the_most_confident_mistakes_first(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle", "square"), per_class=3)
    paths = sorted(str(p) for p in raw.rglob("*.png"))  # 3 circles, then 3 squares
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.45, 0.55], [0.95, 0.05], [0.1, 0.9], [0.6, 0.4]])
    n = evaluate.mistakes_gallery(tmp_path / "m.png", paths, y, probs, ["circle", "square"], n=3, thumb=40)
    assert n == 3  # of 4 mistakes (rows 0, 2, 3, 5), the 3 most confident: 3 (0.95), 0 (0.8), 5 (0.6)
    sheet = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    assert sheet.shape == (40 + 34, 3 * 40, 3)
    for k, i in enumerate((3, 0, 5)):  # in that order, left to right
        np.testing.assert_array_equal(sheet[:40, 40 * k:40 * (k + 1)], load_image(paths[i], 40), err_msg=str(k))
    assert evaluate.mistakes_gallery(tmp_path / "none.png", paths, y, np.eye(2)[y], ["circle", "square"], n=3) == 0
    assert (tmp_path / "none.png").is_file()


def test_view_probabilities_feeds_each_view_to_each_models_engine_and_leaves_the_others_nan(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle", "square"), per_class=3, size=16)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    seen = []

    def model(scale):  # a probability per image from its pixels; remembers the batches it was given
        def infer(x):
            seen.append(x.copy())
            left = x[:, :, :8].astype(np.float64).mean((1, 2, 3)) / 255
            return np.stack([left * scale, 1 - left * scale], 1).astype(np.float32)
        return infer

    a, b = model(1.0), model(0.5)
    out = evaluate.view_probabilities({"finetuned": [a, a], "head": [None, b]}, paths, 16, 4, ("original", "hflip"))
    images = load_batch(paths, 16)
    np.testing.assert_allclose(out["finetuned"][0], model(1.0)(images))
    np.testing.assert_allclose(out["finetuned"][1], model(1.0)(images[:, :, ::-1]))
    np.testing.assert_allclose(out["head"][1], model(0.5)(images[:, :, ::-1]))
    assert out["head"].shape == (2, 6, 2) and np.isnan(out["head"][0]).all()
    # Batches of 4 then 2 (6 images), each given to three engines, plus the 2 reference calls above.
    assert [len(x) for x in seen[:6]] == [4, 4, 4, 2, 2, 2]


def test_calibration_metrics_score_the_shipped_and_the_uncalibrated_probabilities():
    y = np.array([0, 1, 1, 0, 1])
    raw = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.1, 0.9]])
    calibrated = apply_temperature(raw, 1.7)
    m = evaluate.calibration_metrics(y, calibrated, raw, 1.7)
    assert m["temperature"] == 1.7 and m["ece"] != m["ece_uncalibrated"]
    assert m["log_loss_uncalibrated"] == pytest.approx(-np.mean(np.log(raw[np.arange(5), y])))


@pytest.mark.slow  # prepare → extract → train_head → finetune → evaluate with TTA (~35 s)
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
    report = evaluate.run(raw_dir=raw, manifest=out / "manifest.csv",
                          classes_json=out / "classes.json", test_features=feats["test"],
                          head_path=out / "head.keras", model_path=out / "model.keras",
                          metrics_out=out / "metrics.json", per_class_out=out / "pc.json", plots_dir=plots,
                          mistakes_out=out / "mistakes.png", params=params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_near_copies_of_train"] == 0  # prepare kept near-copies in one split
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


def test_test_near_copies_of_train_counts_test_images_close_to_a_train_or_val_image(tmp_path):
    from pipeline.core.manifest import Item, write_manifest

    h = 0x0123456789ABCDEF
    items = [Item("a/1.png", "a", "train", f"{h:016x}"), Item("a/2.png", "a", "val", f"{h ^ 0xFF00:016x}"),
             Item("a/3.png", "a", "test", f"{h ^ 0b111:016x}"),  # 3 bits from the train image
             Item("a/4.png", "a", "test", f"{h ^ 0xF0F0F0:016x}"),  # 12 bits from both
             Item("a/5.png", "a", "test", f"{h ^ 0b111:016x}")]  # a copy of a test image only counts once
    write_manifest(tmp_path / "m.csv", items)
    assert evaluate.near_copies_of_train(tmp_path / "m.csv", 4) == (2, ["a/3.png ≈ a/1.png", "a/5.png ≈ a/1.png"])
    assert evaluate.near_copies_of_train(tmp_path / "m.csv", 2)[0] == 0
    assert evaluate.near_copies_of_train(tmp_path / "m.csv", 16)[0] == 3
    write_manifest(tmp_path / "old.csv", [Item("a/1.png", "a", "train")])
    with pytest.raises(PipelineError, match=r"old.csv has no perceptual hashes.*dvc repro prepare"):
        evaluate.near_copies_of_train(tmp_path / "old.csv", 4)
