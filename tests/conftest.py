"""Shared fixtures: tiny generated image folders, params builders, the ../shared datasets."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.demo_data import render
from pipeline.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def make_images(root: Path, classes=("circle", "square", "stripes"), per_class: int = 10, size: int = 48,
                seed: int = 0) -> Path:
    """Write ``root/<class>/<i>.png`` synthetic images; returns ``root``."""
    for ci, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(label, np.random.default_rng([seed, ci, i]), size).save(root / label / f"{label}_{i:03d}.png")
    return root


def tiny_params(raw_dir: str = "data/raw", **overrides) -> dict:
    """A params mapping for fast tests: efficientnet_lite0 with real weights at 64 px."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["data"]["raw_dir"] = raw_dir
    raw["data"]["val_fraction"] = 0.25
    raw["data"]["test_fraction"] = 0.25
    raw["backbone"]["image_size"] = 64
    raw["extract"]["batch_size"] = 8
    raw["finetune"]["epochs"] = 1
    raw["finetune"]["batch_size"] = 8
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return raw


def as_params(raw: dict) -> Params:
    return parse_params(raw)


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/datasets/{name} not found: this real-data test needs the shared datasets beside the project")
    return path


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "raw")
