"""The serving export (stage ``export``), loaded in a fresh process that cannot import this project; every format
carries the model's temperature."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from pipeline import export
from pipeline.core.io import sha256_file
from pipeline.core.manifest import read_manifest
from pipeline.data.images import load_image
from pipeline.models.calibration import apply_temperature
from pipeline.models.heads import load_model, save_model, with_temperature

# Runs with `python -I` in an empty folder: only TensorFlow, no `pipeline` package, no Keras model code.
SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
try:
    import pipeline  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("the project is importable here: this would not prove the export is self-contained")
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
result = {}
for name in sys.argv[2:]:
    out = serve(images=tf.constant(np.load(name)))
    result[name] = {
        "probabilities": out["probabilities"].numpy().tolist(),
        "predicted_class": [s.decode() for s in out["predicted_class"].numpy()],
        "class_names": [[s.decode() for s in row] for row in out["class_names"].numpy()],
    }
json.dump(result, sys.stdout)
"""


def _serve(export_dir: Path, work: Path, batches: dict[str, np.ndarray]) -> dict:
    files = []
    for name, x in batches.items():
        np.save(work / f"{name}.npy", x)
        files.append(f"{name}.npy")
    proc = subprocess.run([sys.executable, "-I", "-c", SERVE, str(export_dir), *files], cwd=work,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    return {name: out[f"{name}.npy"] for name in batches}


@pytest.mark.slow  # the tiny DVC project: a whole dvc repro
def test_export_serves_raw_pixels_like_the_keras_model(tiny_dvc_project: Path, tmp_path: Path):
    proj = tiny_dvc_project
    export_dir = proj / "models" / "serving"
    meta = json.loads((proj / "models" / "serving.json").read_text())
    model, model_meta = load_model(proj / "models" / "model.keras")
    classes, size = model_meta["class_names"], model_meta["provenance"]["image_size"]
    assert meta["class_names"] == classes and meta["image_size"] == size
    assert meta["source_model_sha256"] == sha256_file(proj / "models" / "model.keras")

    test = [it for it in read_manifest(proj / "data" / "prepared" / "manifest.csv") if it.split == "test"]
    paths = [str(proj / "data" / "raw" / it.path) for it in test]
    at_size = np.stack([load_image(p, size) for p in paths])  # what training fed the model, as uint8
    # The files as a client has them: decoded at their own size (48 px here, the model takes 64).
    native = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert native.shape[1:3] != (size, size)
    out = _serve(export_dir, tmp_path, {"at_size": at_size, "native": native, "one": at_size[:1]})

    keras_probs = np.asarray(model.predict_on_batch(at_size.astype(np.float32)))
    served = np.asarray(out["at_size"]["probabilities"])
    assert served.shape == (len(paths), len(classes))
    # Images at the model's size: exactly the Keras model (same graph, same weights).
    assert np.max(np.abs(served - keras_probs)) <= 1e-5
    assert out["at_size"]["predicted_class"] == [classes[k] for k in keras_probs.argmax(1)]
    assert out["at_size"]["class_names"] == [classes] * len(paths)
    # A batch of one works too (and agrees up to oneDNN's batch-of-one rounding).
    assert np.max(np.abs(np.asarray(out["one"]["probabilities"]) - keras_probs[:1])) <= 1e-4

    # Other sizes are resized inside (tf.image.resize bilinear + antialias, rounded): close to
    # Pillow's resize, not bit-identical, so probabilities agree closely but not exactly.
    resized = np.asarray(out["native"]["probabilities"])
    assert np.allclose(resized.sum(1), 1.0, atol=1e-5)
    diff = float(np.max(np.abs(resized - keras_probs)))
    print(f"\nnative-size input, resized inside the export: max |Δp| vs Pillow-resized input = {diff:.4f}")
    assert diff < 0.1
    assert np.mean(resized.argmax(1) == keras_probs.argmax(1)) >= 0.9


@pytest.mark.slow  # the tiny DVC project: a whole dvc repro
def test_export_stage_refuses_the_feature_head(tiny_dvc_project: Path, tmp_path: Path):
    from pipeline.export import run

    with pytest.raises(ValueError, match="fine-tuned image model"):
        run(model_path=tiny_dvc_project / "models" / "head.keras", out_dir=tmp_path / "serving",
            meta_out=tmp_path / "serving.json")
    assert not (tmp_path / "serving").exists() and not (tmp_path / "serving.json").exists()


# The ONNX and TFLite files, each in its own runtime, in a fresh process without this project.
RELOAD_FILES = r"""
import sys
import numpy as np
try:
    import pipeline  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("the project is importable here: this would not prove the export is self-contained")
onnx_path, tflite_path = sys.argv[1:3]
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
interp = Interpreter(model_path=tflite_path)
for name in sys.argv[3:]:
    x = np.load(name)
    np.save("onnx_" + name, session.run(["probabilities"], {"images": x})[0])
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    interp.resize_tensor_input(inp["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    np.save("tflite_" + name, interp.get_tensor(out["index"]))
"""


# README "ONNX and TFLite": reloaded in their own runtimes, max |Δp| <= 1e-5 against the Keras model. Written as the
# documented number, not imported from pipeline.export, so loosening the stage's own check cannot loosen this one.
EXPORT_TOLERANCE = 1e-5


@pytest.mark.slow  # the tiny DVC project: a whole dvc repro
def test_onnx_and_tflite_files_give_the_keras_models_probabilities(tiny_dvc_project: Path, tmp_path: Path):
    proj = tiny_dvc_project
    meta = json.loads((proj / "models" / "serving.json").read_text())
    model, model_meta = load_model(proj / "models" / "model.keras")
    size = model_meta["provenance"]["image_size"]
    files = {fmt: proj / "models" / f"model.{fmt}" for fmt in ("onnx", "tflite")}
    for fmt, path in files.items():
        assert meta["files"][fmt]["sha256"] == sha256_file(path)
        assert meta["files"][fmt]["reload_max_abs_diff"] <= EXPORT_TOLERANCE
        assert meta["files"][fmt]["precision"] == "float32"
    # Which runtime checked each file is on record (LiteRT is an optional install tier).
    assert meta["files"]["onnx"]["reload_runtime"].startswith("onnxruntime ")
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    assert meta["files"]["tflite"]["reload_runtime"].startswith("ai-edge-litert " if litert else "tensorflow.lite ")

    test = [it for it in read_manifest(proj / "data" / "prepared" / "manifest.csv") if it.split == "test"]
    at_size = np.stack([load_image(str(proj / "data" / "raw" / it.path), size) for it in test])
    batches = {"test": at_size, "one": at_size[:1]}
    for name, x in batches.items():
        np.save(tmp_path / f"{name}.npy", x)
    proc = subprocess.run([sys.executable, "-I", "-c", RELOAD_FILES, str(files["onnx"]), str(files["tflite"]),
                           *(f"{n}.npy" for n in batches)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keras_probs = np.asarray(model.predict_on_batch(at_size.astype(np.float32)))
    assert keras_probs.shape == (len(test), len(model_meta["class_names"]))
    for fmt in files:
        got = np.load(tmp_path / f"{fmt}_test.npy")
        assert got.shape == keras_probs.shape and got.dtype == np.float32
        assert np.max(np.abs(got - keras_probs)) <= EXPORT_TOLERANCE, fmt
        assert np.max(np.abs(np.load(tmp_path / f"{fmt}_one.npy") - keras_probs[:1])) <= EXPORT_TOLERANCE, fmt


@pytest.mark.slow  # the tiny DVC project: a whole dvc repro
def test_tflite_is_still_checked_without_litert(tiny_dvc_project: Path):
    """Without the optional LiteRT tier the export's reload check runs the .tflite file on TensorFlow's
    own interpreter (and says so), rather than leaving it unchecked."""
    from pipeline.export import EXPORT_TOLERANCE, reload_probabilities

    proj = tiny_dvc_project
    model, meta = load_model(proj / "models" / "model.keras")
    size = meta["provenance"]["image_size"]
    x = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    probs, runtime = reload_probabilities("tflite", proj / "models" / "model.tflite", x, hide=("ai_edge_litert",))
    assert runtime.startswith("tensorflow.lite ") and "ai-edge-litert not installed" in runtime
    expected = np.asarray(model.predict_on_batch(x.astype(np.float32)))
    assert probs.shape == expected.shape and np.max(np.abs(probs - expected)) <= EXPORT_TOLERANCE


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
