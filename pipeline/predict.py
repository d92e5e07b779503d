"""Classify new images with the exported model → a CSV or JSON of class probabilities.

``python -m pipeline.predict IMAGE_OR_FOLDER [...] [--out predictions.csv]``; ``--help`` lists
the options (docs/predict.md describes them and the output columns). By default it runs
``models/model.onnx``, the fine-tuned model as the ``export`` stage wrote and checked it, on
ONNX Runtime, with the class names and image size from ``models/serving.json`` beside it:
no TensorFlow or Keras is imported, nothing is converted, so one image takes a fraction of
a second. Images are decoded and resized by :func:`pipeline.data.images.load_image`, the one
decoder every stage uses (Pillow, EXIF orientation, alpha on white, bilinear squash to the
model's size), and the model carries its own preprocessing, so a prediction here equals the
Keras model's for the same file (to 1e-5, the export stage's check). A ``.keras`` model
(``--model models/model.keras``) still runs, through TensorFlow (``--engine``). A file that
cannot be decoded gets a row with the error and no probabilities; it does not stop the run.
So does a file whose header declares more pixels than ``--max-pixels`` (default: the
``data.max_image_pixels`` the model was trained under, recorded in ``serving.json``): it is
refused before a pixel is decoded, so a small file declaring a huge image costs no memory.
Not a DVC stage: a tool for after ``dvc repro``; in a clone whose ``dvc.lock`` records the
exported model, a missing model is one ``dvc pull`` away, and the error says so.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.core.io import PipelineError, setup_logging, sha256_file, user_errors, write_csv, write_json
from pipeline.core.params import DataParams
from pipeline.data.images import IMAGE_EXTENSIONS
from pipeline.data.scanning import image_files

# Only modules that import neither TensorFlow nor Keras at import time (tests/test_predict.py checks it).
from pipeline.runtime import tta as tta_views
from pipeline.runtime.engines import onnx_session
from pipeline.runtime.inference import Infer, PixelLimit, batched_outputs

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/model.onnx")
META_NAME = "serving.json"  # written by the export stage beside the .onnx file
EXPORT_HINT = "the `export` stage writes it: run `dvc repro export` (after training)"
FORMATS = ("csv", "json")
# Largest image (pixels, from its header) decoded when the model's description records none.
DEFAULT_MAX_PIXELS = DataParams().max_image_pixels


def export_hint(model_path: Path) -> str:
    """How to get the missing ``model_path``: ``dvc pull`` when a ``dvc.lock`` above it records it as an
    output (a clone of a project that ran, with a DVC remote), else ``dvc repro export``."""
    here = Path(model_path).resolve().parent
    for root in (here, *here.parents):
        lock = root / "dvc.lock"
        if not lock.is_file():
            continue
        try:
            import yaml

            stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
            rel = Path(model_path).resolve().relative_to(root).as_posix()
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            break
        outs = {o.get("path") for st in stages.values() if isinstance(st, dict) for o in st.get("outs") or []
                if isinstance(o, dict)}
        if rel in outs:
            meta = (Path(rel).parent / META_NAME).as_posix()
            pull = f"dvc pull {rel} {meta}" if meta in outs else f"dvc pull {rel}"
            return (f"{root / 'dvc.lock'} records it: fetch it with `{pull}` (from the project's DVC remote), "
                    "or run `dvc repro export` to build it")
        break
    return EXPORT_HINT



@dataclass(frozen=True)
class Prediction:
    """One input file: ``probs`` (K,) float32, or None with ``error`` when it could not be decoded."""

    path: str
    probs: Optional[np.ndarray]
    error: str = ""

    def uncertain(self, min_confidence: float) -> bool:
        """True when the file decoded but its top probability is below ``min_confidence``."""
        return self.probs is not None and float(self.probs.max()) < min_confidence


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: uint8 ``(B, size, size, 3)`` → float32 ``(B, K)`` probabilities."""

    infer: Infer
    classes: list[str]
    size: int
    info: dict  # provenance written into the JSON output


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


