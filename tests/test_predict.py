"""pipeline.predict with the tiny project's real exported model (conftest.tiny_dvc_project)."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT
from sklearn.metrics import log_loss

from pipeline.core.io import PipelineError
from pipeline.core.manifest import read_manifest
from pipeline.data.images import load_batch
from pipeline.predict import collect_images, run

pytestmark = pytest.mark.slow

# Runs predict's main() (this tree's, argv[1]) in a fresh process, then reports the heavy frameworks it imported.
NO_TF = r"""
import runpy, sys
sys.path.insert(0, sys.argv.pop(1))
sys.argv = ["pipeline.predict", *sys.argv[1:]]
try:
    runpy.run_module("pipeline.predict", run_name="__main__", alter_sys=True)
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "tf_keras"))
    print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def _predict_cli(proj: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.predict ARGS`` in ``proj`` (so the default models/model.onnx is its export)."""
    return subprocess.run([sys.executable, "-c", NO_TF, str(ROOT), *args], cwd=proj, capture_output=True, text=True)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _test_split(proj: Path) -> tuple[list[str], list[Path]]:
    classes = json.loads((proj / "data" / "prepared" / "classes.json").read_text())["classes"]
    test = [it for it in read_manifest(proj / "data" / "prepared" / "manifest.csv") if it.split == "test"]
    return classes, [proj / "data" / "raw" / it.path for it in test]


def test_predictions_equal_evaluate_on_the_test_split(tiny_dvc_project: Path, tmp_path: Path):
    """Same decoding, resizing and preprocessing as training: predict on the export reproduces evaluate's metrics."""
    proj = tiny_dvc_project
    classes, paths = _test_split(proj)
    # Batches of 4 leave a last batch of 1 or more: every batch size must give the same numbers.
    preds = run(inputs=paths, model_path=proj / "models" / "model.onnx", out=tmp_path / "pred.csv", batch_size=4,
                progress=False)
    probs = np.stack([p.probs for p in preds])
    y = np.array([classes.index(p.parent.name) for p in paths])
    expected = json.loads((proj / "reports" / "metrics.json").read_text())["finetuned"]
    assert len(preds) == expected["n"]
    assert float(np.mean(probs.argmax(1) == y)) == pytest.approx(expected["accuracy"], abs=1e-12)
    loss = log_loss(y, np.clip(probs, 1e-7, 1), labels=range(len(classes)))
    assert loss == pytest.approx(expected["log_loss"], abs=1e-5)

    rows = _read_csv(tmp_path / "pred.csv")
    assert list(rows[0]) == ["path", "predicted_class", "probability", "uncertain",
                             *(f"prob_{c}" for c in classes), "error"]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for r, p in zip(rows, probs):
        assert r["predicted_class"] == classes[int(p.argmax())] and r["uncertain"] == "false"
        assert float(r["probability"]) == pytest.approx(float(p.max()), abs=1e-6)


def test_onnx_probabilities_equal_the_keras_models(tiny_dvc_project: Path, tmp_path: Path):
    """The default path (exported ONNX on ONNX Runtime) gives the Keras model's probabilities on the same
    decoded images; the .keras path still runs and agrees."""
    from pipeline.models.heads import load_model

    proj = tiny_dvc_project
    classes, paths = _test_split(proj)
    model, meta = load_model(proj / "models" / "model.keras")
    size = meta["provenance"]["image_size"]
    keras_probs = np.asarray(model.predict_on_batch(load_batch([str(p) for p in paths], size).astype(np.float32)))
    by_onnx = np.stack([p.probs for p in run(inputs=paths, out=tmp_path / "a.csv", progress=False,
                                             model_path=proj / "models" / "model.onnx")])
    assert by_onnx.shape == keras_probs.shape == (len(paths), len(classes))
    assert np.max(np.abs(by_onnx - keras_probs)) <= 1e-5
    by_keras = np.stack([p.probs for p in run(inputs=paths, out=tmp_path / "b.csv", progress=False,
                                              model_path=proj / "models" / "model.keras", engine="tensorflow")])
    assert np.max(np.abs(by_keras - keras_probs)) <= 1e-5


def test_cli_on_a_folder_imports_no_tensorflow_and_reports_unreadable_files(tiny_dvc_project: Path, tmp_path: Path):
    """The CLI with its defaults, in a fresh process: nested images predicted, broken files listed with their
    error, exit 0, a one-line summary on stdout, and neither TensorFlow nor Keras ever imported."""
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

    proc = _predict_cli(proj, str(folder), "--out", str(out), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY:\n" in proc.stderr, proc.stderr[-2000:]
    assert "predict: 100%" in proc.stderr  # the tqdm progress bar
    assert proc.stdout == f"5 images: 3 predicted, 0 uncertain, 2 unreadable -> {out}\n"

    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in _read_csv(out)}
    assert set(rows) == {"a.png", "broken.jpg", "empty.png", "nested/b.png", "nested/deeper/c.png"}
    classes = [k[len("prob_"):] for k in next(iter(rows.values())) if k.startswith("prob_")]
    for name in ("broken.jpg", "empty.png"):
        assert rows[name]["predicted_class"] == "" and rows[name]["error"] != "", rows[name]
        assert rows[name]["prob_" + classes[0]] == "" and rows[name]["uncertain"] == ""
    for name in ("a.png", "nested/b.png", "nested/deeper/c.png"):
        r = rows[name]
        p = np.array([float(r[f"prob_{c}"]) for c in classes])
        assert r["error"] == ""
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["predicted_class"] == classes[int(p.argmax())]

    # The options reach run(): JSON chosen by the extension, top 2, a threshold.
    out = tmp_path / "one.json"
    proc = _predict_cli(proj, str(folder / "a.png"), "--out", str(out), "--top-k", "2", "--min-confidence", "1")
    assert proc.returncode == 0 and "HEAVY:\n" in proc.stderr, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["min_confidence"] == 1.0 and len(doc["predictions"][0]["top"]) == 2
    n = doc["summary"]
    assert proc.stdout == (f"1 images: {n['predicted']} predicted, {n['uncertain']} uncertain, 0 unreadable "
                           f"-> {out}\n")


def test_json_top_k_and_min_confidence(tiny_dvc_project: Path, tmp_path: Path):
    """JSON, top 2, min_confidence P: rows below P say uncertain and name no class, the rest predict as
    before; the ranking is sorted and the summary adds up."""
    proj = tiny_dvc_project
    classes, paths = _test_split(proj)
    (tmp_path / "bad.png").write_bytes(b"")
    inputs = [*paths, tmp_path / "bad.png"]
    top = np.array([p.probs.max() for p in run(inputs=paths, out=tmp_path / "a.csv", progress=False,
                                                model_path=proj / "models" / "model.onnx")])
    threshold = float(np.median(top))
    below = int(np.sum(top < threshold))
    assert 0 < below < len(paths), top  # the threshold splits the rows, so both kinds are checked

    out = tmp_path / "p.json"
    run(inputs=inputs, model_path=proj / "models" / "model.onnx", out=out, fmt="json", top_k=2,
        min_confidence=threshold, progress=False)
    n = len(inputs)
    doc = json.loads(out.read_text())
    assert doc["classes"] == classes and doc["min_confidence"] == threshold
    assert doc["summary"] == {"images": n, "predicted": n - 1 - below, "uncertain": below, "unreadable": 1}
    assert doc["model"]["sha256"] == json.loads((proj / "models" / "serving.json").read_text())["files"]["onnx"][
        "sha256"]
    recs = doc["predictions"]
    assert [r["path"] for r in recs] == list(map(str, inputs))
    for r, t in zip(recs[:-1], top):
        probs = r["probabilities"]
        assert list(probs) == classes and r["error"] is None
        assert [x["probability"] for x in r["top"]] == sorted(probs.values(), reverse=True)[:2]
        assert r["top"][0]["class"] == max(probs, key=probs.get)
        assert r["probability"] == pytest.approx(float(t), abs=1e-6)
        assert r["uncertain"] is bool(t < threshold)
        assert r["predicted_class"] == (None if t < threshold else r["top"][0]["class"])
    assert recs[-1]["probabilities"] is None and recs[-1]["uncertain"] is None and recs[-1]["error"]


def test_tta_averages_the_image_and_its_mirror(tiny_dvc_project: Path, tmp_path: Path):
    """--tta (CLI, still TensorFlow-free) gives each image the mean of the model's probabilities on it and on
    its left-right mirror. Images at the model's size, PNG: decoding adds no resize, so the mirror file decodes
    to exactly the mirrored pixels and the mean is computable from two plain predictions."""
    from conftest import render
    from PIL import Image

    proj = tiny_dvc_project
    size = json.loads((proj / "models" / "serving.json").read_text())["image_size"]
    src, mirrored = tmp_path / "src", tmp_path / "mirrored"
    src.mkdir()
    mirrored.mkdir()
    for i, label in enumerate(("circle", "square", "stripes", "circle")):
        img = render(label, np.random.default_rng([99, i]), size)
        img.save(src / f"{i}.png")
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f"{i}.png")
    model = proj / "models" / "model.onnx"
    plain = np.stack([p.probs for p in run(inputs=[src], model_path=model, out=tmp_path / "a.csv", progress=False)])
    flip = np.stack([p.probs for p in run(inputs=[mirrored], model_path=model, out=tmp_path / "b.csv",
                                          progress=False)])
    assert np.abs(plain - flip).max() > 1e-3  # the mirror is a different input to the model: the test can fail
    proc = _predict_cli(proj, str(src), "--tta", "--out", str(tmp_path / "t.json"))
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY:\n" in proc.stderr, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["tta_views"] == ["original", "hflip"]
    got = np.array([[r["probabilities"][c] for c in doc["classes"]] for r in doc["predictions"]])
    np.testing.assert_allclose(got, (plain + flip) / 2, atol=2e-6)


