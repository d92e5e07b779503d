"""Stage extract (pipeline/extract.py): incremental runs through the content-addressed cache, identical files
computed once, chunked writes, the augmented views of the training images, and a kill -9 resumed."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import ROOT, as_params, make_images, tiny_params

from pipeline import extract, prepare
from pipeline.backbones.build import build_backbone
from pipeline.core.manifest import SPLITS, read_manifest
from pipeline.data.augment import augment_uint8, view_key
from pipeline.data.images import load_image
from pipeline.extraction import work as feature_work
from pipeline.runtime.engines import compile_engine, has_gpu, resolve_engine


def _setup(tmp_path: Path, per_class: int = 12, **overrides):
    raw = make_images(tmp_path / "raw", per_class=per_class)
    params = as_params(tiny_params(str(raw), **overrides))
    return raw, params


def _extract(raw: Path, params, out: Path, cache: Path | None):
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                    params=params, metrics=out / "m.json", cache_dir=cache)
    return m, outs


def _read(path: Path):
    with h5py.File(path, "r") as h5:
        return h5["features"][...], h5["labels"][...], [p.decode() for p in h5["paths"][...]]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_incremental_run_computes_only_new_images_and_equals_a_fresh_run(tmp_path):
    raw, params = _setup(tmp_path)
    cache = tmp_path / "cache"
    first, _ = _extract(raw, params, tmp_path / "run1", cache)
    assert first["computed"] == 36 and first["reused"] == 0
    make_images(tmp_path / "raw", per_class=13)  # one new image per class, the others unchanged
    second, outs = _extract(raw, params, tmp_path / "run2", cache)
    assert second["computed"] == 3 and second["reused"] == 36
    _, fresh = _extract(raw, params, tmp_path / "fresh", None)
    for split in SPLITS:
        a, b = _read(outs[split]), _read(fresh[split])
        np.testing.assert_array_equal(a[0], b[0])
        assert a[2] == b[2]
        assert _sha(outs[split]) == _sha(fresh[split]), "split files must be byte-identical"


def test_identical_files_are_computed_once(tmp_path):
    raw, params = _setup(tmp_path)
    for f in sorted((raw / "circle").iterdir())[:4]:
        shutil.copy(f, raw / "square" / f"dup_{f.name}")
    m, outs = _extract(raw, params, tmp_path / "run", tmp_path / "cache")
    assert m["images"] == 40 and m["computed"] == 36


def test_other_image_size_does_not_reuse_features(tmp_path):
    raw, params = _setup(tmp_path)
    cache = tmp_path / "cache"
    _extract(raw, params, tmp_path / "a", cache)
    other = as_params(tiny_params(str(raw), **{"backbone.image_size": 72}))
    m, _ = _extract(raw, other, tmp_path / "b", cache)
    assert m["computed"] == 36
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_small_chunks_give_the_same_files(tmp_path, monkeypatch):
    raw, params = _setup(tmp_path, **{"extract.augmented_views": 0})
    _, big = _extract(raw, params, tmp_path / "big", tmp_path / "c1")
    monkeypatch.setattr(feature_work, "CHUNK_IMAGES", 5)
    monkeypatch.setattr(extract, "WRITE_BLOCK", 4)
    _, small = _extract(raw, params, tmp_path / "small", tmp_path / "c2")
    (key_dir,) = [d for d in (tmp_path / "c2").iterdir() if d.is_dir()]
    # Batches of 8 each pass the 5-image threshold: one committed chunk per batch.
    assert len(list(key_dir.glob("*.keys.npy"))) == 5
    for split in SPLITS:
        np.testing.assert_array_equal(_read(big[split])[0], _read(small[split])[0])
        with h5py.File(small[split], "r") as h5:
            assert h5["features"].chunks is not None and h5["features"].chunks[0] <= 4


@pytest.mark.slow  # 900 images, an extract subprocess killed with SIGKILL and rerun (~30 s)
def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=300, size=40)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(str(raw), **{"extract.batch_size": 16})))
    params = as_params(tiny_params(str(raw), **{"extract.batch_size": 16}))
    prepare.run(raw_dir=raw, manifest=proj / "manifest.csv", classes_out=proj / "classes.json", params=params.data)
    cache = proj / "cache"
    cmd = [sys.executable, "-m", "pipeline.extract", "--raw-dir", str(raw), "--manifest", "manifest.csv",
           "--classes", "classes.json", "--train", "train.h5", "--val", "val.h5", "--test", "test.h5",
           "--metrics", "m.json", "--cache-dir", "cache"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=proj, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(cache.glob("*/*.keys.npy")):
        assert proc.poll() is None, "extract finished before it could be killed; use more images"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = sum(len(np.load(f)) for f in cache.glob("*/*.keys.npy"))
    import h5py
    n_train = len(read_manifest(proj / "manifest.csv", splits=("train",)))
    outputs = 900 + n_train  # every image, and one augmented view (tiny_params) of each training image
    assert 0 < committed < outputs
    # Nothing partial where a later stage would look: the split files do not exist yet.
    assert not any((proj / f"{s}.h5").exists() for s in SPLITS)
    subprocess.run(cmd, cwd=proj, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import json
    m = json.loads((proj / "m.json").read_text())
    assert 0 < m["reused"] and m["computed"] == 900 - m["reused"]
    assert m["computed"] + m["augmented_views_computed"] == outputs - committed  # nothing computed twice
    with h5py.File(proj / "train.h5") as h5:
        assert len(h5["features"]) == n_train
    fresh = {s: tmp_path / "fresh" / f"{s}.h5" for s in SPLITS}
    extract.run(raw_dir=raw, manifest=proj / "manifest.csv", classes_json=proj / "classes.json", outs=fresh,
                params=params)
    for split in SPLITS:
        assert _sha(proj / f"{split}.h5") == _sha(fresh[split]), f"{split}.h5 differs from an uninterrupted run"


def _extract_views(tmp_path, raw, out, views, cache):
    params = as_params(tiny_params(str(raw), **{"extract.augmented_views": views}))
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                    params=params, metrics=out / "m.json", cache_dir=cache)
    return params, outs, m


def test_extract_caches_views_of_train_images_only_and_reuses_them(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    cache = tmp_path / "cache"
    params, outs, m = _extract_views(tmp_path, raw, tmp_path / "a", 2, cache)
    with h5py.File(outs["train"], "r") as h5:
        feats, views, paths = h5["features"][...], h5["views"][...], [p.decode() for p in h5["paths"][...]]
        assert h5.attrs["augmented_views"] == 2 and "rotation" in h5.attrs["augment"]
    n = len(paths)
    assert views.shape == (n, 2, feats.shape[1]) and m["augmented_views_computed"] == 2 * n
    assert not np.array_equal(views[:, 0], feats) and not np.array_equal(views[:, 0], views[:, 1])
    for split in ("val", "test"):
        with h5py.File(outs[split], "r") as h5:
            assert "views" not in h5 and h5.attrs["augmented_views"] == 0
    # View k of an image is backbone(uint8(augment(image, view_key(sha256(file), k)))) on extract's engine,
    # in any batch.
    engine = resolve_engine(params.extract.engine, has_gpu())
    infer = compile_engine(build_backbone(params.backbone), 64, engine, params.extract.batch_size)
    digest = hashlib.sha256((raw / paths[3]).read_bytes()).digest()
    image = load_image(str(raw / paths[3]), 64)[None]
    again = infer(augment_uint8(np.concatenate([image, image]), params.augment,
                                [view_key(digest, 1), view_key(b"x", 0)]))[0]
    np.testing.assert_array_equal(again, views[3, 1])
    # A rerun computes nothing; one more view computes exactly that view, the first two reused as they were.
    _, _, m2 = _extract_views(tmp_path, raw, tmp_path / "b", 2, cache)
    assert m2["computed"] == 0 and m2["augmented_views_computed"] == 0
    _, outs3, m3 = _extract_views(tmp_path, raw, tmp_path / "c", 3, cache)
    assert m3["augmented_views_computed"] == n
    with h5py.File(outs3["train"], "r") as h5:
        np.testing.assert_array_equal(h5["views"][:, :2], views)
