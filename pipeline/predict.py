"""Classify new images with the fine-tuned model → a CSV of class probabilities.

``python -m pipeline.predict IMAGE_OR_FOLDER [...] [--out predictions.csv]``; ``--help`` lists
the options. Images are decoded and resized by :func:`pipeline.images.load_image`, the one decoder every
stage uses (Pillow, EXIF orientation, alpha on white, bilinear squash to the model's size),
and the model carries its own preprocessing, so a prediction here equals what evaluate
computes for the same file (on the same engine: ``--engine``, default auto = ONNX Runtime on
CPU, TensorFlow on a GPU). A file that cannot be decoded gets a row with the error and
no probabilities; it does not stop the run. Not a DVC stage: a tool for after ``dvc repro``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.engines import ENGINES, compile_engine, has_gpu, resolve_engine
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.inference import Infer, batched_outputs
from pipeline.io_utils import PipelineError, setup_logging, user_errors, write_csv
from pipeline.models import load_model
from pipeline.scanning import image_files

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/model.keras")


@dataclass(frozen=True)
class Prediction:
    """One input file: ``probs`` (K,) float32, or None with ``error`` when it could not be decoded."""

    path: str
    probs: Optional[np.ndarray]
    error: str = ""


def collect_images(inputs: Sequence[str | Path]) -> list[str]:
    """Files given directly, plus every image file below each folder (prepare's walker, sorted).

    A file named on the command line is kept whatever its extension, so that a mislabelled
    or broken file shows up in the output rather than vanishing; inside folders only names
    with an image extension are taken, hidden entries skipped, each file once, as in prepare.
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = image_files(p)
            if not found:
                log.warning("%s: no image files (%s) found", p, " ".join(IMAGE_EXTENSIONS))
            out += found
        elif p.exists():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def predict_paths(infer: Infer, paths: Sequence[str], size: int, batch_size: int = 32,
                  progress: bool = True) -> Iterable[Prediction]:
    """Yield one :class:`Prediction` per path, in order, through evaluate's image → probabilities path.

    ``infer`` is the model compiled by :func:`pipeline.engines.compile_engine`.
    """
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    outputs = batched_outputs(infer, paths, size, batch_size, tolerant=True, desc="predict", progress=progress)
    for batch, (probs, errors) in zip(batches, outputs):
        k = 0
        for path, err in zip(batch, errors):
            if err:
                yield Prediction(path, None, err)
            else:
                yield Prediction(path, np.asarray(probs[k], np.float32))
                k += 1


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


def run(*, inputs: Sequence[str | Path], model_path: Path = DEFAULT_MODEL, out: Path = Path("predictions.csv"),
        batch_size: int = 32, progress: bool = True, engine: str = "auto") -> list[Prediction]:
    """Predict every image in ``inputs`` with ``model_path``; write ``out`` (CSV); return the predictions."""
    model, meta = load_model(model_path)
    classes = list(meta["class_names"])
    if len(model.input_shape) != 4:
        raise PipelineError(f"{model_path} takes {model.input_shape} inputs, not images: predict needs the "
                         f"fine-tuned image model (default {DEFAULT_MODEL}), not the feature head")
    size = int(meta["provenance"]["image_size"])
    paths = collect_images(inputs)
    if not paths:
        raise PipelineError(f"no images to predict in {', '.join(map(str, inputs))}")
    chosen = resolve_engine(engine, has_gpu())
    log.info("%d images, model %s (%d classes, %d px) on %s", len(paths), model_path, len(classes), size, chosen)
    preds = list(predict_paths(compile_engine(model, size, chosen, batch_size), paths, size, batch_size, progress))
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
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help=f"fine-tuned .keras model (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, default=Path("predictions.csv"), help="output CSV (default predictions.csv)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    ap.add_argument("--engine", choices=("auto", *ENGINES), default="auto",
                    help="auto (default): tensorflow on a GPU, onnxruntime on CPU")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    setup_logging()
    with user_errors():
        run(inputs=args.inputs, model_path=args.model, out=args.out, batch_size=args.batch_size,
            engine=args.engine)


if __name__ == "__main__":
    main()