def test_missing_or_mismatched_export_says_which_command_makes_it(tiny_dvc_project: Path, tmp_path: Path):
    proj = tiny_dvc_project
    image = next((proj / "data" / "raw" / "square").glob("*.png"))
    (tmp_path / "models").mkdir()
    proc = _predict_cli(tmp_path, str(image))  # no models/model.onnx here
    assert proc.returncode == 1 and "HEAVY:\n" in proc.stderr
    err = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(err) == 1 and "models/model.onnx" in err[0] and "dvc repro export" in err[0], proc.stderr

    # An .onnx file that is not the one serving.json describes (e.g. copied from another run).
    shutil.copy(proj / "models" / "model.onnx", tmp_path / "models" / "model.onnx")
    meta = json.loads((proj / "models" / "serving.json").read_text())
    meta["files"]["onnx"]["sha256"] = "0" * 64
    (tmp_path / "models" / "serving.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="is not the file .* describes.*dvc repro export"):
        run(inputs=[image], model_path=tmp_path / "models" / "model.onnx", out=tmp_path / "x.csv", progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_in_a_clone_whose_dvc_lock_records_the_model_the_error_says_dvc_pull(tiny_dvc_project: Path,
                                                                           tmp_path: Path):
    """A fresh clone has dvc.lock but not the DVC-tracked model: it is one `dvc pull` away, not a re-run."""
    image = next((tiny_dvc_project / "data" / "raw" / "square").glob("*.png"))
    clone = tmp_path / "clone"
    (clone / "models").mkdir(parents=True)
    shutil.copy(tiny_dvc_project / "dvc.lock", clone / "dvc.lock")
    proc = _predict_cli(clone, str(image))
    err = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "`dvc pull models/model.onnx models/serving.json`" in err[0] and "dvc.lock records it" in err[0]


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid-looking PNG of a few hundred bytes whose header declares ``width`` x ``height`` RGB pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding_at_the_trained_limit(tiny_dvc_project: Path,
                                                                              tmp_path: Path):
    proj = tiny_dvc_project
    meta = json.loads((proj / "models" / "serving.json").read_text())
    assert meta["max_image_pixels"] == yaml.safe_load((proj / "params.yaml").read_text())["data"]["max_image_pixels"]
    folder = tmp_path / "inbox"
    folder.mkdir()
    good = shutil.copy(next((proj / "data" / "raw" / "circle").glob("*.png")), folder / "good.png")
    bomb = _png_declaring(folder / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 1000
    out = tmp_path / "p.csv"
    proc = _predict_cli(proj, str(folder), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in _read_csv(out)}
    assert rows["good.png"]["error"] == "" and rows["good.png"]["predicted_class"]
    assert "20000x20000 = 400,000,000 pixels is above --max-pixels = " in rows["bomb.png"]["error"]
    assert rows["bomb.png"]["predicted_class"] == ""
    # --max-pixels overrides the recorded limit: here below the 48 x 48 px good image too.
    preds = run(inputs=[good, bomb], model_path=proj / "models" / "model.onnx", out=tmp_path / "q.csv",
                progress=False, max_pixels=1000)
    assert all(p.probs is None and "above --max-pixels = 1,000" in p.error for p in preds)
    # A limit below 1 is a usage error, not "no limit".
    proc = _predict_cli(proj, str(good), "--max-pixels", "0")
    assert proc.returncode == 2 and "--max-pixels must be >= 1" in proc.stderr


def test_refuses_the_feature_head_and_missing_inputs(tiny_dvc_project: Path, tmp_path: Path):
    proj = tiny_dvc_project
    image = next((proj / "data" / "raw" / "square").glob("*.png"))
    with pytest.raises(ValueError, match="not images"):
        run(inputs=[image], model_path=proj / "models" / "head.keras", out=tmp_path / "x.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        collect_images([tmp_path / "nowhere"])
    assert not (tmp_path / "x.csv").exists()
