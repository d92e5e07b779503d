"""The feature cache (pipeline/extraction/cache.py): its key changes when features can, and only then; its
namespace folder holds float32 rows by image digest, from this process or another writer.

The key hashes what decides a feature vector (pipeline.extraction.cache.model_key): the resolved backbone
(weights digest, architecture, size, pooling, decoder + preprocessing), the engine, its version
and precision, library versions, and the code that computes features by its syntax tree, followed
from the decode / augment / network / conversion / engine entry points. These tests edit a copy
of pipeline/ and check which edits move the key. (The chunk protocol below the cache:
test_core_chunks.py.)
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, as_params, make_images, tiny_params

from pipeline import extract, prepare
from pipeline.backbones.registry import resolve
from pipeline.core.manifest import SPLITS
from pipeline.extraction.cache import (
    FEATURE_CODE,
    FeatureCache,
    code_fingerprint,
    feature_code_files,
    model_key,
    stored_dim,
    write_features,
)


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _edit(root: Path, name: str, old: str, new: str) -> None:
    path = root / name
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {name}: update this test"
    path.write_text(text.replace(old, new))


def test_the_feature_code_reaches_decode_augment_network_and_engines():
    files = feature_code_files()
    for f in ("pipeline/data/images.py", "pipeline/data/augment.py", "pipeline/backbones/build.py",
              "pipeline/backbones/efficientnet_lite.py", "pipeline/backbones/torch_legacy.py",
              "pipeline/backbones/registry.py", "pipeline/runtime/converters.py", "pipeline/runtime/engines.py",
              "pipeline/runtime/inference.py", "pipeline/extraction/work.py"):
        assert f in files, f"{f} holds code that computes features but is not in the key"
    for f in ("pipeline/core/params.py", "pipeline/finetune.py", "pipeline/models/heads.py", "pipeline/train_head.py",
              "pipeline/extract.py", "pipeline/export.py", "pipeline/evaluate.py", "pipeline/finetuning/recipe.py"):
        assert f not in files, f"{f} computes no feature but is in the key"
    assert len(FEATURE_CODE) == len(set(FEATURE_CODE))


@pytest.mark.parametrize("name, old, new", [
    # A new param (any section): params.py is not feature code; its values enter the key as values.
    ("pipeline/core/params.py", "    pooling: Literal[\"avg\", \"max\"] = \"avg\"\n",
     "    pooling: Literal[\"avg\", \"max\"] = \"avg\"\n    note: str = \"x\"\n"),
    # Fine-tune-only code: the recipe, and beside the builder.
    ("pipeline/finetuning/recipe.py", "        folded += 1\n", "        folded += 1\n        folded += 0\n"),
    ("pipeline/backbones/build.py", "def count_params(weights: list) -> int:",
     "def count_params(weights: list, extra: int = 0) -> int:"),
    # Comments, docstrings and annotations in the very code that computes features.
    ("pipeline/data/images.py", "def load_image(", "# a comment\ndef load_image("),
    ("pipeline/data/augment.py", "def augment_uint8(", "def augment_uint8(  # why\n"),
    ("pipeline/backbones/build.py", "    Modes: ``tf`` (x/127.5 − 1)", "    Modes (reworded): ``tf`` (x/127.5 − 1)"),
    # Code outside the feature path: the stages, the CLI, the head.
    ("pipeline/extract.py", "WRITE_BLOCK = 1024", "WRITE_BLOCK = 2048"),
    # A definition nothing on the feature path calls.
    ("pipeline/data/augment.py", "def augment_uint8(", "def _unused():\n    pass\n\n\ndef augment_uint8("),
    ("pipeline/models/training.py", "def write_history(", "UNUSED = 1\n\n\ndef write_history("),
])
def test_edits_that_cannot_change_features_keep_the_key(project, name, old, new):
    before = code_fingerprint(project)
    assert before == code_fingerprint(ROOT)
    _edit(project, name, old, new)
    assert code_fingerprint(project) == before, f"this edit of {name} cannot change a feature but moves the key"


@pytest.mark.parametrize("name, old, new", [
    ("pipeline/data/images.py", "RESAMPLE = ", "RESAMPLE = 1 or "),  # the decoder's resampling
    ("pipeline/backbones/build.py", "return x / 127.5 - 1.0", "return x / 128.0 - 1.0"),  # preprocessing code
    ("pipeline/data/augment.py", "uniform(-1.0, 1.0, 5)", "uniform(-1.0, 1.0, 6)"),  # how a view is drawn
    ("pipeline/backbones/efficientnet_lite.py", "BN_EPSILON = 1e-3", "BN_EPSILON = 1e-5"),  # the network
    ("pipeline/backbones/efficientnet_lite.py", "rounded + divisor if", "rounded if"),  # Lite2's channel rounding
    ("pipeline/runtime/converters.py", "0.5 * x * (1.0 + keras.ops.erf", "0.5 * x * (1.01 + keras.ops.erf"),  # GELU
    ("pipeline/backbones/registry.py", "weights[0].transpose(0, 1, 3, 2)", "weights[0]"),  # ConvNeXt depthwise
    ("pipeline/backbones/torch_legacy.py", "def _read_exact(", "def _read_exact(*_extra, "),  # reading the weights
    ("pipeline/runtime/converters.py", "ONNX_OPSET = 17", "ONNX_OPSET = 18"),  # the conversion
    ("pipeline/runtime/engines.py", "ORT_ENABLE_ALL", "ORT_ENABLE_BASIC"),  # ONNX Runtime's graph optimizations
    ("pipeline/runtime/inference.py", "shape = (batch_size + 1, size, size, 3)", "shape = (batch_size, size, size, 3)"),
    ("pipeline/backbones/registry.py", 'return BackboneSpec(name, build, imagenet, "tf", default_size',
     'return BackboneSpec(name, build, imagenet, "caffe", default_size'),  # Lite's preprocessing mode
])
def test_edits_that_can_change_features_move_the_key(project, name, old, new):
    before = code_fingerprint(project)
    _edit(project, name, old, new)
    assert code_fingerprint(project) != before, f"this edit of {name} can change features but keeps the key"


def _key(params_raw: dict, **engine) -> str:
    prov = resolve(as_params(params_raw).backbone).provenance()
    desc = {"engine": "onnxruntime", "engine_version": "1", "precision": "float32", "batch_shape": "any", **engine}
    return model_key(prov, desc, {"PIL": "1", "numpy": "1"})[0]


def test_the_key_follows_preprocessing_weights_engine_and_libraries(tmp_path):
    base = _key(tiny_params())
    assert base == _key(tiny_params())
    assert base == _key(tiny_params(**{"finetune.epochs": 7, "head.type": "dense", "extract.batch_size": 3}))
    assert base != _key(tiny_params(**{"backbone.image_size": 72}))
    assert base != _key(tiny_params(**{"backbone.pooling": "max"}))
    assert base != _key(tiny_params(**{"backbone.weights": "none"}))
    weights = resolve(as_params(tiny_params()).backbone).weights_arg
    assert weights == "imagenet"
    from pipeline.backbones.weights import lite_weights_path

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, other = tmp_path / "a" / "w.pth", tmp_path / "b" / "w.pth"
    one.write_bytes(Path(lite_weights_path("efficientnet_lite0")).read_bytes())
    data = one.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # other weights, same file name
    assert _key(tiny_params(**{"backbone.weights": str(one)})) != _key(tiny_params(**{"backbone.weights": str(other)}))
    assert base != _key(tiny_params(), engine="tensorflow")
    assert base != _key(tiny_params(), precision="int8")
    assert base != _key(tiny_params(), engine_version="2")
    prov = resolve(as_params(tiny_params()).backbone).provenance()
    desc = {"engine": "onnxruntime", "engine_version": "1", "precision": "float32", "batch_shape": "any"}
    assert model_key(prov, desc, {"PIL": "1", "numpy": "1"}) != model_key(prov, desc, {"PIL": "2", "numpy": "1"})


def test_params_outside_the_feature_path_reuse_every_cached_feature(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    cache = tmp_path / "cache"
    runs = {}
    for tag, overrides in (("a", {}), ("b", {"finetune.epochs": 3, "head.type": "dense", "seed": 7}),
                           ("c", {"backbone.pooling": "max"})):
        params = as_params(tiny_params(str(raw), **{"extract.augmented_views": 0, **overrides}))
        out = tmp_path / tag
        prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
        runs[tag] = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json",
                                outs={s: out / f"{s}.h5" for s in SPLITS}, params=params, cache_dir=cache)
    assert runs["a"]["computed"] == 36
    assert runs["b"]["computed"] == 0 and runs["b"]["reused"] == 36
    assert runs["c"]["computed"] == 36, "another pooling must not reuse features"


def test_the_converted_backbone_is_kept_with_its_features_and_reused(tmp_path, monkeypatch):
    import pipeline.runtime.converters as converters

    raw = make_images(tmp_path / "raw", per_class=12)
    cache = tmp_path / "cache"
    params = as_params(tiny_params(str(raw), **{"extract.augmented_views": 0, "extract.engine": "onnxruntime"}))
    out = tmp_path / "run"
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    first = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                        params=params, cache_dir=cache)
    (key_dir,) = [d for d in cache.iterdir() if d.is_dir()]
    assert (key_dir / "backbone.onnx").is_file()
    before = _by_path(outs["train"])
    # New images, same namespace: computed with the cached model, never converted again.
    make_images(tmp_path / "raw", per_class=14)
    monkeypatch.setattr(converters, "to_onnx", lambda *a, **k: pytest.fail("converted again"))
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    second = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                         params=params, cache_dir=cache)
    assert first["computed"] == 36 and second["computed"] == 6 and second["reused"] == 36
    after = _by_path(outs["train"])
    assert len(after) > len(before)
    for path, feats in before.items():
        np.testing.assert_array_equal(after[path], feats)


def _by_path(h5_path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(h5_path) as h5:
        return {p.decode(): f for p, f in zip(h5["paths"][...], h5["features"][...])}


RUN_EXTRACT = """
import runpy, sys
sys.argv = ["extract"] + sys.argv[1:]
runpy.run_module("pipeline.extract", run_name="__main__")
print("TF-IMPORTED" if "tensorflow" in sys.modules or "keras" in sys.modules else "TF-FREE")
"""


def test_with_the_converted_model_cached_the_stage_never_imports_tensorflow(tmp_path):
    import subprocess
    import sys

    import yaml

    raw = make_images(tmp_path / "raw", per_class=12)
    p = tiny_params(str(raw), **{"extract.augmented_views": 0})  # views are drawn with TensorFlow's image ops
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    args = ["--raw-dir", str(raw), "--manifest", "manifest.csv", "--classes", "classes.json", "--train", "train.h5",
            "--val", "val.h5", "--test", "test.h5", "--metrics", "m.json", "--cache-dir", "cache"]

    def stage() -> str:
        prepare.run(raw_dir=raw, manifest=tmp_path / "manifest.csv", classes_out=tmp_path / "classes.json",
                    params=as_params(p).data)
        proc = subprocess.run([sys.executable, "-c", RUN_EXTRACT, *args], cwd=tmp_path, capture_output=True,
                              text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    assert stage() == "TF-IMPORTED"  # the first run converts the backbone
    make_images(tmp_path / "raw", per_class=14)  # new images to compute, on the cached model
    assert stage() == "TF-FREE"


def test_the_cache_keeps_float32_rows_by_digest_and_sees_another_writers_chunks(tmp_path):
    digests = [bytes([i]) * 32 for i in range(5)]
    feats = np.random.default_rng(0).normal(size=(5, 4))  # float64 in: stored as float32
    cache = FeatureCache(tmp_path, "key", {"backbone": "x"}, dim=4)
    assert stored_dim(tmp_path, "key") == 4 and stored_dim(tmp_path, "other") is None
    cache.add_chunk(digests[:3], feats[:3])
    cache.add_chunk([], np.zeros((0, 4)))  # nothing to commit: no empty chunk
    assert len(list(cache.dir.glob("*.keys.npy"))) == 1
    write_features(cache.dir, digests[3:], feats[3:])  # a Ray actor's commit, without an index
    assert digests[4] not in cache and cache.refresh() == 1 and len(cache) == 5
    got = cache.get_many(digests[::-1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, feats[::-1].astype(np.float32))
    assert cache.get_many([]).shape == (0, 4)
    # Reopened with another description, the namespace keeps what it recorded first.
    FeatureCache(tmp_path, "key", {"backbone": "y"}, dim=7)
    assert stored_dim(tmp_path, "key") == 4

