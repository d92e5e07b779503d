"""Faults: kill -9 during extract, finetune and evaluate; a full disk; a read-only folder;
stale or foreign artifacts; resuming fine-tuning from its checkpoint.

Kills are real: the stage runs in a subprocess (its own ``main()``) and gets SIGKILL. To land
the kill inside the stage, the subprocess decodes images slowly (a sleep wrapped around the
real decoder) and touches a marker file when it starts decoding; nothing under test is mocked.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import ROOT, as_params, make_images, tiny_params

from pipeline import evaluate, extract, finetune, prepare, train_head
from pipeline.backbones.build import feature_provenance
from pipeline.backbones.registry import BackboneError
from pipeline.core.manifest import SPLITS
from pipeline.extraction.features import ProvenanceError, read_features
from pipeline.models.heads import load_model

# Runs a stage's main() with a slow decoder: every decode touches $FAULT_MARKER, then sleeps.
SLOW_STAGE = """
import os, runpy, sys, time
import pipeline.data.images as images
_load = images.load_image
def slow_load(*args, **kwargs):
    open(os.environ["FAULT_MARKER"], "a").close()
    time.sleep(float(os.environ["FAULT_DELAY"]))
    return _load(*args, **kwargs)
images.load_image = slow_load  # before the stage imports pipeline.data.datasets
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


class Project:
    """A tiny project that has run prepare, extract, train_head and an uninterrupted 2-epoch finetune
    with a checkpoint (``ref/``: the reference a killed-and-resumed run must equal)."""

    def __init__(self, root: Path):
        self.root = root
        self.raw = make_images(root / "raw", per_class=12)
        self.raw_params = tiny_params(str(self.raw), **{"finetune.epochs": 2, "finetune.patience": 5,
                                                        "finetune.class_weight": "balanced"})
        self.params_file = self.write_params(self.raw_params, "params.yaml")
        self.params = as_params(self.raw_params)
        self.manifest, self.classes = root / "manifest.csv", root / "classes.json"
        self.feats = {s: root / f"{s}.h5" for s in SPLITS}
        self.head = root / "head.keras"
        self.ref = root / "ref"
        self.model = self.ref / "model.keras"
        prepare.run(raw_dir=self.raw, manifest=self.manifest, classes_out=self.classes, params=self.params.data)
        extract.run(raw_dir=self.raw, manifest=self.manifest, classes_json=self.classes, outs=self.feats,
                    params=self.params)
        train_head.run(train_h5=self.feats["train"], val_h5=self.feats["val"], classes_json=self.classes,
                       head_out=self.head, metrics_out=root / "head_metrics.json",
                       history_out=root / "head_history.csv", params=self.params)
        self.ref.mkdir()
        # The run test_kill_during_finetune kills: started now, so that it runs (and is killed
        # after epoch 1) while the uninterrupted reference below trains.
        killed = root / "killed"
        self.killed_checkpoint = killed / "checkpoint.h5"
        args = ["--raw-dir", str(self.raw), "--manifest", str(self.manifest), "--classes", str(self.classes),
                "--val-features", str(self.feats["val"]), "--head", str(self.head), "--model",
                str(killed / "model.keras"), "--history", str(killed / "history.csv"), "--metrics",
                str(killed / "metrics.json"), "--checkpoint", str(self.killed_checkpoint), "--params",
                str(self.params_file)]
        # The checkpoint appears (atomically) when epoch 1 of 2 has finished: the kill lands in epoch 2.
        self.killed_finetune = KilledStage("pipeline.finetune", args, root / "killed_work", delay=0.01,
                                           ready=self.killed_checkpoint.exists)
        self.ref_metrics = self.finetune(self.ref, checkpoint=self.ref / "checkpoint.h5")

    def write_params(self, raw: dict, name: str) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        return path

    def finetune(self, out: Path, params=None, checkpoint: Path | None = None) -> dict:
        return finetune.run(raw_dir=self.raw, manifest=self.manifest, classes_json=self.classes,
                            val_features=self.feats["val"], head_path=self.head, model_out=out / "model.keras",
                            history_out=out / "history.csv", metrics_out=out / "metrics.json",
                            params=params or self.params, checkpoint=checkpoint)

    def evaluate(self, out: Path, model: Path | None = None) -> dict:
        return evaluate.run(raw_dir=self.raw, manifest=self.manifest,
                            classes_json=self.classes, test_features=self.feats["test"],
                            head_path=self.head, model_path=model or self.model, metrics_out=out / "metrics.json",
                            per_class_out=out / "per_class.json", plots_dir=out / "plots",
                            mistakes_out=out / "mistakes.png", params=self.params)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return Project(tmp_path_factory.mktemp("faults"))


