"""Shared fixtures: tiny generated image folders, params builders, the ../shared datasets."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from pipeline.core.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"

# Tiny fixture images: one filled shape (or striped patch) per class with random colours, sizes,
# positions, gradient backgrounds, strokes and noise; quick to tell apart at 48 px, which is
# all the unit tests need (the demo set, pipeline/demo_data.py, is designed for another job).
SHAPES = ("circle", "square", "triangle", "stripes")


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
    # Low-contrast shapes happen on purpose: the classes should not be trivially separable.
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
    """One ``size``×``size`` RGB image of the shape ``label`` (one of :data:`SHAPES`)."""
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
        raise ValueError(f"unknown fixture shape {label!r}; shapes are {SHAPES}")
    # Distractor strokes over everything, so the class is not the only structure in the image.
    for _ in range(int(rng.integers(0, 4))):
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    noise = rng.normal(0, rng.uniform(4, 28), (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


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
    raw["extract"]["augmented_views"] = 1  # the views path runs everywhere, at the cost of one view
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


def pipeline_until_head(tmp_path: Path, per_class: int = 12, **overrides) -> tuple[Path, Path, dict, Params]:
    """Tiny images (``per_class`` per class) through the real prepare → extract → train_head, with
    :func:`tiny_params` and ``overrides`` (dotted keys), into ``tmp_path / "out"``.

    Returns (raw image folder, out folder, split → feature file, Params).
    """
    from pipeline import extract, prepare, train_head
    from pipeline.core.manifest import SPLITS

    raw = make_images(tmp_path / "raw", per_class=per_class)
    params = as_params(tiny_params(str(raw), **overrides))
    out = tmp_path / "out"
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    feats = {s: out / f"{s}.h5" for s in SPLITS}
    extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=feats,
                params=params)
    train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=out / "classes.json",
                   head_out=out / "head.keras", metrics_out=out / "m.json", history_out=out / "h.csv", params=params)
    return raw, out, feats, params


# --- Fine-tuning's activations without a backbone: a stand-in frozen bottom on tiny images ---

ACTIVATION_SHAPE = (2, 2, 3)


class StandInBottom:
    """A frozen bottom for fine-tuning tests: uint8 ``(B, S, S, 3)`` → ``(B, 2, 2, 3)`` float32 block means, a
    pure function of each image, built on demand like the real engine; counts builds and images seen."""

    def __init__(self) -> None:
        self.builds = 0
        self.images = 0

    @staticmethod
    def compute(batch: np.ndarray) -> np.ndarray:
        b, s = batch.shape[0], batch.shape[1]
        return batch.astype(np.float32).reshape(b, 2, s // 2, 2, s // 2, 3).mean((2, 4)) / 255.0 - 0.5

    def make_infer(self):
        self.builds += 1

        def infer(batch: np.ndarray) -> np.ndarray:
            self.images += len(batch)
            return self.compute(batch)

        return infer


def stand_in_activations(cache_root: Path, bottom: StandInBottom, size: int = 16, batch_size: int = 4,
                         seed: int = 0, augment=None):
    """:class:`pipeline.finetuning.activations.Activations` over ``bottom``, cached under ``cache_root``."""
    from pipeline.core.params import AugmentParams
    from pipeline.finetuning.activations import ActivationCache, Activations

    cache = ActivationCache(cache_root, "key", {"bottom": "stand-in"}, ACTIVATION_SHAPE)
    return Activations(cache, bottom.make_infer, augment or AugmentParams(), seed, size, batch_size)


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/datasets/{name} not found: this real-data test needs the shared datasets "
                    "beside the project")
    return path


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "raw")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """A test that uses the tiny DVC project (directly or through another fixture) waits for a whole ``dvc repro``:
    it is slow, whether its file says so or not."""
    for item in items:
        if "tiny_dvc_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# --- A tiny DVC project that has run the whole pipeline (predict, export, plots, CI remote tests) ---

def run_dvc(cwd: Path, *args: str, check: bool = True) -> str:
    """``python -m dvc ARGS`` in ``cwd`` with this venv on PATH (stage commands run ``python``); stdout+stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed in {cwd}:\n{out[-4000:]}"
    return out


def run_git(cwd: Path, *args: str) -> str:
    import subprocess

    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)} failed in {cwd}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class TinyRun:
    path: Path
    first_repro: str  # what the project's first `dvc repro` printed


