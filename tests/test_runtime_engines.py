"""The inference engines (pipeline/runtime/engines.py): ONNX Runtime against the TensorFlow reference, each engine's
plan, and extract keeping each engine's features apart.

Real components throughout: the Keras backbone build_backbone returns, converted by tf2onnx and
run by ONNX Runtime; real HDF5 files and feature cache from extract.run.
"""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, as_params, make_images, tiny_params

from pipeline import evaluate, extract, prepare
from pipeline.backbones.build import build_backbone
from pipeline.core.manifest import SPLITS
from pipeline.core.params import ParamsError
from pipeline.predict import run as predict_run
from pipeline.runtime import engines

# The documented claims (README "Inference engines", pipeline/runtime/engines.py), as numbers, not imported:
# features of the same image on ONNX Runtime and TensorFlow within 3e-5 (float32 rounding in another summation
# order; measured 5e-6 at 224 px, 1.6e-5 at this suite's 64 px, on features up to ~5-6) ...
FEATURE_TOLERANCE = 3e-5
# ... and evaluate's / predict's probabilities on the two engines within 1e-5.
PROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(as_params(tiny_params()).backbone)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_onnx_features_match_tensorflow_and_are_bit_identical_however_batched(backbone):
    x = _pixels(9)
    onnx = engines.compile_engine(backbone, 64, "onnxruntime", 8)
    ref = engines.compile_engine(backbone, 64, "tensorflow", 8)(x)
    full = onnx(x)
    assert full.dtype == np.float32 and full.shape == ref.shape == (9, 1280)
    diff = float(np.max(np.abs(full - ref)))
    print(f"\nONNX Runtime vs TensorFlow features: max |Δ| {diff:.2e} on features up to {np.abs(ref).max():.2f}")
    assert diff <= FEATURE_TOLERANCE, (diff, float(np.abs(ref).max()))
    assert np.abs(ref).max() > 1.0  # real weights: features are not all ~0
    # Same image → same bits, whatever the batch size, its position in the batch and the run.
    np.testing.assert_array_equal(onnx(x), full)
    for i in range(9):
        np.testing.assert_array_equal(onnx(x[i:i + 1]), full[i:i + 1])
    np.testing.assert_array_equal(onnx(x[::-1]), full[::-1])
    mixed = np.concatenate([_pixels(3, seed=1), x[2:6]])
    np.testing.assert_array_equal(onnx(mixed)[3:], full[2:6])


def test_engine_choice_and_its_params():
    assert engines.resolve_engine("auto", gpu=True) == "tensorflow"
    assert engines.resolve_engine("auto", gpu=False) == "onnxruntime"
    assert engines.resolve_engine("tensorflow", gpu=False) == "tensorflow"
    with pytest.raises(ValueError, match="onnxruntime"):
        engines.resolve_engine("openvino", gpu=False)
    for section in ("extract", "evaluate"):
        with pytest.raises(ParamsError, match=rf"{section}\.engine.*'auto'.*'tensorflow'.*'onnxruntime'"):
            as_params(tiny_params(**{f"{section}.engine": "onnx"}))


def _extract(raw: Path, out: Path, cache: Path | None, **overrides) -> tuple[dict, dict[str, Path]]:
    params = as_params(tiny_params(str(raw), **overrides))
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                    params=params, cache_dir=cache)
    return m, outs


