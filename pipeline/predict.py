"""Classify new images with the fine-tuned model → a CSV of class probabilities.

    python -m pipeline.predict photo.jpg                       # one image
    python -m pipeline.predict my_folder/ --out predictions.csv  # every image below a folder
    python -m pipeline.predict a.jpg b/ --model models/model.keras --batch-size 32

Images are decoded and resized by :func:`pipeline.images.load_image`, the one decoder every
stage uses (Pillow, EXIF orientation, alpha on white, bilinear squash to the model's size),
and the model carries its own preprocessing, so a prediction here equals what evaluate
computes for the same file. A file that cannot be decoded gets a row with the error and
no probabilities; it does not stop the run. Not a DVC stage: a tool for after ``dvc repro``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.datasets import decode_ahead
from pipeline.images import IMAGE_EXTENSIONS, is_image_file, load_image
from pipeline.io_utils import setup_logging, write_csv

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/model.keras")


@dataclass(frozen=True)
class Prediction:
    """One input file: ``probs`` (K,) float32, or None with ``error`` when it could not be decoded."""

    path: str
    probs: Optional[np.ndarray]
    error: str = ""


def collect_images(inputs: Sequence[str | Path]) -> list[str]:
    """Files given directly, plus every image file below each folder (sorted, hidden files skipped).

    A file named on the command line is kept whatever its extension, so that a mislabelled
    or broken file shows up in the output rather than vanishing; inside folders only names
    with an image extension are taken, as in prepare.
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files if is_image_file(f)]
            if not found:
                log.warning("%s: no image files (%s) found", p, " ".join(IMAGE_EXTENSIONS))
            out += sorted(found)
        elif p.exists():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _decode(path: str, size: int) -> tuple[Optional[np.ndarray], str]:
    try:
        return load_image(path, size), ""
    except ValueError as exc:  # load_image wraps every decoding failure in ValueError
        return None, str(exc)
    except Exception as exc:  # anything else about one file (permissions, vanished, …) must not end the run
        return None, f"{type(exc).__name__}: {exc}"


def predict_paths(model, paths: Sequence[str], size: int, batch_size: int = 32,
                  progress: bool = True) -> Iterable[Prediction]:
    """Yield one :class:`Prediction` per path, in order.

    ``model`` maps ``(B, size, size, 3)`` float32 [0, 255] → ``(B, K)`` probabilities.
    Decoding runs ahead of the model in extract's thread pool (:func:`decode_ahead`).
    """
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch, decoded in zip(batches, decode_ahead(paths, batch_size, lambda p: _decode(p, size))):
            ok = [i for i, (img, _) in enumerate(decoded) if img is not None]
            probs = np.zeros((0, 0), np.float32)
            if ok:
                x = np.stack([decoded[i][0] for i in ok]).astype(np.float32)
                n = len(x)
                if n == 1:
                    # oneDNN computes a batch of one by another code path (last-bit differences);
                    # any batch >= 2 gives the same per-image result as evaluate's batches.
                    x = np.concatenate([x, x])
                probs = np.asarray(model.predict_on_batch(x), np.float32)[:n]
            row = {i: k for k, i in enumerate(ok)}
            for i, path in enumerate(batch):
                if i in row:
                    yield Prediction(path, probs[row[i]])
                else:
                    yield Prediction(path, None, decoded[i][1])
            bar.update(len(batch))


def prediction_rows(preds: Iterable[Prediction], classes: Sequence[str]) -> tuple[list[str], list[list]]:
    """CSV header and rows: path, predicted class, its probability, one column per class, error."""
    header = ["path", "predicted_class", "probability", *(f"prob_{c}" for c in classes), "error"]
    rows = []
    for p in preds:
        if p.probs is None:
            rows.append([p.path, "", "", *([""] * len(classes)), p.error])
        else:
            k = int(np.argmax(p.probs))
            rows.append([p.path, classes[k], f"{p.probs[k]:.6f}", *(f"{v:.6f}" for v in p.probs), ""])
    return header, rows


def run(inputs: Sequence[str | Path], model_path: Path = DEFAULT_MODEL, out: Path = Path("predictions.csv"),
        batch_size: int = 32, progress: bool = True) -> list[Prediction]:
    """Predict every image in ``inputs`` with ``model_path``; write ``out`` (CSV); return the predictions."""
    from pipeline.models import load_model

    model, meta = load_model(model_path)
    classes = list(meta["class_names"])
    if len(model.input_shape) != 4:
        raise ValueError(f"{model_path} takes {model.input_shape} inputs, not images: predict needs the "
                         f"fine-tuned image model (default {DEFAULT_MODEL}), not the feature head")
    size = int(meta["provenance"]["image_size"])
    paths = collect_images(inputs)
    if not paths:
        raise ValueError(f"no images to predict in {', '.join(map(str, inputs))}")
    log.info("%d images, model %s (%d classes, %d px)", len(paths), model_path, len(classes), size)
    preds = list(predict_paths(model, paths, size, batch_size, progress))
    header, rows = prediction_rows(preds, classes)
    write_csv(out, header, rows)
    failed = [p for p in preds if p.probs is None]
    for p in failed:
        log.warning("could not read %s: %s", p.path, p.error)
    log.info("wrote %s: %d predicted, %d unreadable", out, len(preds) - len(failed), len(failed))
    return preds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"fine-tuned .keras model (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output CSV (default predictions.csv)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    setup_logging()
    try:
        run(args.inputs, args.model, args.out, args.batch_size)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
