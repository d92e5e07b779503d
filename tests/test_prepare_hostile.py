"""Hostile inputs: broken, odd and misplaced files, odd folders and bad params.

Every hostile file is made by the tests (Pillow or raw bytes): see conftest.make_hostile_folder.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import as_params, make_hostile_folder, make_images, render, tiny_params
from PIL import Image

from pipeline import prepare
from pipeline.core.params import ParamsError, parse_params
from pipeline.data.images import ImageDecodeError, load_image
from pipeline.extraction.features import FeatureSet


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


def test_a_fifo_named_like_an_image_never_blocks_the_decoder(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(str(tmp_path / "pipe.png"), 32)


def test_parallel_check_equals_a_serial_one(hostile, tmp_path):
    raw, _, _, out = hostile
    _prepare(raw, tmp_path, workers=1, **{"data.max_rejected_fraction": 0.5})
    for name in ("manifest.csv", "classes.json", "quarantine.csv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def _save(img: Image.Image, path: Path, **kw) -> str:
    img.save(path, **kw)
    return str(path)


def test_lossless_formats_and_modes_decode_identically(tmp_path):
    """Same pixels in PNG, BMP, TIFF, lossless WebP, RGBA (opaque), RGB 16-bit → same array."""
    img = render("circle", np.random.default_rng(3), 80).convert("RGB")
    ref = load_image(_save(img, tmp_path / "ref.png"), 64)
    variants = {
        "bmp": _save(img, tmp_path / "a.bmp"),
        "tiff": _save(img, tmp_path / "a.tiff"),
        "webp": _save(img, tmp_path / "a.webp", lossless=True, quality=100),
        "rgba_opaque": _save(img.convert("RGBA"), tmp_path / "rgba.png"),
        "gif_first_frame": None,
    }
    frames = [img.quantize(256, dither=Image.Dither.NONE), Image.new("P", img.size, 5)]
    variants["gif_first_frame"] = _save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:],
                                        duration=100)
    gif_ref = load_image(_save(frames[0].convert("RGB"), tmp_path / "q.png"), 64)
    for name, path in variants.items():
        want = gif_ref if name == "gif_first_frame" else ref
        np.testing.assert_array_equal(load_image(path, 64), want, err_msg=name)
    # Grayscale in 8-bit, 16-bit and 1-bit: R = G = B, and 16-bit maps 65535 → 255 exactly.
    gray = img.convert("L")
    g8 = load_image(_save(gray, tmp_path / "g8.png"), 64)
    g16 = load_image(_save(Image.fromarray(np.asarray(gray, np.uint16) * 257), tmp_path / "g16.png"), 64)
    np.testing.assert_array_equal(g8, g16)
    assert (g8[..., 0] == g8[..., 1]).all() and (g8[..., 1] == g8[..., 2]).all()


def test_sixteen_bit_scaling_does_not_depend_on_the_content(tmp_path):
    """A dark 16-bit image stays dark: 16-bit → 8-bit is value / 257, not value / the image's maximum."""
    dark = np.full((20, 20), 200, np.uint16)  # 200 / 65535: nearly black
    out = load_image(_save(Image.fromarray(dark), tmp_path / "dark16.png"), 20)
    assert out.max() <= 1
    ramp = np.array([[0, 257 * 100, 65535]], np.uint16).repeat(3, axis=0)
    out = load_image(_save(Image.fromarray(ramp), tmp_path / "ramp16.png"), 3)
    # 3 → 3 px: no resize, so exact values.
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_is_composited_on_white_in_every_form(tmp_path):
    red = (200, 10, 10)
    rgba = Image.new("RGBA", (10, 10), red + (255,))
    rgba.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half fully transparent black
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, *red] + [0] * 762)
    pal.paste(0, (0, 0, 5, 10))
    key = Image.new("RGB", (10, 10), red)
    key.paste((1, 2, 3), (0, 0, 5, 10))
    for name, path in {"rgba": _save(rgba, tmp_path / "rgba.png"),
                       "palette+tRNS": _save(pal, tmp_path / "pal.png", transparency=0),
                       "rgb colour key": _save(key, tmp_path / "key.png", transparency=(1, 2, 3)),
                       "gif transparent index": _save(pal, tmp_path / "t.gif", transparency=0)}.items():
        out = load_image(path, 10)
        assert out[:, :5].tolist() == [[[255, 255, 255]] * 5] * 10, name
        assert out[:, 5:].tolist() == [[list(red)] * 5] * 10, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 30))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise: red on top, blue at the bottom
    path = _save(img, tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    out = load_image(path, 32).astype(int)
    top, bottom = out[:12].mean(axis=(0, 1)), out[-12:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom
    # Corrupt EXIF never rejects the pixels.
    path = _save(img, tmp_path / "badexif.jpg", exif=b"Exif\x00\x00" + b"\xff" * 40)
    assert load_image(path, 32).shape == (32, 32, 3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    out = load_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=95), 16).astype(int)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r < 20 and g > 235 and b > 235


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


# --- params ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, needle", [
    ({"data": {"max_rejected_fraction": 1.5}}, "data.max_rejected_fraction: 1.5 is out of range; allowed [0.0, 1.0]"),
    ({"data": {"min_images_per_class": 0}}, "data.min_images_per_class: 0 is out of range"),
    ({"data": {"max_image_pixels": "1e8"}}, "data.max_image_pixels: '1e8' is not an integer"),
    ({"data": {"max_rejected_fraktion": 0.1}}, "unknown key data.max_rejected_fraktion"),
    ({"head": {"class_weight": "auto"}}, "head.class_weight: 'auto' is not allowed; use one of 'none', 'balanced'"),
    ({"finetune": {"class_weight": True}}, "finetune.class_weight: True is not allowed"),
    ({"finetune": {"resume": "yes"}}, "finetune.resume: 'yes' is not true or false"),
    ({"backbone": {"name": "resnet18"}}, "backbone.name: 'resnet18' is not allowed; use one of: efficientnet_lite0"),
])
def test_bad_new_params_name_the_key_the_value_and_what_is_allowed(raw, needle):
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert needle in str(exc.value)