def load_onnx(model_path: Path, meta_path: Optional[Path] = None) -> LoadedModel:
    """The exported ``model_path`` on ONNX Runtime's CPU provider, described by ``meta_path``
    (default: ``serving.json`` beside it), whose recorded sha256 the file must match."""
    meta_path = meta_path or model_path.parent / META_NAME
    if not model_path.is_file():
        raise PipelineError(f"{model_path}: no exported model there; {export_hint(model_path)}, or pass --model")
    if not meta_path.is_file():
        raise PipelineError(f"{meta_path}: the export's description (class names, image size) is missing beside "
                            f"{model_path}; {export_hint(model_path)}, or pass --meta")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    entry = (meta.get("files") or {}).get("onnx")
    if not entry or "class_names" not in meta or "image_size" not in meta:
        raise PipelineError(f"{meta_path} describes no ONNX export (no files.onnx, class_names or image_size); "
                            "re-run `dvc repro export`")
    digest = sha256_file(model_path)
    if digest != entry.get("sha256"):
        raise PipelineError(f"{model_path} is not the file {meta_path} describes (sha256 {digest[:12]}… != "
                            f"{str(entry.get('sha256'))[:12]}…); re-run `dvc repro export`, or pass the matching "
                            "--meta")
    classes, size = list(meta["class_names"]), int(meta["image_size"])

    session = onnx_session(str(model_path))
    (inp,) = session.get_inputs()
    outputs = [o.name for o in session.get_outputs()]
    if "probabilities" not in outputs or inp.type != "tensor(uint8)" or list(inp.shape[1:]) != [size, size, 3]:
        raise PipelineError(f"{model_path} takes {inp.name} {inp.type} {inp.shape} and gives {outputs}, not uint8 "
                            f"(B, {size}, {size}, 3) images → probabilities as {meta_path} says; "
                            "re-run `dvc repro export`")

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(["probabilities"], {inp.name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    info = {"path": str(model_path), "sha256": digest, "source_model": meta.get("source_model"),
            "source_model_sha256": meta.get("source_model_sha256"), "image_size": size, "runtime": "onnxruntime",
            "max_image_pixels": int(meta.get("max_image_pixels") or DEFAULT_MAX_PIXELS)}
    return LoadedModel(infer, classes, size, info)


def load_keras(model_path: Path, batch_size: int, engine: str = "auto") -> LoadedModel:
    """A fine-tuned ``.keras`` model (+ sidecar) through TensorFlow: the slow path, kept for models never exported."""
    from pipeline.models.heads import load_model
    from pipeline.runtime.engines import compile_engine, has_gpu, resolve_engine

    model, meta = load_model(model_path)
    if len(model.input_shape) != 4:
        raise PipelineError(f"{model_path} takes {model.input_shape} inputs, not images: predict needs the "
                            f"fine-tuned image model (default {DEFAULT_MODEL}), not the feature head")
    size = int(meta["provenance"]["image_size"])
    chosen = resolve_engine(engine, has_gpu())
    info = {"path": str(model_path), "sha256": sha256_file(model_path), "image_size": size, "runtime": chosen,
            "max_image_pixels": DEFAULT_MAX_PIXELS}
    return LoadedModel(compile_engine(model, size, chosen, batch_size), list(meta["class_names"]), size, info)


def predict_paths(infer: Infer, paths: Sequence[str], size: int, batch_size: int = 32,
                  progress: bool = True, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Iterable[Prediction]:
    """Yield one :class:`Prediction` per path, in order, through evaluate's image → probabilities path
    (:func:`pipeline.runtime.inference.batched_outputs`; a file that does not decode, or declares more
    than ``max_pixels`` pixels, gets its error)."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    refuse = PixelLimit(max_pixels, "--max-pixels") if max_pixels is not None else True
    outputs = batched_outputs(infer, paths, size, batch_size, tolerant=refuse, desc="predict", progress=progress)
    for batch, (probs, errors) in zip(batches, outputs):
        k = 0
        for path, err in zip(batch, errors):
            if err:
                yield Prediction(path, None, err)
            else:
                yield Prediction(path, np.asarray(probs[k], np.float32))
                k += 1


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def prediction_rows(preds: Iterable[Prediction], classes: Sequence[str], top_k: int = 0,
                    min_confidence: float = 0.0) -> tuple[list[str], list[list]]:
    """CSV header and rows: path, predicted class (empty when uncertain or unreadable), its probability,
    ``uncertain`` (true/false; empty when unreadable), the ``top_k`` most probable classes, one
    ``prob_<class>`` column per class, error."""
    top_cols = [c for i in range(1, top_k + 1) for c in (f"top{i}_class", f"top{i}_probability")]
    header = ["path", "predicted_class", "probability", "uncertain", *top_cols, *(f"prob_{c}" for c in classes),
              "error"]
    rows = []
    for p in preds:
        if p.probs is None:
            rows.append([p.path, "", "", "", *([""] * len(top_cols)), *([""] * len(classes)), p.error])
            continue
        order = np.argsort(-p.probs, kind="stable")
        unsure = p.uncertain(min_confidence)
        top = [v for k in order[:top_k] for v in (classes[k], _fmt(p.probs[k]))]
        rows.append([p.path, "" if unsure else classes[order[0]], _fmt(p.probs[order[0]]),
                     "true" if unsure else "false", *top, *(_fmt(v) for v in p.probs), ""])
    return header, rows


def _num(v: float) -> float:
    return float(f"{v:.7g}")  # float32 carries ~7 significant digits; small probabilities keep theirs


def prediction_records(preds: Iterable[Prediction], classes: Sequence[str], top_k: int = 0,
                       min_confidence: float = 0.0) -> list[dict]:
    """The JSON form of :func:`prediction_rows`: one object per file, null where the CSV is empty;
    probabilities to 7 significant digits (the CSV has 6 decimals)."""
    out = []
    for p in preds:
        if p.probs is None:
            rec = {"path": p.path, "predicted_class": None, "probability": None, "uncertain": None,
                   **({"top": None} if top_k else {}), "probabilities": None, "error": p.error}
        else:
            order = np.argsort(-p.probs, kind="stable")
            unsure = p.uncertain(min_confidence)
            rec = {"path": p.path, "predicted_class": None if unsure else classes[order[0]],
                   "probability": _num(p.probs[order[0]]), "uncertain": unsure}
            if top_k:
                rec["top"] = [{"class": classes[k], "probability": _num(p.probs[k])} for k in order[:top_k]]
            rec["probabilities"] = {c: _num(v) for c, v in zip(classes, p.probs)}
            rec["error"] = None
        out.append(rec)
    return out


def summary(preds: Sequence[Prediction], min_confidence: float) -> dict[str, int]:
    """Counts: images, predicted (confident), uncertain, unreadable; the last three add up to images."""
    unreadable = sum(p.probs is None for p in preds)
    uncertain = sum(p.uncertain(min_confidence) for p in preds)
    return {"images": len(preds), "predicted": len(preds) - unreadable - uncertain, "uncertain": uncertain,
            "unreadable": unreadable}


def run(*, inputs: Sequence[str | Path], model_path: Path = DEFAULT_MODEL, meta_path: Optional[Path] = None,
        out: Path = Path("predictions.csv"), fmt: str = "csv", top_k: int = 0, min_confidence: float = 0.0,
        batch_size: int = 32, progress: bool = True, engine: str = "auto", tta: bool = False,
        max_pixels: Optional[int] = None) -> list[Prediction]:
    """Predict every image in ``inputs`` with ``model_path`` (``.onnx``: ONNX Runtime, metadata from
    ``meta_path``; ``.keras``: TensorFlow on ``engine``); write ``out`` as ``fmt``; return the predictions.

    ``tta``: average each image's probabilities over the views of :data:`pipeline.runtime.tta.TTA_VIEWS` (the image
    and its mirror), as ``evaluate.tta`` does; twice the inference. ``max_pixels``: refuse (as unreadable)
    an image whose header declares more pixels; None = the limit recorded with the model."""
    if fmt not in FORMATS:
        raise PipelineError(f"unknown output format {fmt!r}; use one of {FORMATS}")
    if not 0.0 <= min_confidence <= 1.0:
        raise PipelineError(f"min_confidence {min_confidence} is not a probability in [0, 1]")
    if top_k < 0:
        raise PipelineError(f"top_k {top_k} must be >= 0 (0: no ranking columns)")
    if max_pixels is not None and max_pixels < 1:
        raise PipelineError(f"max_pixels {max_pixels} must be >= 1")
    model_path = Path(model_path)
    if model_path.suffix == ".keras":
        loaded = load_keras(model_path, batch_size, engine)
    else:
        loaded = load_onnx(model_path, meta_path)
    paths = collect_images(inputs)
    if not paths:
        raise PipelineError(f"no images to predict in {', '.join(map(str, inputs))}")
    classes = loaded.classes
    if top_k > len(classes):
        log.warning("--top-k %d: the model has %d classes; listing all of them", top_k, len(classes))
        top_k = len(classes)
    views = tta_views.TTA_VIEWS if tta else ("original",)
    log.info("%d images, model %s (%d classes, %d px) on %s, views: %s", len(paths), model_path, len(classes),
             loaded.size, loaded.info["runtime"], ", ".join(views))

    def infer(batch: np.ndarray) -> np.ndarray:
        return tta_views.predict(loaded.infer, batch, views) if tta else loaded.infer(batch)

    limit = max_pixels or loaded.info["max_image_pixels"]
    preds = list(predict_paths(infer, paths, loaded.size, batch_size, progress, limit))
    if fmt == "csv":
        write_csv(out, *prediction_rows(preds, classes, top_k, min_confidence))
    else:
        write_json(out, {"model": loaded.info, "classes": classes, "tta_views": list(views),
                         "min_confidence": min_confidence,
                         "summary": summary(preds, min_confidence),
                         "predictions": prediction_records(preds, classes, top_k, min_confidence)})
    for p in preds:
        if p.probs is None:
            log.warning("could not read %s: %s", p.path, p.error)
    return preds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help=f"exported .onnx model (default {DEFAULT_MODEL}, from `dvc repro export`), or a fine-tuned "
                         ".keras model (slow: imports TensorFlow)")
    ap.add_argument("--meta", type=Path, default=None,
                    help=f"the export's {META_NAME} for an .onnx model (default: beside the model)")
    ap.add_argument("--out", type=Path, default=None, help="output file (default predictions.csv / predictions.json)")
    ap.add_argument("--format", choices=FORMATS, default=None,
                    help="csv or json (default: from --out's extension, else csv)")
    ap.add_argument("--top-k", type=int, default=0, metavar="K",
                    help="also list the K most probable classes per image (default 0: none)")
    ap.add_argument("--min-confidence", type=float, default=0.0, metavar="P",
                    help="images whose top probability is below P are marked uncertain, with no predicted class "
                         "(default 0: always predict); evaluate's coverage plot helps to choose P")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    ap.add_argument("--max-pixels", type=int, default=None, metavar="N",
                    help="refuse (as unreadable) an image whose header declares more than N pixels, before "
                         "decoding it (default: the data.max_image_pixels the model was trained under, from "
                         f"{META_NAME}; {DEFAULT_MAX_PIXELS:,} for a .keras model)")
    ap.add_argument("--engine", choices=("auto", "tensorflow", "onnxruntime"), default=None,
                    help="for a .keras model only: auto (default) = tensorflow on a GPU, onnxruntime on CPU")
    ap.add_argument("--tta", action="store_true",
                    help="test-time augmentation: average each image's probabilities over it and its left-right "
                         "mirror, as evaluate.tta does (twice the inference; docs/trust.md has when it helps)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    if args.top_k < 0:
        ap.error("--top-k must be >= 0")
    if args.max_pixels is not None and args.max_pixels < 1:
        ap.error("--max-pixels must be >= 1")
    if not 0.0 <= args.min_confidence <= 1.0:
        ap.error("--min-confidence must be a probability in [0, 1]")
    if args.engine is not None and args.model.suffix != ".keras":
        ap.error("--engine applies to a .keras model; an .onnx model runs on ONNX Runtime")
    fmt = args.format or ("json" if args.out is not None and args.out.suffix.lower() == ".json" else "csv")
    out = args.out or Path(f"predictions.{fmt}")
    setup_logging()
    with user_errors():
        preds = run(inputs=args.inputs, model_path=args.model, meta_path=args.meta, out=out, fmt=fmt,
                    top_k=args.top_k, min_confidence=args.min_confidence, batch_size=args.batch_size,
                    engine=args.engine or "auto", tta=args.tta, max_pixels=args.max_pixels)
        n = summary(preds, args.min_confidence)
        print(f"{n['images']} images: {n['predicted']} predicted, {n['uncertain']} uncertain, "
              f"{n['unreadable']} unreadable -> {out}", flush=True)


if __name__ == "__main__":
    main()
