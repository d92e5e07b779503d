"""The demo image generator (pipeline/demo_data.py): deterministic per seed, never over real images."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import demo_data
from pipeline.core.io import PipelineError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_set_is_deterministic_per_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    a = _files(demo_data.run(out=tmp_path / "a", per_class=3, size=64, seed=0))
    again = _files(demo_data.run(out=tmp_path / "again", per_class=3, size=64, seed=0))
    other = _files(demo_data.run(out=tmp_path / "other", per_class=3, size=64, seed=1))
    images = [k for k in a if k.endswith(".jpg")]
    assert sorted({k.split("/")[0] for k in images}) == sorted(demo_data.CLASSES)
    assert len(images) == 3 * len(demo_data.CLASSES)
    assert a == again  # byte for byte, marker included
    assert set(other) == set(a)  # the same names...
    assert all(other[k] != a[k] for k in images)  # ...but every image drawn anew


def test_regenerates_its_own_folder_but_never_one_it_did_not_create(tmp_path: Path) -> None:
    out = demo_data.run(out=tmp_path / "demo", per_class=1, size=48, seed=0)
    (out / "gap_top" / "stale.jpg").write_bytes(b"left over")
    demo_data.run(out=out, per_class=2, size=48, seed=0)  # its own marker: replaced whole
    assert not (out / "gap_top" / "stale.jpg").exists() and len(list((out / "gap_top").iterdir())) == 2

    mine = tmp_path / "my photos"
    (mine / "cats").mkdir(parents=True)
    (mine / "cats" / "tom.jpg").write_bytes(b"precious")
    with pytest.raises(PipelineError, match=r"my photos exists and is not a generated demo folder"):
        demo_data.run(out=mine, per_class=1, size=48)
    assert _files(mine) == {"cats/tom.jpg": b"precious"}


def test_unknown_class_is_named() -> None:
    import numpy as np

    with pytest.raises(ValueError, match=r"unknown demo class 'circle'; classes are \('gap_top'"):
        demo_data.render("circle", np.random.default_rng(0), 48)
