"""Prepare on hostile inputs: broken, odd and misplaced files and odd folders, each in the manifest or in the
quarantine report with its reason; too many rejections, empty or undecodable classes fail naming the fix.

Every hostile file is made by the tests (Pillow or raw bytes): see conftest.make_hostile_folder. How the
decoder treats each kind of file alone is test_data_images.py's.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import as_params, make_hostile_folder, make_images, render, tiny_params

from pipeline import prepare
from pipeline.data.images import ImageDecodeError, load_image


def _prepare(raw: Path, out: Path, workers=None, **overrides):
    params = as_params(tiny_params(str(raw), **overrides))
    return prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data,
                       quarantine=out / "quarantine.csv", workers=workers)


def _report(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: (r["kind"], r["reason"]) for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile folder, prepared once (rejections allowed up to 50 %)."""
    tmp = tmp_path_factory.mktemp("hostile")
    raw, expected = make_hostile_folder(tmp / "raw")
    items = _prepare(raw, tmp / "out", **{"data.max_rejected_fraction": 0.5})
    return raw, expected, items, tmp / "out"


def test_every_file_is_in_the_manifest_or_the_report_with_the_right_reason(hostile):
    raw, expected, items, out = hostile
    report = _report(out / "quarantine.csv")
    outcome = {**{p: kind_reason for p, kind_reason in report.items()}, **{it.path: ("accepted", "") for it in items}}
    assert set(outcome) == set(expected), f"unexpected: {set(outcome) ^ set(expected)}"
    wrong = {p: (exp, outcome[p]) for p, exp in expected.items()
             if outcome[p][0] != exp[0] or exp[1] not in outcome[p][1]}
    assert wrong == {}, wrong
    # The unicode class name with a space survives CSV and JSON.
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))["classes"]
    assert classes == ["chat noir é", "circle", "square"]
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert 'circle/a, "quoted" name.png' in paths and "chat noir é/été n°00.png" in paths


def test_the_check_agrees_with_the_decoder_at_every_size(hostile):
    """Nothing prepare accepted can fail in a later stage; nothing it rejected decodes."""
    raw, expected, items, out = hostile
    for it in items:
        for size in (32, 64, 224, 331):
            arr = load_image(str(raw / it.path), size)
            assert arr.shape == (size, size, 3) and arr.dtype == np.uint8, it.path
    for rel, (kind, _) in expected.items():
        if kind != "rejected" or "\\x" in rel or "pipe" in rel:
            continue
        with pytest.raises(ImageDecodeError):
            load_image(str(raw / rel), 64)