class KilledStage:
    """A stage's ``main()`` in a subprocess with a slow decoder, SIGKILLed by a watcher thread the
    moment ``ready()`` (default: decoding has started) holds. Other work can run meanwhile."""

    def __init__(self, module: str, args: list[str], workdir: Path, delay: float, ready=None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.marker, self.log = workdir / "decoding-started", workdir / "stage.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT_MARKER": str(self.marker), "FAULT_DELAY": str(delay),
               "TMPDIR": str(workdir)}
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", SLOW_STAGE, module, *args], cwd=ROOT, env=env,
                                         stdout=fh, stderr=subprocess.STDOUT)
        self.failure = ""
        self.thread = threading.Thread(target=self._watch, args=(ready or self.marker.exists,), daemon=True)
        self.thread.start()

    def _watch(self, ready, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.failure = f"the stage ended (rc {self.proc.returncode}) before it could be killed"
                return
            if ready():
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return
            time.sleep(0.01)
        self.proc.kill()
        self.failure = "the stage never reached the kill point"

    def wait_killed(self) -> None:
        """Block until the kill; fail the test if the stage was not killed by it."""
        self.thread.join()
        if self.failure:
            pytest.fail(f"{self.failure}:\n{self.log.read_text(errors='replace')[-3000:]}")
        assert self.proc.returncode == -signal.SIGKILL


def _visible(folder: Path) -> set[str]:
    """Files a later stage could pick up (the temporary names of atomic writes are hidden)."""
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


# --- kill -9 -------------------------------------------------------------------------------------------

@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_kill_during_extract_leaves_the_previous_features_or_none(project, tmp_path):
    # A complete previous version of two splits; the third was never extracted.
    for s in ("train", "val"):
        shutil.copy(project.feats[s], tmp_path / f"{s}.h5")
    before = {s: (tmp_path / f"{s}.h5").read_bytes() for s in ("train", "val")}
    new_raw = tiny_params(str(project.raw), **{"backbone.pooling": "max"})
    new_params_file = project.write_params(new_raw, "params_max.yaml")
    outs = [a for s in SPLITS for a in (f"--{s}", str(tmp_path / f"{s}.h5"))]
    KilledStage("pipeline.extract", ["--raw-dir", str(project.raw), "--manifest", str(project.manifest), "--classes",
                                     str(project.classes), *outs, "--metrics", str(tmp_path / "extract.json"),
                                     "--params", str(new_params_file)], tmp_path / "work", delay=0.3).wait_killed()
    assert _visible(tmp_path) == {"train.h5", "val.h5", "work"}
    for s in ("train", "val"):
        assert (tmp_path / f"{s}.h5").read_bytes() == before[s], f"{s}.h5 was touched by the killed run"
        read_features(tmp_path / f"{s}.h5",
                      feature_provenance(project.params.backbone, ["circle", "square", "stripes"]))
    # The rerun completes, with the new params.
    new_params = as_params(new_raw)
    extract.run(raw_dir=project.raw, manifest=project.manifest, classes_json=project.classes,
                outs={s: tmp_path / f"{s}.h5" for s in SPLITS}, params=new_params)
    expected = feature_provenance(new_params.backbone, ["circle", "square", "stripes"])
    for s in SPLITS:
        fs = read_features(tmp_path / f"{s}.h5", expected)
        assert fs.attrs["pooling"] == "max" and len(fs.paths) == len(read_features(project.feats[s]).paths)


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_kill_during_finetune_then_resume_equals_an_uninterrupted_run(project, tmp_path, caplog):
    # Killed after epoch 1 of 2 (see Project), while the reference ran uninterrupted.
    project.killed_finetune.wait_killed()
    ckpt, ref = project.killed_checkpoint, project.ref
    killed = ckpt.parent
    assert _visible(killed) == {"checkpoint.h5"}  # no model, sidecar, history or metrics
    with h5py.File(ckpt, "r") as h5:
        assert json.loads(h5.attrs["state"])["epoch"] == 1

    with caplog.at_level(logging.INFO, logger="pipeline.finetuning.trainer"):  # which logs the resume
        resumed = project.finetune(killed, checkpoint=ckpt)
    assert f"resuming from {ckpt} after epoch 1" in caplog.text
    uninterrupted = project.ref_metrics

    assert (killed / "history.csv").read_text() == (ref / "history.csv").read_text()
    assert len((ref / "history.csv").read_text().splitlines()) == 1 + 1 + 2
    # Timings and how much bottom work this process did (the resumed run computes only epoch 2's view) aside.
    work = ("seconds", "seconds_by_part", "bottom_seconds", "bottom_images_computed")
    drop = lambda m: {k: v for k, v in m.items() if k not in work}  # noqa: E731
    assert drop(resumed) == drop(uninterrupted)
    # The trained state after epoch 2 (every variable and the optimizer's momentum) is identical.
    with h5py.File(ckpt, "r") as a, h5py.File(ref / "checkpoint.h5", "r") as b:
        for group in ("model", "optimizer"):
            assert len(a[group]) == len(b[group]) > 0
            for k in a[group]:
                np.testing.assert_array_equal(a[group][k][...], b[group][k][...], err_msg=f"{group}/{k}")
    ma, _ = load_model(killed / "model.keras")
    mb, _ = load_model(ref / "model.keras")
    for wa, wb in zip(ma.get_weights(), mb.get_weights()):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_kill_during_evaluate_leaves_no_report(project, tmp_path):
    out = tmp_path / "reports"
    args = ["--raw-dir", str(project.raw), "--manifest", str(project.manifest), "--classes", str(project.classes),
            "--test-features", str(project.feats["test"]), "--head", str(project.head), "--model", str(project.model),
            "--metrics", str(out / "metrics.json"), "--per-class", str(out / "per_class.json"),
            "--plots-dir", str(out / "plots"), "--mistakes", str(out / "mistakes.png"),
            "--params", str(project.params_file)]
    KilledStage("pipeline.evaluate", args, tmp_path / "work", delay=0.3).wait_killed()
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    # The rerun completes; the reports are those of an uninterrupted run (the reference's model).
    metrics = project.evaluate(out)
    assert json.loads((out / "metrics.json").read_text())["finetuned"]["n"] == metrics["finetuned"]["n"] > 0
    assert {p.name for p in (out / "plots").iterdir()} == {
        f"{kind}_{model}.csv" for kind in ("confusion", "roc", "reliability", "coverage")
        for model in ("head", "finetuned")}


# --- write failures ------------------------------------------------------------------------------------

class _FileSizeLimit:
    """RLIMIT_FSIZE: any write past ``limit`` bytes fails with EFBIG, as on a full disk.

    Python ignores SIGXFSZ, so the write raises OSError instead of killing the process.
    """

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_disk_full_while_saving_a_model_keeps_the_previous_model(project, tmp_path):
    dense = as_params(tiny_params(str(project.raw), **{"head.type": "dense", "head.dense.epochs": 2}))
    head = tmp_path / "head.keras"

    def fit_head():
        train_head.run(train_h5=project.feats["train"], val_h5=project.feats["val"], classes_json=project.classes,
                       head_out=head, metrics_out=tmp_path / "m.json", history_out=tmp_path / "h.csv", params=dense)

    shutil.copy(project.head, head)
    shutil.copy(project.head.with_suffix(".json"), tmp_path / "head.json")
    before = {n: (tmp_path / n).read_bytes() for n in ("head.keras", "head.json")}
    with pytest.raises(OSError) as exc, _FileSizeLimit(8 << 10):  # the head file is ~20 kB
        fit_head()
    assert exc.value.errno == 27, exc.value  # EFBIG: "File too large"
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert _visible(tmp_path) == {"head.keras", "head.json"}  # and no temporary file left either
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert load_model(head)[1]["head_type"] == "logreg"  # still the previous, consistent pair
    fit_head()  # with space again, the rerun completes
    assert load_model(head)[1]["head_type"] == "dense"


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_disk_full_while_writing_features_keeps_the_previous_features(project, tmp_path):
    outs = {s: tmp_path / f"{s}.h5" for s in SPLITS}
    for s, out in outs.items():
        shutil.copy(project.feats[s], out)
    before = {s: out.read_bytes() for s, out in outs.items()}
    # A feature file of this project is ~70 kB; its header and small datasets fit in 16 kB.
    with pytest.raises(OSError), _FileSizeLimit(16 << 10):
        extract.run(raw_dir=project.raw, manifest=project.manifest, classes_json=project.classes, outs=outs,
                    params=project.params)
    assert {s: out.read_bytes() for s, out in outs.items()} == before
    assert _visible(tmp_path) == {f"{s}.h5" for s in SPLITS}
    extract.run(raw_dir=project.raw, manifest=project.manifest, classes_json=project.classes, outs=outs,
                params=project.params)
    for s, out in outs.items():
        np.testing.assert_array_equal(read_features(out).features, read_features(project.feats[s]).features)


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; run the suite as a user")
def test_read_only_output_folder_fails_cleanly(project, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            train_head.run(train_h5=project.feats["train"], val_h5=project.feats["val"], classes_json=project.classes,
                           head_out=out / "head.keras", metrics_out=out / "m.json", history_out=out / "h.csv",
                           params=project.params)
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_output_folder_that_is_a_file_fails_cleanly(tmp_path):
    """The unwritable-destination case for every user, root included (root writes into read-only folders, so
    the test above skips as root, which is how CI runs): the outputs' folder is a user's regular file."""
    raw = make_images(tmp_path / "raw", per_class=12)
    params = as_params(tiny_params(str(raw)))
    blocker = tmp_path / "reports"
    blocker.write_bytes(b"the user's own file, not a folder")
    with pytest.raises(OSError) as exc:
        prepare.run(raw_dir=raw, manifest=blocker / "manifest.csv", classes_out=blocker / "classes.json",
                    quarantine=blocker / "quarantine.csv", params=params.data)
    assert "reports" in str(exc.value)
    assert blocker.is_file() and blocker.read_bytes() == b"the user's own file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "reports"]  # nothing written beside it


# --- stale or foreign artifacts ------------------------------------------------------------------------

@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_features_from_other_params_are_refused_naming_the_difference(project, tmp_path):
    other = as_params(tiny_params(str(project.raw), **{"backbone.pooling": "max"}))
    with pytest.raises(ProvenanceError, match=r"pooling: artifact has 'avg', params give 'max'.*dvc repro"):
        evaluate.run(raw_dir=project.raw, manifest=project.manifest,
                     classes_json=project.classes, test_features=project.feats["test"],
                     head_path=project.head, model_path=project.model, metrics_out=tmp_path / "m.json",
                     per_class_out=tmp_path / "pc.json", plots_dir=tmp_path / "plots",
                     mistakes_out=tmp_path / "mis.png", params=other)
    with pytest.raises(ProvenanceError, match="image_size: artifact has 64, params give 96"):
        project.finetune(tmp_path, params=as_params(tiny_params(str(project.raw), **{"backbone.image_size": 96})))
    assert _visible(tmp_path) == set()


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_head_trained_for_another_class_list_is_refused(project, tmp_path):
    other = tmp_path / "classes.json"
    doc = json.loads(project.classes.read_text())
    doc["classes"] = ["circle", "disc", "stripes"]
    other.write_text(json.dumps(doc))
    with pytest.raises(ProvenanceError, match=r"class_names: artifact has \['circle', 'square', 'stripes'\], "
                                              r"params give \['circle', 'disc', 'stripes'\]"):
        finetune.run(raw_dir=project.raw, manifest=project.manifest, classes_json=other,
                     val_features=project.feats["val"], head_path=project.head, model_out=tmp_path / "model.keras",
                     history_out=tmp_path / "h.csv", metrics_out=tmp_path / "m.json", params=project.params)
    assert _visible(tmp_path) == {"classes.json"}


@pytest.mark.slow  # the project fixture: the pipeline, a 2-epoch fine-tune and one killed in a subprocess
def test_unknown_unfreeze_layer_fails_before_any_training(project, tmp_path):
    bad = as_params(tiny_params(str(project.raw), **{"finetune.unfreeze_from": "block9z_nope"}))
    with pytest.raises(BackboneError, match=r"finetune.unfreeze_from: 'block9z_nope' is not a layer of "
                                            r"efficientnet_lite0; use auto .* block boundaries .*: block1a_dwconv"):
        project.finetune(tmp_path, params=bad, checkpoint=tmp_path / "ckpt.h5")
    assert _visible(tmp_path) == set()


# --- the checkpoint itself -----------------------------------------------------------------------------