def new_tiny_project(proj: Path, remote: Optional[Path] = None) -> Path:
    """This project's dvc.yaml + pipeline/ on 3 × 12 tiny images with tiny params, in a fresh git + DVC
    repo whose images are DVC-tracked (``data/raw.dvc``), committed; nothing has run yet."""
    import shutil

    proj.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    make_images(proj / "data" / "raw", per_class=12)
    shutil.copy(ROOT / "data" / "exclude.txt", proj / "data" / "exclude.txt")
    shutil.copytree(ROOT / "data" / "test", proj / "data" / "test")  # the default data.test_dir: a README only
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params("data/raw")))
    # The project's ignore files: its generated outputs and local caches stay out of git and DVC.
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    run_git(proj, "init", "-q", "-b", "main")
    run_dvc(proj, "init", "-q")
    shutil.copy(ROOT / ".dvcignore", proj / ".dvcignore")
    run_dvc(proj, "config", "core.analytics", "false")
    if remote is not None:
        run_dvc(proj, "remote", "add", "-d", "local", str(remote))
    run_dvc(proj, "add", "-q", "data/raw")
    run_git(proj, "add", "-A")
    run_git(proj, "commit", "-qm", "tiny project")
    return proj


@pytest.fixture(scope="session")
def tiny_dvc_run(tmp_path_factory) -> TinyRun:
    """:func:`new_tiny_project` with a local folder as default DVC remote, after ``dvc repro``, all
    committed. Read-only for its users: a test that changes a project works on :func:`copy_project`."""
    proj = new_tiny_project(tmp_path_factory.mktemp("tinyproj"), tmp_path_factory.mktemp("remote"))
    out = run_dvc(proj, "repro")
    run_git(proj, "add", "-A")
    run_git(proj, "commit", "-qm", "first run")
    return TinyRun(proj, out)