def test_parallel_check_equals_a_serial_one(hostile, tmp_path):
    raw, _, _, out = hostile
    _prepare(raw, tmp_path, workers=1, **{"data.max_rejected_fraction": 0.5})
    for name in ("manifest.csv", "classes.json", "quarantine.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_decompression_bomb_limit_is_configurable(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    big = render("circle", np.random.default_rng(0), 300)
    big.save(raw / "circle" / "big.png")  # 90,000 pixels
    _prepare(raw, tmp_path / "a", **{"data.max_image_pixels": 50_000, "data.max_rejected_fraction": 0.1})
    report = _report(tmp_path / "a" / "quarantine.csv")
    assert report["circle/big.png"][0] == "rejected"
    assert "300x300 = 90,000 pixels is above data.max_image_pixels = 50,000" in report["circle/big.png"][1]
    items = _prepare(raw, tmp_path / "b", **{"data.max_image_pixels": 90_000})
    assert "circle/big.png" in {it.path for it in items}
    # The bomb is refused from its header: no 10-gigapixel buffer is ever allocated.
    from conftest import _png_header_only

    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(str(tmp_path / "bomb.png"), 64, max_pixels=100_000_000)


def test_too_many_rejected_files_fail_with_the_count_the_report_and_the_fix(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    for i in range(3):
        (raw / "circle" / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    with pytest.raises(prepare.DatasetError) as exc:
        _prepare(raw, out, **{"data.max_rejected_fraction": 0.05})
    msg = str(exc.value)
    assert "3 of 39 image files (7.7%)" in msg
    assert "data.max_rejected_fraction = 0.05" in msg and "raise data.max_rejected_fraction" in msg
    assert str(out / "quarantine.csv") in msg and "circle/broken_0.jpg" in msg
    # The report is there to read; the manifest of a failed run is not written.
    assert set(_report(out / "quarantine.csv")) == {f"circle/broken_{i}.jpg" for i in range(3)}
    assert not (out / "manifest.csv").exists()
    # Within the limit, the good images proceed.
    items = _prepare(raw, out, **{"data.max_rejected_fraction": 0.1})
    assert len(items) == 36


def test_empty_class_folder_fails_naming_the_class_and_the_param(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    (raw / "empty class").mkdir()
    with pytest.raises(prepare.DatasetError) as exc:
        _prepare(raw, tmp_path / "out")
    msg = str(exc.value)
    assert "'empty class': 0 usable" in msg and "data.min_images_per_class = 5" in msg
    assert "remove a folder that is not a class" in msg


def test_class_whose_images_are_rejected_says_how_many(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    bad = raw / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_text("<html>oops</html>")
    with pytest.raises(prepare.DatasetError, match=r"'bad': 0 usable \(3 rejected\)"):
        _prepare(raw, tmp_path / "out", **{"data.max_rejected_fraction": 0.5})


def test_one_class_with_junk_around_it_is_a_clear_error(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle",), per_class=12)
    (raw / ".DS_Store").write_bytes(b"\x00")
    (raw / "notes.txt").write_text("x")
    with pytest.raises(prepare.DatasetError, match=r"1 class folder\(s\) \['circle'\]; a classifier needs at least 2"):
        _prepare(raw, tmp_path / "out")


def test_non_utf8_class_folder_is_a_clear_error(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    os.rename(raw / "square", raw / os.fsdecode(b"sq\xe9are"))
    with pytest.raises(prepare.DatasetError, match="not valid UTF-8; rename it"):
        _prepare(raw, tmp_path / "out")


def test_hostile_files_never_move_an_existing_image_to_another_split(tmp_path):
    clean = make_images(tmp_path / "clean", classes=("circle", "square"), per_class=12)
    before = {it.path: it.split for it in _prepare(clean, tmp_path / "a")}
    raw, _ = make_hostile_folder(tmp_path / "hostile")
    after = {it.path: it.split for it in _prepare(raw, tmp_path / "b", **{"data.max_rejected_fraction": 0.5})}
    assert before and all(after[p] == s for p, s in before.items())


def test_presplit_layout_quarantines_too(tmp_path):
    raw = tmp_path / "raw"
    make_images(raw / "train", per_class=12)
    make_images(raw / "val", per_class=4, seed=1)
    (raw / "val" / "circle" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (raw / "notes").mkdir()
    items = _prepare(raw, tmp_path / "out", **{"data.max_rejected_fraction": 0.1})
    report = _report(tmp_path / "out" / "quarantine.csv")
    assert report["val/circle/cut.png"][0] == "rejected"
    assert report["notes"] == ("ignored", "not a split folder (train, val, test) beside train/ and val/")
    assert {it.split for it in items if it.path.startswith("val/")} == {"val"}


def test_prepare_main_writes_the_report_it_is_given(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    (raw / "circle" / "x.txt").write_text("x")
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump(tiny_params(str(raw))))
    prepare.main(["--raw-dir", str(raw), "--manifest", str(tmp_path / "m.csv"), "--classes",
                  str(tmp_path / "c.json"), "--quarantine", str(tmp_path / "q.csv"), "--params", str(params)])
    assert _report(tmp_path / "q.csv")["circle/x.txt"][0] == "ignored"
