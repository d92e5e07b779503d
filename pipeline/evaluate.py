"""Stage 5: test-set metrics and plots for the head-only and the fine-tuned model.

The head-only model is scored on the cached test features: by the stacking parity that
finetune asserts, that is exactly the stacked head-only model's output, at a fraction of
the cost. The fine-tuned model is scored on the test images themselves, on the engine
``evaluate.engine`` picks (ONNX Runtime on CPU: probabilities within 1e-5 of TensorFlow's).

Both models carry their fitted temperature (:class:`pipeline.models.heads.Temperature`), so what is
scored is what a user gets: calibrated probabilities. The uncalibrated ones are the same
outputs with the temperature undone (:func:`pipeline.models.calibration.apply_temperature` with 1/T),
reported beside them. With ``evaluate.tta`` each model's probabilities are averaged over the
views of :mod:`pipeline.runtime.tta`; the head then also runs on the mirrored test images (frozen
backbone + head), as no features of those are cached.

``test_near_copies_of_train`` counts the test images whose perceptual hash (recorded by prepare in
the manifest) is within ``data.group_hash_bits`` bits (4 when that is -1) of a train or val
image's: their scores measure memory more than generalisation, and the log warns when any exist.
Prepare keeps near-copies in one split, so the count is 0 unless the test images were given (a
``test/`` folder, ``data.test_dir``) or the grouping was turned off.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pipeline.backbones.build import build_backbone, feature_provenance
from pipeline.backbones.registry import image_size
from pipeline.core.io import PipelineError, atomic_path, read_json, setup_logging, user_errors, write_csv, write_json
from pipeline.core.manifest import read_manifest
from pipeline.core.params import Params, load_params
from pipeline.data.images import load_image
from pipeline.data.near_copies import DEFAULT_BITS, closest, from_hex, near_copy_elsewhere
from pipeline.extraction.features import open_features
from pipeline.models.calibration import apply_temperature, coverage_curve, ece, reliability_bins
from pipeline.models.heads import build_stacked, load_model, model_temperature, predict_features
from pipeline.runtime import tta
from pipeline.runtime.engines import compile_engine, has_gpu, resolve_engine
from pipeline.runtime.inference import Infer, batched_images

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("data.group_hash_bits", "backbone", "evaluate")

MODELS = ("head", "finetuned")


def _log_loss(y: np.ndarray, probs: np.ndarray, k: int) -> float:
    return float(log_loss(y, np.clip(probs, 1e-7, 1.0), labels=list(range(k))))


def calibration_metrics(y: np.ndarray, probs: np.ndarray, uncalibrated: np.ndarray, temperature: float) -> dict:
    """ECE and log loss of the shipped (calibrated) ``probs`` and of the ``uncalibrated`` ones, both (N, K)."""
    k = probs.shape[1]
    return {"ece": ece(probs, y), "ece_uncalibrated": ece(uncalibrated, y),
            "log_loss_uncalibrated": _log_loss(y, uncalibrated, k), "temperature": float(temperature)}


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """``y`` (N,) int, ``probs`` (N, K) float → accuracy, log loss, ROC-AUC, per-class P/R/F1, confusion."""
    k = len(classes)
    pred = probs.argmax(1)
    labels = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = np.unique(y)
    if len(present) < 2:
        auc = None  # undefined with a single class in the test set
    elif k == 2:
        auc = float(roc_auc_score(y, probs[:, 1]))
    else:
        # Macro one-vs-rest over the classes present in the test set.
        auc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "log_loss": _log_loss(y, probs, k),
        "roc_auc": auc,
        "n": int(len(y)),
        # Moved to the per-class report by run(), so `dvc metrics show/diff` stays readable.
        "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def roc_points(y: np.ndarray, probs: np.ndarray) -> list[tuple[float, float, float]]:
    """(fpr, tpr, threshold) rows: the positive class when K = 2, else the micro-average."""
    if len(np.unique(y)) < 2:
        return []
    if probs.shape[1] == 2:
        fpr, tpr, thr = roc_curve(y, probs[:, 1])
    else:
        onehot = np.eye(probs.shape[1])[y]
        fpr, tpr, thr = roc_curve(onehot.ravel(), probs.ravel())
    return [(float(a), float(b), float(min(c, 1.0))) for a, b, c in zip(fpr, tpr, thr)]


def mistakes_gallery(out: Path, paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str],
                     n: int, thumb: int = 160) -> int:
    """A PNG grid of the ``n`` most confident mistakes (true / predicted / confidence); returns the count."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    cols = max(1, min(4, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    caption = 34
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    if len(wrong) == 0:
        draw.text((8, 8), "no mistakes on the test set", fill="black", font=font)
    for k, i in enumerate(wrong):
        x, yy = (k % cols) * thumb, (k // cols) * (thumb + caption)
        sheet.paste(Image.fromarray(load_image(paths[i], thumb)), (x, yy))
        draw.text((x + 4, yy + thumb + 2), f"true: {classes[y[i]]}", fill="black", font=font)
        draw.text((x + 4, yy + thumb + 17), f"pred: {classes[pred[i]]} ({probs[i, pred[i]]:.2f})", fill="red",
                  font=font)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return len(wrong)


def view_probabilities(infers: dict[str, list[Infer]], paths: list[str], size: int, batch_size: int,
                       view_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each image decoded once, its views (:func:`pipeline.runtime.tta.views`) fed to every model's engine.

    ``infers[name][v]`` runs view ``view_names[v]`` (None: that view is not computed here) →
    ``{name: (V, N, K) float32}``, a view not computed left as NaN.
    """
    parts: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in view_names] for name in infers}
    for images, _ in batched_images(paths, size, batch_size, desc="evaluate"):
        batch_views = tta.views(images, view_names)
        for name, fns in infers.items():
            for v, fn in enumerate(fns):
                if fn is not None:
                    parts[name][v].append(fn(batch_views[v]))
    out = {}
    for name, per_view in parts.items():
        k = next((np.concatenate(p).shape[1] for p in per_view if p), 0)
        out[name] = np.stack([np.concatenate(p) if p else np.full((len(paths), k), np.nan, np.float32)
                              for p in per_view])
    return out


def write_plots(plots_dir: Path, name: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    """Confusion, ROC, reliability-diagram and accuracy-vs-coverage CSVs of one model's test ``probs`` (N, K)."""
    write_csv(plots_dir / f"confusion_{name}.csv", ("actual", "predicted"),
              [(classes[a], classes[b]) for a, b in zip(y, probs.argmax(1))])
    write_csv(plots_dir / f"roc_{name}.csv", ("fpr", "tpr", "threshold"), roc_points(y, probs))
    # `calibrated` repeats the confidence: plotted against it, the diagonal a calibrated model follows.
    write_csv(plots_dir / f"reliability_{name}.csv",
              ("confidence", "accuracy", "calibrated", "count", "bin_lower", "bin_upper"),
              [(r["confidence"], r["accuracy"], r["confidence"], r["count"], r["lower"], r["upper"])
               for r in reliability_bins(probs, y)])
    write_csv(plots_dir / f"coverage_{name}.csv", ("min_confidence", "coverage", "accuracy", "n"),
              [(r["min_confidence"], r["coverage"], r["accuracy"], r["n"]) for r in coverage_curve(probs, y)])


def near_copies_of_train(manifest: Path, bits: int) -> tuple[int, list[str]]:
    """Test images of ``manifest`` with a train or val image within ``bits`` bits of pHash →
    (their number, up to 5 examples as "test path ≈ closest train/val path")."""
    items = read_manifest(manifest)
    if any(not it.phash for it in items):
        raise PipelineError(f"{manifest} has no perceptual hashes (written before prepare recorded them); "
                            "re-run `dvc repro prepare`")
    hashes = from_hex([it.phash for it in items])
    test = np.array([it.split == "test" for it in items])
    rows = np.flatnonzero(near_copy_elsewhere(hashes, test.astype(np.int64), bits) & test)
    return len(rows), [f"{items[i].path} ≈ {items[closest(hashes, i, ~test)].path}" for i in rows[:5]]


def run(*, raw_dir: Path, manifest: Path, classes_json: Path, test_features: Path, head_path: Path,
        model_path: Path, metrics_out: Path, per_class_out: Path, plots_dir: Path, mistakes_out: Path,
        params: Params) -> dict:
    """Score both models on the test split; write metrics, per-class report, plot data and mistakes.

    ``metrics_out`` gets the headline numbers per model (accuracy, log loss, ROC-AUC, n, ECE, and log loss
    and ECE without the model's temperature; with TTA also the original view's alone);
    ``per_class_out`` per-class precision/recall/F1/support and the confusion matrix.
    Returns both merged.
    """
    classes = read_json(classes_json)["classes"]
    expected = feature_provenance(params.backbone, classes)
    head, _ = load_model(head_path, expected)
    model, _ = load_model(model_path, expected)
    temperatures = {"head": model_temperature(head), "finetuned": model_temperature(model)}
    with open_features(test_features, expected) as test:  # features read in blocks, never all at once
        head_probs, y, test_paths = predict_features(head, test), test.labels, test.paths
    size = image_size(params.backbone)
    paths = [str(raw_dir / q) for q in test_paths]
    engine = resolve_engine(params.evaluate.engine, has_gpu())
    view_names = tta.TTA_VIEWS if params.evaluate.tta else ("original",)
    log.info("fine-tuned model on %s; views %s", engine, ", ".join(view_names))
    batch = params.evaluate.batch_size
    infers: dict[str, list] = {"finetuned": [compile_engine(model, size, engine, batch)] * len(view_names)}
    if len(view_names) > 1:
        # The head's first view is the cached features; the others need the frozen backbone on the new views.
        stacked_head = compile_engine(build_stacked(build_backbone(params.backbone), head), size, engine, batch)
        infers["head"] = [None] + [stacked_head] * (len(view_names) - 1)
    per_view = view_probabilities(infers, paths, size, batch, view_names)
    if "head" in per_view:
        per_view["head"][0] = head_probs
    else:
        per_view["head"] = head_probs[None]
    probs = {name: tta.average(per_view[name]) for name in MODELS}
    report = {}
    for name in MODELS:
        t = temperatures[name]
        uncalibrated = tta.average([apply_temperature(p, 1.0 / t) for p in per_view[name]])
        report[name] = {**classification_metrics(y, probs[name], classes),
                        **calibration_metrics(y, probs[name], uncalibrated, t)}
        if len(view_names) > 1:  # what TTA changed: the original view alone
            single = per_view[name][0]
            report[name]["single_view"] = {"accuracy": float(np.mean(single.argmax(1) == y)),
                                           "log_loss": _log_loss(y, single, len(classes)), "ece": ece(single, y)}
        write_plots(plots_dir, name, y, probs[name], classes)
    report["n_mistakes_shown"] = mistakes_gallery(mistakes_out, paths, y, probs["finetuned"], classes,
                                                  params.evaluate.n_mistakes)
    bits = params.data.group_hash_bits if params.data.group_hash_bits >= 0 else DEFAULT_BITS
    n_copies, examples = near_copies_of_train(manifest, bits)
    report["test_near_copies_of_train"] = n_copies
    details = {"class_names": classes, "engine": engine, "tta_views": list(view_names)}
    headline = {"n_mistakes_shown": report["n_mistakes_shown"], "test_near_copies_of_train": n_copies}
    for name in MODELS:
        m = report[name]
        details[name] = {"per_class": m["per_class"], "confusion_matrix": m["confusion_matrix"]}
        headline[name] = {k: m[k] for k in ("accuracy", "log_loss", "roc_auc", "n", "ece", "ece_uncalibrated",
                                            "log_loss_uncalibrated", "temperature", "single_view") if k in m}
    write_json(per_class_out, details)
    write_json(metrics_out, headline)
    for name in MODELS:
        m = report[name]
        log.info("%-9s test acc %.4f  log loss %.4f (uncalibrated %.4f)  ECE %.4f (uncalibrated %.4f)  AUC %s",
                 name, m["accuracy"], m["log_loss"], m["log_loss_uncalibrated"], m["ece"], m["ece_uncalibrated"],
                 m["roc_auc"])
    if n_copies:
        log.warning("%d of %d test images have a near-copy (pHash within %d bits) among the train or val images "
                    "(e.g. %s): on those the test metrics measure memory, not generalisation. Exclude the train copy "
                    "of each pair (data/exclude.txt) or, for a split prepare made, keep data.group_hash_bits on",
                    n_copies, len(y), bits, "; ".join(examples))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("raw-dir", "manifest", "classes", "test-features", "head", "model", "metrics", "per-class",
                 "plots-dir", "mistakes"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "evaluate", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest,
            classes_json=args.classes, test_features=args.test_features, head_path=args.head,
            model_path=args.model, metrics_out=args.metrics, per_class_out=args.per_class,
            plots_dir=args.plots_dir, mistakes_out=args.mistakes, params=params)


if __name__ == "__main__":
    main()
