"""pipeline.predict with the tiny project's real fine-tuned model (conftest.tiny_dvc_project)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from sklearn.metrics import log_loss

from pipeline.manifest import read_manifest
from pipeline.predict import collect_images, run

pytestmark = pytest.mark.slow


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predictions_equal_evaluate_on_the_test_split(tiny_dvc_project: Path, tmp_path: Path):
    """Same decoding, resizing and preprocessing as training: predict reproduces evaluate's test metrics."""
    proj = tiny_dvc_project
    classes = json.loads((proj / "data" / "prepared" / "classes.json").read_text())["classes"]
    test = [it for it in read_manifest(proj / "data" / "prepared" / "manifest.csv") if it.split == "test"]
    paths = [proj / "data" / "raw" / it.path for it in test]
    # Batches of 4 leave a last batch of 1 or more: every batch size must give the same numbers.
    preds = run(inputs=paths, model_path=proj / "models" / "model.keras", out=tmp_path / "pred.csv", batch_size=4,
                progress=False)
    probs = np.stack([p.probs for p in preds])
    y = np.array([classes.index(it.label) for it in test])
    expected = json.loads((proj / "reports" / "metrics.json").read_text())["finetuned"]
    assert len(preds) == expected["n"]
    assert float(np.mean(probs.argmax(1) == y)) == pytest.approx(expected["accuracy"], abs=1e-12)
    loss = log_loss(y, np.clip(probs, 1e-7, 1), labels=range(len(classes)))
    assert loss == pytest.approx(expected["log_loss"], abs=1e-5)

    rows = _read_csv(tmp_path / "pred.csv")
    assert list(rows[0]) == ["path", "predicted_class", "probability", *(f"prob_{c}" for c in classes), "error"]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for r, p in zip(rows, probs):
        assert r["predicted_class"] == classes[int(p.argmax())]
        assert float(r["probability"]) == pytest.approx(float(p.max()), abs=1e-6)


def test_folder_with_unreadable_files_is_reported_not_fatal(tiny_dvc_project: Path, tmp_path: Path):
    """The CLI on a folder: nested images predicted, broken files listed with their error, exit 0."""
    proj = tiny_dvc_project
    folder = tmp_path / "inbox"
    raw = proj / "data" / "raw"
    good = sorted((raw / "circle").glob("*.png"))[:2] + sorted((raw / "stripes").glob("*.png"))[:1]
    (folder / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(good[0], folder / "a.png")
    shutil.copy(good[1], folder / "nested" / "b.png")
    shutil.copy(good[2], folder / "nested" / "deeper" / "c.png")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: skipped by name")
    (folder / ".hidden.png").write_bytes(good[0].read_bytes())
    out = tmp_path / "predictions.csv"

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(folder), "--model", str(proj / "models" / "model.keras"),
         "--out", str(out), "--batch-size", "2"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict: 100%" in proc.stderr  # the tqdm progress bar
    assert "3 predicted, 2 unreadable" in proc.stderr

    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in _read_csv(out)}
    assert set(rows) == {"a.png", "broken.jpg", "empty.png", "nested/b.png", "nested/deeper/c.png"}
    classes = [k[len("prob_"):] for k in next(iter(rows.values())) if k.startswith("prob_")]
    for name in ("broken.jpg", "empty.png"):
        assert rows[name]["predicted_class"] == "" and rows[name]["error"] != "", rows[name]
        assert rows[name]["prob_" + classes[0]] == ""
    for name in ("a.png", "nested/b.png", "nested/deeper/c.png"):
        r = rows[name]
        p = np.array([float(r[f"prob_{c}"]) for c in classes])
        assert r["error"] == ""
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == classes[int(p.argmax())]


def test_refuses_the_feature_head_and_missing_inputs(tiny_dvc_project: Path, tmp_path: Path):
    proj = tiny_dvc_project
    image = next((proj / "data" / "raw" / "square").glob("*.png"))
    with pytest.raises(ValueError, match="not images"):
        run(inputs=[image], model_path=proj / "models" / "head.keras", out=tmp_path / "x.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_images([tmp_path / "nowhere"])
    assert not (tmp_path / "x.csv").exists()
