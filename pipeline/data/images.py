"""The one image decoder every stage uses (prepare's check, extract, finetune, evaluate, predict).

Decoding goes through Pillow rather than ``tf.io.decode_image`` so that EXIF orientation,
palette/alpha, CMYK and 16-bit images are all converted the same way, everywhere: prepare
accepts a file only if :func:`load_image` decodes it, so nothing prepare accepted can fail
to decode in a later stage.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.io import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Resampling filter for the resize to the backbone's input size. Pillow's bilinear filter
# antialiases when it downsamples (its support grows with the scale factor), unlike a
# plain tf.image.resize, so large photos do not alias.
RESAMPLE = Image.Resampling.BILINEAR

# Pillow's own decompression-bomb guard (a warning above 89 Mpx, an error above 179 Mpx) is
# replaced by the explicit ``max_pixels`` of load_image, checked from the header before any
# decode: prepare enforces ``data.max_image_pixels`` on every file, later stages only read files
# prepare accepted, and predict, which meets untrusted files, enforces the limit the model was
# trained under (``--max-pixels``). With Pillow's guard left on, an image prepare accepted under
# a raised limit would crash extract.
Image.MAX_IMAGE_PIXELS = None

# 16-bit samples → 8-bit: 65535 / 257 = 255 exactly, so black and white stay black and white
# whatever the content (scaling by the image's own maximum would make the result depend on it).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(PipelineError):
    """A file that cannot be used as an image; ``reason`` says why, without the path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path!r}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str) -> bool:
    """True when the file name has an image extension and is not hidden."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; transparency is composited over white, 16-bit scaled to 8-bit."""
    if img.mode == "F":
        # Floating-point TIFFs have no agreed [0, 1] / [0, 255] / HDR range: refuse to guess.
        raise ValueError("32-bit floating-point image: no standard mapping to 8-bit RGB; save it as 8- or 16-bit")
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette/colour-key transparency becomes an alpha channel
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _sniff(path: str) -> Optional[str]:
    """A readable reason for common non-images saved under an image name, else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if not head:
        return "empty file (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the image: run `git lfs pull` in the dataset's repository"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<svg")):
        return "an HTML/XML/SVG text file saved under an image name (a failed download?)"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "a text file saved under an image name"
    return None


def _open_error(path: str, exc: OSError) -> str:
    """Reason for a file that cannot even be opened (links, permissions)."""
    if exc.errno == errno.ELOOP:
        return "symlink loop: the link points (through other links) back to itself"
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return f"broken symlink to {os.readlink(path)!r}"
    if isinstance(exc, PermissionError):
        return "permission denied: make the file readable"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    return f"cannot open: {exc.strerror or exc}"


def load_image(path: str, size: int, max_pixels: Optional[int] = None,
               limit_name: str = "data.max_image_pixels") -> np.ndarray:
    """Decode ``path`` and resize it to a square ``(size, size, 3)`` uint8 RGB array.

    The image is squashed to the square (no crop), as Keras' ``image_dataset_from_directory``
    does, so nothing at the borders of a photo is lost. EXIF orientation is applied; GIF,
    WebP, TIFF and APNG use their first frame; alpha and colour-key transparency are
    composited over white; grayscale, palette, CMYK and 16-bit images become 8-bit RGB.
    ``max_pixels``: refuse an image whose header declares more pixels (checked before any
    pixel is decoded, so a decompression bomb costs nothing); None = no limit. ``limit_name``: the
    setting the refusal tells the user to raise.
    Raises :class:`ImageDecodeError` (a ``ValueError``) naming the file and the reason.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            # open() on a named pipe blocks until something writes to it: never open one.
            raise ImageDecodeError(path, "not a regular file (a folder, pipe, socket or device)")
        fh = open(path, "rb")
    except OSError as exc:
        raise ImageDecodeError(path, _open_error(path, exc)) from exc
    try:
        with fh, Image.open(fh) as img:
            w, h = img.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageDecodeError(
                    path, f"{w}x{h} = {w * h:,} pixels is above {limit_name} = {max_pixels:,} (a decompression "
                          f"bomb guard); downscale the image or raise {limit_name}")
            img.seek(0)
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays
            # >= size on both sides. A 12-megapixel photo then decodes ~10x faster, and the
            # final bilinear resize still does the rest. A no-op for other formats.
            img.draft("RGB", (size, size))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels, skip the rotation (same everywhere)
                pass
            img = _flatten_to_rgb(img)
            if img.size != (size, size):
                img = img.resize((size, size), RESAMPLE)
            return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise  # the machine, not the file: never quarantine a good image for it
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error...)
        reason = _sniff(path) or f"{type(exc).__name__}: {exc}"
        raise ImageDecodeError(path, reason) from exc


def load_batch(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode several images → ``(N, size, size, 3)`` uint8."""
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)