@pytest.fixture(scope="session")
def tiny_dvc_project(tiny_dvc_run: TinyRun) -> Path:
    return tiny_dvc_run.path


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of a project (work tree, git history, DVC cache) that a test may change."""
    import shutil

    shutil.copytree(src, dest, symlinks=True)
    return dest


def ran_stages(dvc_output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    import re

    return set(re.findall(r"Running stage '(\w+)'", dvc_output))


# --- Hostile inputs: every odd file a real image folder holds, made here ---

HOSTILE_CLASSES = ("chat noir é", "circle", "square")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with almost no data: a bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def make_hostile_folder(root: Path, per_class: int = 12) -> tuple[Path, dict[str, tuple[str, str]]]:
    """An image folder with good images plus every hostile file a real folder may hold, all made here.

    Returns ``(root, expected)``: for each path (relative to ``root``, as prepare reports it)
    ``("accepted", "")``, ``("rejected", reason substring)`` or ``("ignored", reason substring)``.
    The good images: ``per_class`` synthetic PNGs in "circle" and "square" and ``per_class - 4``
    in "chat noir é" (unequal class sizes, a class name with a space and an accent).
    """
    import io
    import os

    from PIL import Image

    expected: dict[str, tuple[str, str]] = {}
    make_images(root, classes=("circle", "square"), per_class=per_class)
    for name in sorted(os.listdir(root / "circle")) + sorted(os.listdir(root / "square")):
        expected[f"{name.split('_')[0]}/{name}"] = ("accepted", "")
    uni = root / "chat noir é"
    uni.mkdir()
    for i in range(per_class - 4):
        render("stripes", np.random.default_rng([9, i]), 48).save(uni / f"été n°{i:02d}.png")
        expected[f"chat noir é/été n°{i:02d}.png"] = ("accepted", "")
    rng = np.random.default_rng(1)
    base = render("circle", rng, 96).convert("RGB")

    def put(rel: str, outcome: str, reason: str = "", data: bytes | None = None, image=None, **save) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        elif image is not None:
            image.save(path, **save)
        expected[rel] = (outcome, reason)
        return path

    # Formats and modes that must decode, all the same way.
    put("circle/cmyk photo.jpg", "accepted", image=base.convert("CMYK"), format="JPEG")
    put("circle/gray.png", "accepted", image=base.convert("L"))
    gray16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    put("circle/gray16.png", "accepted", image=gray16)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    put("circle/palette transparent.png", "accepted", image=pal, transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    put("circle/rgba.png", "accepted", image=rgba)
    put("circle/huge but allowed.jpg", "accepted", image=Image.new("RGB", (4000, 3000), (200, 30, 30)),
        format="JPEG", quality=70)
    put('circle/a, "quoted" name.png', "accepted", image=base)
    put("square/photo.webp", "accepted", image=base, format="WEBP", lossless=True)
    put("square/photo.bmp", "accepted", image=base)
    frames = [base.convert("P"), Image.new("P", base.size, 3)]
    put("square/anim.gif", "accepted", image=frames[0], save_all=True, append_images=frames[1:])
    put("square/scan.tiff", "accepted", image=base)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    put("square/rotated.jpg", "accepted", image=base, format="JPEG", exif=exif.tobytes())
    put("square/bilevel.png", "accepted", image=base.convert("1"))
    put("square/nested/deeper/inner.png", "accepted", image=base)

    # Image names whose content is not a usable image: rejected, with a reason.
    jpeg = io.BytesIO()
    base.save(jpeg, "JPEG", quality=90)
    put("circle/truncated.jpg", "rejected", "truncated", data=jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    put("circle/empty.jpg", "rejected", "empty file", data=b"")
    put("circle/page.jpg", "rejected", "HTML", data=b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    put("square/notes.png", "rejected", "text file", data=b"just some notes\n")
    put("square/lfs.jpg", "rejected", "Git LFS", data=b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"
                                                       b"size 123\n")
    put("square/bomb.png", "rejected", "data.max_image_pixels", data=_png_header_only(100_000, 100_000))
    put("square/float.tif", "rejected", "floating-point", image=Image.fromarray(np.ones((8, 8), np.float32)))
    os.symlink("does-not-exist.jpg", root / "circle" / "broken link.jpg")
    expected["circle/broken link.jpg"] = ("rejected", "broken symlink")
    os.symlink("loop_b.jpg", root / "circle" / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "circle" / "loop_b.jpg")
    expected["circle/loop_a.jpg"] = ("rejected", "symlink loop")
    expected["circle/loop_b.jpg"] = ("rejected", "symlink loop")
    bad_name = os.fsdecode(b"\xff\xfe.jpg")  # not UTF-8: kept by Python as surrogate escapes
    (root / "circle" / bad_name).write_bytes(jpeg.getvalue())
    expected["circle/\\xff\\xfe.jpg"] = ("rejected", "UTF-8")
    bad_folder = root / "circle" / os.fsdecode(b"sub \xe9t\xe9")  # a Latin-1 folder name
    bad_folder.mkdir()
    base.save(bad_folder / "inside.png")
    expected["circle/sub \\xe9t\\xe9"] = ("rejected", "folder name is not valid UTF-8")
    os.mkfifo(root / "circle" / "pipe.jpg")
    expected["circle/pipe.jpg"] = ("rejected", "not a regular file")

    # Not image files by name, hidden, links to what is already there: ignored, with a reason.
    put("circle/notes.txt", "ignored", "not an image file name", data=b"notes")
    put("circle/.DS_Store", "ignored", "hidden file", data=b"\x00\x00\x00\x01Bud1")
    put("square/Thumbs.db", "ignored", "operating-system", data=b"\xd0\xcf\x11\xe0")
    put("square/.hidden.png", "ignored", "hidden file", image=base)
    put("square/.thumbnails/t.png", "ignored", "", image=base)
    del expected["square/.thumbnails/t.png"]
    expected["square/.thumbnails"] = ("ignored", "hidden folder")
    put("square/IMG_0001.heic", "ignored", "HEIC", data=b"\x00\x00\x00\x18ftypheic")
    os.symlink("..", root / "circle" / "loop dir")  # a folder link back up: a loop
    expected["circle/loop dir"] = ("ignored", "already scanned")
    os.symlink(os.path.join("..", "circle", "circle_000.png"), root / "square" / "link to circle.png")
    expected["square/link to circle.png"] = ("ignored", "same file as circle/circle_000.png")
    put("README.md", "ignored", "directly in", data=b"# my photos\n")
    put(".git/config", "ignored", "", data=b"[core]\n")
    del expected[".git/config"]
    expected[".git"] = ("ignored", "hidden folder")
    return root, expected
