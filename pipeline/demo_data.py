"""Stage 0: generate the synthetic demo image set (no one's photos ship with the project).

The ``demo`` stage of dvc.yaml writes it to ``data/demo``, the default ``data.raw_dir``, so
``dvc repro`` on a fresh clone runs offline with the default params.

Four classes of rings (Landolt C's, the eye-chart symbol), one sub-folder each: the ring's gap
is at the top (``gap_top``), at the bottom (``gap_bottom``), at the left or right
(``gap_side``), or there is none (``no_gap``). Every image has a random gradient background,
ring colour, size, thickness and position, gap width, a few distractor strokes and pixel
noise. The classes differ only in *where* a small detail sits relative to the ring, a cue
that global-average-pooled ImageNet features mostly pool away, so the frozen-feature head
is mediocre, while adapting the backbone's top stages learns it within a few epochs: the
demo shows what fine-tuning is for (docs/benchmarks/demo.md has the measurements). The classes survive
the default augmentation: left and right gaps are one class (horizontal flips), and the gap
directions are 90° apart (rotations are at most ±18°).

The output is byte-for-byte deterministic for given arguments (``--seed`` draws another set of
the same design), so DVC sees the same data on every machine. It is written only to its own
folder (marked by a hidden ``.demo-dataset`` file) and never over a folder of real images.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.io import PipelineError, atomic_dir, setup_logging, user_errors

log = logging.getLogger(__name__)

# The params this stage reads (none: its options are fixed in dvc.yaml's command), as in dvc.yaml.
PARAMS: tuple[str, ...] = ()

CLASSES = ("gap_top", "gap_bottom", "gap_side", "no_gap")
MARKER = ".demo-dataset"
# Direction of the gap from the ring's centre, in degrees clockwise from +x (image y points down).
_GAP_ANGLE = {"gap_top": -90.0, "gap_bottom": 90.0}


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random two-colour linear gradient."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _contrasting_colour(rng: np.random.Generator, bg: Image.Image, min_distance: float = 80) -> tuple[int, int, int]:
    """A colour at least ``min_distance`` (L1, 0-765) from the background's mean, after at most 50 draws."""
    mean = np.asarray(bg, dtype=np.float64).reshape(-1, 3).mean(0)
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - mean).sum() > min_distance:
            break
    return tuple(int(v) for v in c)


def render(label: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size``×``size`` RGB image of class ``label`` (one of :data:`CLASSES`), drawn from ``rng``."""
    if label not in CLASSES:
        raise ValueError(f"unknown demo class {label!r}; classes are {CLASSES}")
    img = _background(rng, size)
    colour = _contrasting_colour(rng, img)
    r = rng.uniform(0.18, 0.32) * size
    width = max(2, int(r * rng.uniform(0.22, 0.35)))
    cx, cy = rng.uniform(r + 4, size - r - 4, 2)
    ring = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ring)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
    if label != "no_gap":
        # Left and right are one class, so a horizontal flip never changes the label.
        if label == "gap_side":
            angle = 0.0 if rng.uniform() < 0.5 else 180.0
        else:
            angle = _GAP_ANGLE[label]
        angle += rng.uniform(-10, 10)
        half = rng.uniform(14, 22)  # half the gap's angular width, degrees
        draw.pieslice((cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2), angle - half, angle + half, fill=0)
    img.paste(Image.new("RGB", (size, size), colour), (0, 0), ring)
    # Distractor strokes over everything, so the ring is not the only structure in the image.
    strokes = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        strokes.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 3)))
    noise = rng.normal(0, rng.uniform(4, 20), (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def run(*, out: Path, per_class: int = 100, size: int = 160, seed: int = 0) -> Path:
    """Write ``out/<class>/<class>_NNN.jpg``; refuses to touch a folder it did not create.

    Image ``i`` of class ``c`` is drawn from ``default_rng([seed, c, i])``: the same arguments give
    the same bytes, another ``seed`` another set of the same design.
    """
    out = Path(out)
    if per_class < 1 or size < 32:
        raise PipelineError(f"--per-class must be >= 1 and --size >= 32 (got {per_class}, {size})")
    if out.exists() and not (out / MARKER).is_file():
        raise PipelineError(
            f"{out} exists and is not a generated demo folder (no {MARKER}); refusing to overwrite it. "
            "Pick another --out or remove the folder yourself."
        )
    with atomic_dir(out) as tmp:
        for ci, label in enumerate(CLASSES):
            (tmp / label).mkdir()
            for i in range(per_class):
                rng = np.random.default_rng([seed, ci, i])
                render(label, rng, size).save(tmp / label / f"{label}_{i:03d}.jpg", quality=90)
        (tmp / MARKER).write_text(f"per_class={per_class} size={size} seed={seed}\n")
    log.info("wrote %d demo images (%d classes, seed %d) to %s", per_class * len(CLASSES), len(CLASSES), seed, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=100, help="images per class (default 100)")
    ap.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    ap.add_argument("--seed", type=int, default=0, help="which set of the design to draw (default 0)")
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        run(out=args.out, per_class=args.per_class, size=args.size, seed=args.seed)


if __name__ == "__main__":
    main()
