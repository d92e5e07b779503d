"""The Ray executor of extract (pipeline/extraction/ray_executor.py) on a real local Ray instance (2 CPUs):
bit-identical to the local executor, incremental, and safe when an actor is killed with kill -9 mid-run;
without Ray installed, one line naming the install command."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import as_params, make_images, tiny_params

from pipeline import extract, prepare
from pipeline.core.chunks import DIGEST_BYTES
from pipeline.core.io import file_digests
from pipeline.core.manifest import SPLITS

RAY = {"extract.executor": "ray", "extract.ray.actors": 2, "extract.ray.batch_size": 16}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from pipeline.extraction.ray_executor import job_runtime_env

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=job_runtime_env())
    yield
    ray.shutdown()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare(raw: Path, out: Path, params) -> None:
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)


def _extract(raw: Path, prep: Path, params, out: Path, cache: Path | None) -> tuple[dict, dict[str, Path]]:
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    m = extract.run(raw_dir=raw, manifest=prep / "manifest.csv", classes_json=prep / "classes.json", outs=outs,
                    params=params, cache_dir=cache)
    return m, outs


def _cached_digests(cache: Path) -> list[bytes]:
    """Every digest in every committed chunk; each chunk's features must load with one row per key."""
    found = []
    for keys_file in cache.glob("*/*.keys.npy"):
        keys = np.load(keys_file)
        feats = np.load(keys_file.with_name(keys_file.name.replace(".keys.", ".feats.")))
        assert keys.shape == (len(feats), DIGEST_BYTES) and np.isfinite(feats).all(), f"torn chunk {keys_file}"
        found += [k.tobytes() for k in keys]
    return found


@pytest.mark.slow  # Ray start-up and TensorFlow in every actor: tens of seconds on 2 cores
def test_ray_features_are_bit_identical_to_local_and_a_rerun_computes_only_new_images(tmp_path, local_ray):
    # 33 images in model batches of 8: the last batch holds one image (run as two, as locally).
    raw = make_images(tmp_path / "raw", per_class=11)
    local_p = as_params(tiny_params(str(raw)))
    ray_p = as_params(tiny_params(str(raw), **RAY))
    _prepare(raw, tmp_path, local_p)
    _, local = _extract(raw, tmp_path, local_p, tmp_path / "local", None)
    cache = tmp_path / "cache"
    m, by_ray = _extract(raw, tmp_path, ray_p, tmp_path / "ray", cache)
    assert m["computed"] == 33 and m["reused"] == 0 and m["executor"] == "ray"
    for split in SPLITS:
        assert _sha(by_ray[split]) == _sha(local[split]), f"{split}.h5 from Ray differs from the local executor"

    # One new image per class: Ray computes only those three, exactly as a local run on the same cache.
    make_images(raw, per_class=12)
    _prepare(raw, tmp_path, local_p)
    shutil.copytree(cache, tmp_path / "cache_copy")
    m, by_ray = _extract(raw, tmp_path, ray_p, tmp_path / "ray2", cache)
    assert m["computed"] == 3 and m["reused"] == 33
    m, local = _extract(raw, tmp_path, local_p, tmp_path / "local2", tmp_path / "cache_copy")
    assert m["computed"] == 3
    for split in SPLITS:
        assert _sha(by_ray[split]) == _sha(local[split])


def _actor_pids() -> list[int]:
    """Processes of this machine whose title names the extraction actor (Ray sets ray::MapWorker(...FeatureActor))."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"FeatureActor" in cmd and b"MapWorker" in cmd:
                pids.append(int(entry))
    return pids


@pytest.mark.slow  # Ray start-up and TensorFlow in every actor: tens of seconds on 2 cores
def test_an_actor_killed_with_kill_9_loses_no_chunk_and_the_run_matches_local(tmp_path, local_ray):
    raw = make_images(tmp_path / "raw", per_class=80, size=40)
    local_p = as_params(tiny_params(str(raw)))
    ray_p = as_params(tiny_params(str(raw), **RAY))
    _prepare(raw, tmp_path, local_p)
    cache = tmp_path / "cache"
    result: dict = {}

    def run() -> None:
        try:
            result["metrics"], result["outs"] = _extract(raw, tmp_path, ray_p, tmp_path / "ray", cache)
        except BaseException as exc:  # reported by the test thread below
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 600
    while not list(cache.glob("*/*.keys.npy")):
        assert worker.is_alive(), f"extraction ended before an actor could be killed: {result}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victims = _actor_pids()
    assert victims, "no extraction actor process found"
    os.kill(victims[0], signal.SIGKILL)
    worker.join(timeout=900)
    assert not worker.is_alive()
    assert "error" not in result, f"the run did not survive the killed actor: {result.get('error')!r}"
    assert result["metrics"]["computed"] == 240
    _, local = _extract(raw, tmp_path, local_p, tmp_path / "local", tmp_path / "local_cache")
    # Every output (each image, and the augmented view of each training image) is in the cache,
    # in chunks that load whole: none torn, none lost.
    assert set(_cached_digests(cache)) == set(_cached_digests(tmp_path / "local_cache"))
    assert len(set(_cached_digests(cache))) > len(set(file_digests([str(p) for p in sorted(raw.rglob("*.png"))])))
    for split in SPLITS:
        assert _sha(result["outs"][split]) == _sha(local[split])


def test_ray_executor_without_ray_stops_at_once_naming_the_install_command(monkeypatch, tmp_path):
    from pipeline.core.io import PipelineError
    from pipeline.extract import run

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` and find_spec see without Ray installed
    params = as_params(tiny_params(str(tmp_path / "raw"), **{"extract.executor": "ray"}))
    # No manifest exists: the check comes before any input is read.
    with pytest.raises(PipelineError) as exc:
        run(raw_dir=tmp_path / "raw", manifest=tmp_path / "manifest.csv", classes_json=tmp_path / "classes.json",
            outs={"train": tmp_path / "train.h5"}, params=params)
    msg = str(exc.value)
    assert "\n" not in msg and "pip install -r requirements-ray.txt" in msg and "missing: ray" in msg
