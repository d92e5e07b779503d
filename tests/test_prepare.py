import csv
import json

import pytest
from conftest import as_params, make_images, tiny_params

from pipeline.data.scanning import DatasetError
from pipeline.prepare import assign_split, run


def _manifest(path):
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _run(raw, out, **overrides):
    params = as_params(tiny_params(str(raw), **overrides))
    return run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)


def test_split_is_deterministic_and_covers_every_image(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=20)
    _run(raw, tmp_path / "a")
    _run(raw, tmp_path / "b")
    a, b = (tmp_path / "a" / "manifest.csv").read_bytes(), (tmp_path / "b" / "manifest.csv").read_bytes()
    assert a == b
    rows = _manifest(tmp_path / "a" / "manifest.csv")
    assert len(rows) == 60
    assert {r["split"] for r in rows.values()} == {"train", "val", "test"}
    classes = json.loads((tmp_path / "a" / "classes.json").read_text())
    assert classes["classes"] == ["circle", "square", "stripes"]
    assert sum(sum(c.values()) for c in classes["counts"].values()) == 60


def test_adding_images_never_moves_an_existing_image(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=20)
    _run(raw, tmp_path / "before")
    make_images(tmp_path / "raw", per_class=40, seed=0)  # same first 20 names + 20 new per class
    _run(raw, tmp_path / "after")
    before = _manifest(tmp_path / "before" / "manifest.csv")
    after = _manifest(tmp_path / "after" / "manifest.csv")
    assert len(after) == 120
    assert all(after[p]["split"] == r["split"] for p, r in before.items())


def test_split_fractions_are_roughly_respected():
    splits = [assign_split(7, f"img_{i}.jpg", 0.2, 0.1) for i in range(5000)]
    assert abs(splits.count("val") / 5000 - 0.2) < 0.03
    assert abs(splits.count("test") / 5000 - 0.1) < 0.03


def test_changing_the_seed_reshuffles():
    a = [assign_split(1, f"{i}.jpg", 0.3, 0.3) for i in range(200)]
    b = [assign_split(2, f"{i}.jpg", 0.3, 0.3) for i in range(200)]
    assert a != b


def test_existing_train_val_layout_is_kept(tmp_path):
    raw = tmp_path / "raw"
    make_images(raw / "train", per_class=12)
    make_images(raw / "val", per_class=3, seed=1)
    _run(raw, tmp_path / "out")
    rows = _manifest(tmp_path / "out" / "manifest.csv")
    assert all(r["split"] == "val" for p, r in rows.items() if p.startswith("val/"))
    assert {r["split"] for p, r in rows.items() if p.startswith("train/")} == {"train", "test"}
    assert rows["val/circle/circle_000.png"]["label"] == "circle"


def test_one_class_is_a_clear_error(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle",), per_class=10)
    with pytest.raises(DatasetError, match="at least 2"):
        _run(raw, tmp_path / "out")


def test_missing_raw_dir_names_it(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        _run(tmp_path / "nope", tmp_path / "out")


def test_class_without_val_images_says_how_to_fix(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=1)
    with pytest.raises(DatasetError, match="add images"):
        _run(raw, tmp_path / "out")


def test_non_images_and_hidden_files_are_ignored(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    (raw / "circle" / "notes.txt").write_text("x")
    (raw / "circle" / ".hidden.png").write_bytes(b"")
    (raw / ".git").mkdir()
    _run(raw, tmp_path / "out")
    rows = _manifest(tmp_path / "out" / "manifest.csv")
    assert len(rows) == 36 and not any("notes" in p or ".hidden" in p for p in rows)
