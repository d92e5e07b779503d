"""Every registered backbone fine-tunes with the default params: ``finetune.unfreeze_from: auto``.

Each backbone runs through the real stages (prepare once; extract, train_head, finetune per
backbone) with random weights, at the smallest input its architecture accepts, on tiny images:
what ``dvc exp run -S backbone.name=X -S backbone.weights=none`` runs, minus the image count.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import pytest
from conftest import as_params, make_images, tiny_params

from pipeline import extract, finetune, prepare, train_head
from pipeline.backbones.build import (
    block_boundaries,
    boundary_shares,
    build_backbone,
    count_params,
    get_base,
)
from pipeline.backbones.registry import REGISTRY
from pipeline.core.manifest import SPLITS
from pipeline.core.params import FinetuneParams
from pipeline.finetuning.recipe import unfreeze_from

pytestmark = pytest.mark.slow  # every registered backbone through extract, train_head and finetune

# The share of a backbone's weights its default boundary unfreezes: "the last stage or two", neither
# the head alone nor the whole network (efficientnet_lite0's block6a_expand_conv: 0.77).
SHARE_RANGE = (0.25, 0.85)


@pytest.fixture(autouse=True)
def fresh_keras():
    """Twelve backbones in one process: free each one's graph state before the next."""
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("every_backbone")
    raw = make_images(root / "raw", classes=("circle", "stripes"), per_class=8, size=32)
    params = as_params(tiny_params(str(raw)))
    prepare.run(raw_dir=raw, manifest=root / "manifest.csv", classes_out=root / "classes.json", params=params.data)
    return raw, root


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backbone_finetunes_with_default_params(prepared, tmp_path, name):
    raw, root = prepared
    spec = REGISTRY[name]
    raw_params = tiny_params(str(raw), **{"backbone.name": name, "backbone.weights": "none",
                                          "backbone.image_size": spec.min_size, "extract.augmented_views": 0,
                                          "extract.engine": "tensorflow"})
    # Fine-tuning exactly as params.yaml has it, in one epoch.
    raw_params["finetune"] = {**tiny_params()["finetune"], "epochs": 1}
    raw_params["finetune"]["batch_size"] = FinetuneParams().batch_size
    params = as_params(raw_params)
    assert dataclasses.replace(params.finetune, epochs=FinetuneParams().epochs) == FinetuneParams()

    feats = {s: tmp_path / f"{s}.h5" for s in SPLITS}
    manifest, classes = root / "manifest.csv", root / "classes.json"
    extract.run(raw_dir=raw, manifest=manifest, classes_json=classes, outs=feats, params=params)
    train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=classes, head_out=tmp_path / "head.keras",
                   metrics_out=tmp_path / "hm.json", history_out=tmp_path / "hh.csv", params=params)
    metrics = finetune.run(raw_dir=raw, manifest=manifest, classes_json=classes, val_features=feats["val"],
                           head_path=tmp_path / "head.keras", model_out=tmp_path / "model.keras",
                           history_out=tmp_path / "ft.csv", metrics_out=tmp_path / "ft.json", params=params)
    assert metrics["unfreeze_from"] == spec.unfreeze_from
    assert len((tmp_path / "ft.csv").read_text().splitlines()) == 1 + 1 + 1  # header, head only, one epoch
    meta = json.loads((tmp_path / "model.json").read_text())  # the model's metadata, without loading it
    assert meta["unfreeze_from"] == spec.unfreeze_from and meta["finetune_params"]["unfreeze_from"] == "auto"

    # The default is a block boundary of this architecture, and what is above it is a sensible share.
    base = get_base(build_backbone(params.backbone))
    assert spec.unfreeze_from in block_boundaries(base, name)
    unfreeze_from(base, "auto", name)
    unfrozen = count_params(base.trainable_weights)
    assert unfrozen == metrics["unfrozen_params"]
    share = unfrozen / count_params(base.weights)
    assert share == pytest.approx(metrics["unfrozen_share"], abs=1e-3)
    assert share == pytest.approx(dict(boundary_shares(base, name))[spec.unfreeze_from])  # what the docs list
    assert SHARE_RANGE[0] <= share <= SHARE_RANGE[1], f"{name}: {spec.unfreeze_from} unfreezes {share:.0%}"
    start = [layer.name for layer in base.layers].index(spec.unfreeze_from)
    assert not any(layer.trainable_weights for layer in base.layers[:start])
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in base.layers)
