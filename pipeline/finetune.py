"""Stage 4: stack backbone + trained head, unfreeze the top blocks, train at a low learning rate.

    python -m pipeline.finetune --raw-dir data/demo --manifest data/prepared/manifest.csv \
        --classes data/prepared/classes.json --val-features features/val.h5 --head models/head.keras \
        --model models/model.keras --history reports/finetune_history.csv \
        --metrics reports/finetune_metrics.json

Starting from the trained head is the point: a randomly initialised head sends large
gradients into the pretrained blocks and wrecks them in the first steps. Before any
training the stacking parity is asserted: on val images, stacked-model probabilities must
equal the head's probabilities on the cached features (else preprocessing or pooling
drifted between extract and here). The epoch kept is the one with the lowest val loss,
epoch 0 (the head-only model) included, so fine-tuning never returns a worse model on val.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones import build_backbone, count_params, get_base, image_size, unfreeze_from
from pipeline.datasets import build_augmentation, image_dataset
from pipeline.extract import feature_provenance
from pipeline.features import read_features
from pipeline.images import load_batch
from pipeline.io_utils import library_versions, read_json, setup_logging, write_csv, write_json
from pipeline.models import build_stacked, load_model, save_model
from pipeline.params import Params, as_dict, load_params
from pipeline.prepare import read_manifest

log = logging.getLogger(__name__)

PARITY_SAMPLES = 32
PARITY_TOLERANCE = 1e-4
HISTORY_HEADER = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


class ParityError(RuntimeError):
    """The stacked model does not compute what the head was trained on."""


def check_parity(stacked: keras.Model, head: keras.Model, images: np.ndarray, features: np.ndarray) -> float:
    """Max |stacked(images) − head(features)|; raises :class:`ParityError` above tolerance.

    ``images`` (N, S, S, 3) float32 [0, 255]; ``features`` (N, D) the cached features of the
    same images.
    """
    if len(images) == 0:
        return 0.0
    p_stacked = stacked.predict_on_batch(images)
    p_head = head.predict_on_batch(features)
    diff = float(np.max(np.abs(p_stacked - p_head)))
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(
            f"stacking parity failed: stacked-model probabilities differ from the head's on cached features by "
            f"{diff:.2e} (> {PARITY_TOLERANCE}); preprocessing, image size or pooling drifted since extract. "
            "Re-run `dvc repro extract train_head`."
        )
    return diff


class KeepBest(keras.callbacks.Callback):
    """Track the lowest val loss, starting from the untrained model's, and restore it at the end."""

    def __init__(self, baseline_loss: float):
        super().__init__()
        self.best_loss = baseline_loss
        self.best_epoch = 0
        self.best_weights = None

    def on_train_begin(self, logs=None):
        self.best_weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is not None and loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best_weights = loss, epoch + 1, self.model.get_weights()

    def on_train_end(self, logs=None):
        self.model.set_weights(self.best_weights)
        log.info("keeping epoch %d (val loss %.4f)", self.best_epoch, self.best_loss)


def run(raw_dir: Path, manifest: Path, classes_json: Path, val_features: Path, head_path: Path,
        model_out: Path, history_out: Path, metrics_out: Path, params: Params) -> dict:
    """Fine-tune and save ``model_out``; returns the metrics written to ``metrics_out``."""
    t0 = time.perf_counter()
    p = params.finetune
    classes = read_json(classes_json)["classes"]
    expected = feature_provenance(params, classes)
    head, head_meta = load_model(head_path, expected)
    val_fs = read_features(val_features, expected)
    backbone = build_backbone(params.backbone)
    keras.utils.set_random_seed(params.seed)
    base = get_base(backbone)
    if p.epochs > 0:  # validate the layer name before any expensive work
        unfreeze_from(base, p.unfreeze_from, params.backbone.name)
        base.trainable = False
    stacked = build_stacked(backbone, head)
    size = image_size(params.backbone)

    n_par = min(PARITY_SAMPLES, len(val_fs.paths))
    parity = check_parity(stacked, head, load_batch([str(raw_dir / q) for q in val_fs.paths[:n_par]], size)
                          .astype(np.float32), val_fs.features[:n_par])
    log.info("stacking parity on %d val images: max |Δp| = %.2e", n_par, parity)

    items = read_manifest(manifest)
    index = {c: i for i, c in enumerate(classes)}
    train = [it for it in items if it.split == "train"]
    val = [it for it in items if it.split == "val"]
    val_ds = image_dataset([str(raw_dir / it.path) for it in val], size, p.batch_size,
                           labels=[index[it.label] for it in val])

    loss = keras.losses.SparseCategoricalCrossentropy()
    stacked.compile(optimizer=keras.optimizers.SGD(p.learning_rate, momentum=p.momentum), loss=loss,
                    metrics=["accuracy"])
    init_loss, init_acc = stacked.evaluate(val_ds, verbose=0)
    # Epoch 0 = the head-only model; it has no training loss, so those cells stay empty.
    rows = [(0, "", "", init_loss, init_acc)]
    best_epoch, best_loss = 0, init_loss
    if p.epochs > 0:
        n_trainable = unfreeze_from(base, p.unfreeze_from, params.backbone.name)
        # Trainability changed: recompile so the optimizer sees the new trainable set.
        stacked.compile(optimizer=keras.optimizers.SGD(p.learning_rate, momentum=p.momentum), loss=loss,
                        metrics=["accuracy"])
        log.info("unfrozen from %s: %d trainable tensors, %d trainable params", p.unfreeze_from, n_trainable,
                 count_params(stacked.trainable_weights))
        train_ds = image_dataset([str(raw_dir / it.path) for it in train], size, p.batch_size,
                                 labels=[index[it.label] for it in train], shuffle=True, seed=params.seed,
                                 augment=build_augmentation(p.augment, params.seed))
        keep = KeepBest(init_loss)
        hist = stacked.fit(train_ds, validation_data=val_ds, epochs=p.epochs, verbose=2, callbacks=[
            keras.callbacks.EarlyStopping("val_loss", patience=p.patience), keep])
        h = hist.history
        rows += [(i + 1, h["loss"][i], h["accuracy"][i], h["val_loss"][i], h["val_accuracy"][i])
                 for i in range(len(h["loss"]))]
        best_epoch, best_loss = keep.best_epoch, keep.best_loss
    # The saved model is for inference: everything frozen again, as a loaded model would be used.
    base.trainable = False
    best_acc = next(r[4] for r in rows if r[0] == best_epoch)
    metrics = {"best_epoch": best_epoch, "val_loss": float(best_loss), "val_accuracy": float(best_acc),
               "head_only_val_loss": float(init_loss), "head_only_val_accuracy": float(init_acc),
               "parity_max_abs_diff": parity, "seconds": round(time.perf_counter() - t0, 1)}
    save_model(stacked, model_out, {
        "kind": "finetuned", "class_names": classes, "provenance": expected, "head_type": head_meta["head_type"],
        "finetune_params": as_dict(p), "seed": params.seed, "best_epoch": best_epoch,
        "versions": library_versions(),
    })
    write_csv(history_out, HISTORY_HEADER, rows)
    write_json(metrics_out, metrics)
    log.info("fine-tuned: val acc %.4f → %.4f (epoch %d), %.0fs", init_acc, best_acc, best_epoch, metrics["seconds"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("raw-dir", "manifest", "classes", "val-features", "head", "model", "history", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    run(args.raw_dir, args.manifest, args.classes, args.val_features, args.head, args.model, args.history,
        args.metrics, params)


if __name__ == "__main__":
    main()
