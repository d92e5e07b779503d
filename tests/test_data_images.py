"""The one image decoder (pipeline/data/images.py): every format and mode to the same RGB pixels, transparency on
white, EXIF orientation applied, 16-bit scaled by a constant, and a file that must not be opened refused.

The hostile files here are made by the tests (Pillow or raw bytes); prepare's report on a whole folder of them is
test_prepare_hostile.py's.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import render
from PIL import Image

from pipeline.data.images import ImageDecodeError, load_image


def test_a_fifo_named_like_an_image_never_blocks_the_decoder(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        load_image(str(tmp_path / "pipe.png"), 32)


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
