"""Stage 0: generate the synthetic demo image set (no one's photos ship with the project).

The ``demo`` stage of dvc.yaml writes it to ``data/demo``, the default ``data.raw_dir``, so
``dvc repro`` on a fresh clone runs offline with the default params.

Four classes, one sub-folder each: circle, square, triangle (filled shapes) and stripes (a
striped patch), with random colours, sizes, positions, rotations, gradient backgrounds and
pixel noise. The output is byte-for-byte deterministic for given arguments, so DVC sees the
same data on every machine. It is written only to its own folder (marked by a hidden
``.demo-dataset`` file) and never over a folder of real images.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.io_utils import PipelineError, atomic_dir, setup_logging, user_errors

log = logging.getLogger(__name__)

# The params this stage reads (none: its options are fixed in dvc.yaml's command), as in dvc.yaml.
PARAMS: tuple[str, ...] = ()

CLASSES = ("circle", "square", "triangle", "stripes")
MARKER = ".demo-dataset"


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random two-colour linear gradient."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    return Image.fromarray(img.astype(np.uint8), "RGB")


def _contrasting_colour(rng: np.random.Generator, bg: Image.Image) -> tuple[int, int, int]:
    # Low-contrast shapes happen on purpose: the demo should not be trivially separable.
    mean = np.asarray(bg, dtype=np.float64).reshape(-1, 3).mean(0)
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - mean).sum() > 60:
            break
    return tuple(int(v) for v in c)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    angles = [rot + 2 * math.pi * k / n for k in range(n)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def render(label: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size``×``size`` RGB image of class ``label``."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    colour = _contrasting_colour(rng, img)
    r = rng.uniform(0.1, 0.35) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    if label == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif label == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot), fill=colour)
    elif label == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=colour)
    elif label == "stripes":
        # Parallel stripes clipped to a square patch: a texture rather than a silhouette.
        patch = Image.new("L", (size, size), 0)
        pd = ImageDraw.Draw(patch)
        period = rng.uniform(0.06, 0.12) * size
        for k in range(-size, 2 * size, max(2, int(period))):
            pd.line([(k, -size), (k + size, 2 * size)], fill=255, width=max(1, int(period / 2)))
        patch = patch.rotate(math.degrees(rot), resample=Image.Resampling.NEAREST)
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
        patch = Image.fromarray(np.minimum(np.asarray(patch), np.asarray(mask)))
        img.paste(Image.new("RGB", (size, size), colour), (0, 0), patch)
    else:
        raise ValueError(f"unknown demo class {label!r}; classes are {CLASSES}")
    # Distractor strokes over everything, so the class is not the only structure in the image.
    for _ in range(int(rng.integers(0, 4))):
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    noise = rng.normal(0, rng.uniform(4, 28), (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def run(*, out: Path, per_class: int = 100, size: int = 160, seed: int = 0) -> Path:
    """Write ``out/<class>/<class>_NNN.jpg``; refuses to touch a folder it did not create."""
    out = Path(out)
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
    log.info("wrote %d demo images (%d classes) to %s", per_class * len(CLASSES), len(CLASSES), out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        run(out=args.out, per_class=args.per_class, size=args.size, seed=args.seed)


if __name__ == "__main__":
    main()
