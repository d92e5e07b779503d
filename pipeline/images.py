"""The one image decoder every stage uses (prepare's check, extract, finetune, evaluate).

Decoding goes through Pillow rather than ``tf.io.decode_image`` so that EXIF orientation,
palette/alpha, CMYK and 16-bit images are all converted the same way, everywhere.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Resampling filter for the resize to the backbone's input size. Pillow's bilinear filter
# antialiases when it downsamples (its support grows with the scale factor), unlike a
# plain tf.image.resize, so large photos do not alias.
RESAMPLE = Image.Resampling.BILINEAR


def is_image_file(path: str) -> bool:
    """True when the file name has an image extension and is not hidden."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB; transparency is composited over white, 16-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: str, size: int) -> np.ndarray:
    """Decode ``path`` and resize it to a square ``(size, size, 3)`` uint8 RGB array.

    The image is squashed to the square (no crop), as Keras' ``image_dataset_from_directory``
    does, so nothing at the borders of a photo is lost. EXIF orientation is applied and GIFs
    use their first frame. Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img.seek(0)
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays
            # >= size on both sides. A 12-megapixel photo then decodes ~10x faster, and the
            # final bilinear resize still does the rest. A no-op for other formats.
            img.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(img)
            img = _flatten_to_rgb(img)
            if img.size != (size, size):
                img = img.resize((size, size), RESAMPLE)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path!r}: {exc}") from exc


def load_batch(paths: Sequence[str], size: int) -> np.ndarray:
    """Decode several images → ``(N, size, size, 3)`` uint8."""
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)