def test_new_params_defaults():
    p = parse_params({})
    assert (p.data.max_rejected_fraction, p.data.min_images_per_class, p.data.max_image_pixels) == \
        (0.05, 5, 100_000_000)
    assert (p.head.class_weight, p.finetune.class_weight, p.finetune.resume) == ("none", "none", True)


# --- very unequal class sizes: class weights ---------------------------------------------------------

def test_balanced_class_weights_follow_sklearns_formula():
    from sklearn.utils.class_weight import compute_class_weight

    from pipeline.models.training import class_weights

    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    got = class_weights(y, 3, "balanced")
    np.testing.assert_allclose([got[i] for i in range(3)], compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert got[2] == pytest.approx(45 / (3 * 5))
    assert class_weights(y, 3, "none") is None
    with pytest.raises(ValueError, match=r"class indices \[3\] have no training image"):
        class_weights(y, 4, "balanced")


@pytest.mark.parametrize("head_type", ["logreg", "dense"])
def test_balanced_head_recovers_the_minority_class(head_type, tmp_path):
    import h5py

    from pipeline.extraction.features import create_feature_file, open_features
    from pipeline.train_head import fit_dense, fit_logreg

    rng = np.random.default_rng(0)
    n_major, n_minor, dim = 400, 20, 8
    x = np.concatenate([rng.normal(0, 1, (n_major, dim)), rng.normal(0.8, 1, (n_minor, dim))]).astype(np.float32)
    y = np.array([0] * n_major + [1] * n_minor)
    fs = FeatureSet(x, y, [f"{i}" for i in range(len(y))], {})
    with h5py.File(tmp_path / "f.h5", "w") as h5:  # the dense head streams from a feature file
        create_feature_file(h5, dim, y, fs.paths, {"complete": True}, 64)[...] = x
    recall = {}
    for cw in ("none", "balanced"):
        params = as_params(tiny_params(**{"head.type": head_type, "head.class_weight": cw, "head.logreg.C": 1.0,
                                          "head.dense.epochs": 10, "head.dense.dropout": 0.0,
                                          "head.dense.batch_size": 128, "head.dense.learning_rate": 0.01}))
        if head_type == "logreg":
            head, _ = fit_logreg(fs, fs, 2, params)
        else:
            with open_features(tmp_path / "f.h5") as ff:
                head, _ = fit_dense(ff, ff, 2, params)
        pred = head.predict(x, verbose=0).argmax(1)
        recall[cw] = float((pred[y == 1] == 1).mean())
    assert recall["balanced"] > recall["none"] + 0.2, recall