def _features_and_attrs(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as h5:
        return h5["features"][...], dict(h5.attrs)


def test_extract_keeps_each_engines_features_apart(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    cache = tmp_path / "cache"
    m_onnx, onnx_outs = _extract(raw, tmp_path / "onnx", cache, **{"extract.engine": "onnxruntime"})
    m_tf, tf_outs = _extract(raw, tmp_path / "tf", cache, **{"extract.engine": "tensorflow"})
    # The TensorFlow run finds nothing of ONNX Runtime's in the cache: its own namespace.
    assert m_onnx["computed"] == m_tf["computed"] == 36 and m_tf["reused"] == 0
    assert (m_onnx["engine"], m_tf["engine"]) == ("onnxruntime", "tensorflow")
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    for split in SPLITS:
        a, attrs_a = _features_and_attrs(onnx_outs[split])
        b, attrs_b = _features_and_attrs(tf_outs[split])
        assert attrs_a["engine"] == "onnxruntime" and "onnxruntime" in attrs_a["engine_version"]
        assert attrs_b["engine"] == "tensorflow" and attrs_b["engine_version"] == attrs_b["tensorflow"]
        assert attrs_a["precision"] == attrs_b["precision"] == "float32"
        assert attrs_a["cache_key"] != attrs_b["cache_key"]
        assert np.max(np.abs(a - b)) <= FEATURE_TOLERANCE, (np.max(np.abs(a - b)), np.abs(b).max())
    again, _ = _extract(raw, tmp_path / "again", cache, **{"extract.engine": "onnxruntime"})
    assert again["computed"] == 0 and again["reused"] == 36


def test_extract_on_onnxruntime_gives_the_same_bytes_at_any_batch_size(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    _, a = _extract(raw, tmp_path / "b8", None, **{"extract.engine": "onnxruntime", "extract.batch_size": 8})
    _, b = _extract(raw, tmp_path / "b3", None, **{"extract.engine": "onnxruntime", "extract.batch_size": 3})
    for split in SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()


@pytest.mark.slow
def test_evaluate_and_predict_on_either_engine_give_the_same_metrics(tiny_dvc_project: Path, tmp_path: Path):
    """The tiny project ran evaluate with engine auto (ONNX Runtime here); TensorFlow must agree."""
    proj = tiny_dvc_project
    expected = json.loads((proj / "reports" / "metrics.json").read_text())
    assert json.loads((proj / "reports" / "per_class.json").read_text())["engine"] == "onnxruntime"
    params = as_params({**tiny_params("data/raw"), "evaluate": {"batch_size": 5, "n_mistakes": 4,
                                                                "engine": "tensorflow"}})
    p = proj / "data" / "prepared"
    evaluate.run(raw_dir=proj / "data" / "raw", manifest=p / "manifest.csv", classes_json=p / "classes.json",
                 test_features=proj / "features" / "test.h5", head_path=proj / "models" / "head.keras",
                 model_path=proj / "models" / "model.keras", metrics_out=tmp_path / "metrics.json",
                 per_class_out=tmp_path / "per_class.json", plots_dir=tmp_path / "plots",
                 mistakes_out=tmp_path / "mistakes.png", params=params)
    got = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("head", "finetuned"):
        assert got[name]["accuracy"] == expected[name]["accuracy"]
        assert got[name]["n"] == expected[name]["n"]
        assert got[name]["log_loss"] == pytest.approx(expected[name]["log_loss"], abs=PROB_TOLERANCE)
        assert got[name]["roc_auc"] == pytest.approx(expected[name]["roc_auc"], abs=1e-6)

    images = sorted((proj / "data" / "raw").rglob("*.png"))[:10]
    probs = {}
    for engine in ("onnxruntime", "tensorflow"):
        preds = predict_run(inputs=images, model_path=proj / "models" / "model.keras",
                            out=tmp_path / f"{engine}.csv", batch_size=4, progress=False, engine=engine)
        probs[engine] = np.stack([pr.probs for pr in preds])
    assert np.max(np.abs(probs["onnxruntime"] - probs["tensorflow"])) <= PROB_TOLERANCE
    np.testing.assert_array_equal(probs["onnxruntime"].argmax(1), probs["tensorflow"].argmax(1))


def test_one_plan_per_engine_decides_device_precision_and_batch():
    cpu = engines.plan("auto", gpu=False, batch_size=32, gpu_batch_size=256)
    assert (cpu.engine, cpu.on_gpu, cpu.precision, cpu.batch_size) == ("onnxruntime", False, "float32", 32)
    gpu = engines.plan("auto", gpu=True, batch_size=32, gpu_batch_size=256)
    assert (gpu.engine, gpu.on_gpu, gpu.precision, gpu.batch_size) == ("tensorflow", True, "mixed_float16", 256)
    # ONNX Runtime runs on the CPU even where a GPU is seen: float32, the CPU batch.
    ort = engines.plan("onnxruntime", gpu=True, batch_size=32, gpu_batch_size=256)
    assert (ort.on_gpu, ort.precision, ort.batch_size) == (False, "float32", 32)
    assert cpu.describe()["batch_shape"] == "any"
    assert engines.plan("tensorflow", False, 8).describe()["batch_shape"] == 9  # the padded shape
    assert "onnxruntime" in cpu.describe()["engine_version"] and "tf2onnx" in cpu.describe()["engine_version"]
    # params.py validates the engine names without importing engines.py (every stage loads params):
    # its choices must be this module's records.
    import typing

    from pipeline.core.params import EvaluateParams, ExtractParams

    for cls in (ExtractParams, EvaluateParams):
        assert typing.get_args(typing.get_type_hints(cls)["engine"]) == ("auto", *engines.ENGINES)


def test_versions_and_keras_home_are_read_without_importing_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from pipeline.core.io import library_versions; from pipeline.backbones.weights import "
            "keras_cache_dir; from pipeline.runtime.engines import has_gpu; v = library_versions(); "
            "d = keras_cache_dir(); "
            "has_gpu(); print('tensorflow' in sys.modules or 'keras' in sys.modules, v['tensorflow'], d)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    imported, version, folder = out.stdout.split()
    import tensorflow as tf
    from keras.src.backend.config import keras_home

    if not engines._gpu_device_nodes():
        assert imported == "False"
    assert version == tf.__version__ and folder == str(Path(keras_home()) / "models")
