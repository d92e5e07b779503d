"""Determinism: the same params twice → identical features and metrics on CPU.

One run in this process, one in a fresh Python process at the same time, over the hostile
folder of conftest.make_hostile_folder (so every odd format prepare accepts also goes through
extract, a dense head with balanced class weights, the stacked model and evaluate, without a
crash). Fine-tuning epochs are left to test_faults: a killed run resumed in another process
must end with the very variables of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, as_params, make_hostile_folder, tiny_params

from pipeline import evaluate, extract, finetune, prepare, train_head
from pipeline.core.manifest import SPLITS
from pipeline.extraction.features import read_features
from pipeline.models.heads import load_model

pytestmark = pytest.mark.slow  # the whole pipeline twice, one run in a fresh process

PARAMS = {"data.max_rejected_fraction": 0.5, "head.type": "dense", "head.dense.epochs": 5,
          "head.class_weight": "balanced", "finetune.epochs": 0}


def run_pipeline(raw: Path, out: Path, raw_params: dict) -> None:
    """prepare → extract → train_head → finetune → evaluate into ``out``, as dvc.yaml wires them."""
    params = as_params(raw_params)
    manifest, classes = out / "manifest.csv", out / "classes.json"
    prepare.run(raw_dir=raw, manifest=manifest, classes_out=classes, params=params.data,
                quarantine=out / "quarantine.csv")
    feats = {s: out / f"{s}.h5" for s in SPLITS}
    extract.run(raw_dir=raw, manifest=manifest, classes_json=classes, outs=feats, params=params)
    train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=classes, head_out=out / "head.keras",
                   metrics_out=out / "head_metrics.json", history_out=out / "head_history.csv", params=params)
    finetune.run(raw_dir=raw, manifest=manifest, classes_json=classes, val_features=feats["val"],
                 head_path=out / "head.keras", model_out=out / "model.keras", history_out=out / "finetune_history.csv",
                 metrics_out=out / "finetune_metrics.json", params=params, checkpoint=out / "ckpt.h5")
    evaluate.run(raw_dir=raw, manifest=manifest,
                 classes_json=classes, test_features=feats["test"], head_path=out / "head.keras",
                 model_path=out / "model.keras", metrics_out=out / "metrics.json", per_class_out=out / "per_class.json",
                 plots_dir=out / "plots", mistakes_out=out / "mistakes.png", params=params)


def test_two_runs_give_identical_features_and_metrics(tmp_path):
    raw, _ = make_hostile_folder(tmp_path / "raw")
    raw_params = tiny_params(str(raw), **PARAMS)
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params, allow_unicode=True), encoding="utf-8")
    driver = ("import sys, yaml; from pathlib import Path; sys.path[:0] = ['tests']; "
              "from test_determinism import run_pipeline; "
              f"run_pipeline(Path({str(raw)!r}), Path({str(b)!r}), "
              f"yaml.safe_load(Path({str(tmp_path / 'params.yaml')!r}).read_text(encoding='utf-8')))")
    with open(tmp_path / "b.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        run_pipeline(raw, a, raw_params)
    finally:
        rc = proc.wait()
    assert rc == 0, (tmp_path / "b.log").read_text(errors="replace")[-4000:]

    # Every odd format prepare accepted went through every stage.
    manifest = (a / "manifest.csv").read_text(encoding="utf-8")
    for name in ("cmyk photo.jpg", "gray16.png", "palette transparent.png", "photo.webp", "anim.gif", "rotated.jpg",
                 "scan.tiff", "huge but allowed.jpg", "été n°00.png"):
        assert name in manifest, name

    same_bytes = ["manifest.csv", "classes.json", "quarantine.csv", "head_history.csv", "finetune_history.csv",
                  "metrics.json", "per_class.json", "mistakes.png"]
    same_bytes += [f"plots/{p.name}" for p in sorted((a / "plots").iterdir())]
    for name in same_bytes:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for split in SPLITS:
        fa, fb = read_features(a / f"{split}.h5"), read_features(b / f"{split}.h5")
        np.testing.assert_array_equal(fa.features, fb.features, err_msg=split)
        np.testing.assert_array_equal(fa.labels, fb.labels)
        assert fa.paths == fb.paths
    timings = {"head_metrics.json": ("fit_seconds",),
               "finetune_metrics.json": ("seconds", "seconds_by_part", "bottom_seconds")}
    for name, keys in timings.items():
        ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
        for key in keys:
            ma.pop(key), mb.pop(key)
        assert ma == mb, name
    for model in ("head.keras", "model.keras"):
        wa, wb = load_model(a / model)[0].get_weights(), load_model(b / model)[0].get_weights()
        for x, y in zip(wa, wb):
            np.testing.assert_array_equal(x, y, err_msg=model)
