"""Stage 4: stack backbone + trained head, unfreeze the top blocks, train at a low learning rate.

Starting from the trained head is the point: a randomly initialised head sends large
gradients into the pretrained blocks and wrecks them in the first steps. Before any
training the stacking parity is asserted: on val images, stacked-model probabilities must
equal the head's probabilities on the cached features (else preprocessing or pooling
drifted between extract and here). The epoch kept is the one with the lowest val loss,
epoch 0 (the head-only model) included, so fine-tuning never returns a worse model on val.
With ``finetune.ema`` each epoch is measured, and kept, as the optimizer's moving average of
the weights (:mod:`pipeline.finetuning.recipe`: the whole recipe in one module).

The frozen layers below ``finetune.unfreeze_from`` never change, so they are not run in the
training step: the stacked model is cut there (:mod:`pipeline.finetuning.cut`), the bottom runs once per
augmented view on an inference engine into a float16 activation cache (:mod:`pipeline.finetuning.activations`),
and only the top trains, on the stored activations (:mod:`pipeline.finetuning.stream`), validated on
the cached clean val activations. The top is the stacked model's own layers, so the saved model
is the full backbone + head; after training, its probabilities on val images are checked
against the trained top's on the stored activations (split parity). docs/benchmarks/finetune.md has the
measurements.

With ``--checkpoint``, the state after every epoch is saved there (atomically), and with
``finetune.resume`` a run whose checkpoint belongs to the same params, head and images
continues after its last finished epoch and ends with the same model as an uninterrupted
run (see :mod:`pipeline.finetuning.checkpoint`).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones.build import (
    backbone_provenance,
    build_backbone,
    count_params,
    feature_provenance,
    get_base,
    resolve_unfreeze_from,
    unfreeze_start,
)
from pipeline.backbones.registry import image_size
from pipeline.core.io import file_digests, library_versions, read_json, setup_logging, user_errors, write_json
from pipeline.core.manifest import Item, read_manifest
from pipeline.core.params import FinetuneParams, Params, as_dict, load_params
from pipeline.data.datasets import image_dataset
from pipeline.data.images import load_batch
from pipeline.extraction.features import open_features
from pipeline.finetuning.activations import BOTTOM_BATCH, ActivationCache, Activations, bottom_engine, cache_key
from pipeline.finetuning.checkpoint import TrainState, fingerprint
from pipeline.finetuning.cut import Cut, cut_at
from pipeline.finetuning.parity import PARITY_SAMPLES, check_cut_parity, check_parity
from pipeline.finetuning.progress import Clock, start_live
from pipeline.finetuning.recipe import (
    compile_top,
    default_strategy,
    fold_bn_scale,
    keep_best,
    replica_lr_scale,
    unfreeze_from,
)
from pipeline.finetuning.stream import TrainData, clean_dataset
from pipeline.finetuning.trainer import RunCheckpoint, fit_top, initial_state
from pipeline.models.calibration import describe, fit_on_val
from pipeline.models.heads import build_stacked, load_model, save_model, with_temperature, without_temperature
from pipeline.models.training import write_history
from pipeline.runtime.engines import compile_engine

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("seed", "backbone", "finetune")


@dataclass
class Stacked:
    """The head-only starting point: backbone + head (uncalibrated) as one model, checked against the cached
    features, with the val images the stacking parity was measured on."""
    backbone: keras.Model
    head: keras.Model
    model: keras.Model
    head_meta: dict
    parity: float
    parity_paths: list[str]
    parity_images: np.ndarray


def stack_head(params: Params, head_path: Path, val_features: Path, raw_dir: Path, expected: dict,
               boundary: str) -> Stacked:
    """Build backbone + trained head and assert the stacking parity on the first val images; with epochs to
    train, check first that ``boundary`` (``finetune.unfreeze_from`` resolved) is a layer of the backbone."""
    # Fine-tuning starts from the head as it was fitted, not from its calibrated copy: a temperature inside
    # the training graph would scale every gradient into the head and backbone by 1/T, and the stacking
    # parity below is a check of the uncalibrated function. The fine-tuned model gets its own T at the end.
    calibrated_head, head_meta = load_model(head_path, expected)
    head = without_temperature(calibrated_head)
    with open_features(val_features, expected) as val_ff:  # only the parity rows are read
        n = min(PARITY_SAMPLES, val_ff.n)
        parity_paths, parity_features = val_ff.paths[:n], val_ff.features(0, n)
    backbone = build_backbone(params.backbone)
    keras.utils.set_random_seed(params.seed)
    if params.finetune.epochs > 0:  # a bad layer name fails here, before any expensive work
        unfreeze_start(get_base(backbone), boundary, params.backbone.name)
    stacked = build_stacked(backbone, head)
    parity_images = load_batch([str(raw_dir / q) for q in parity_paths], image_size(params.backbone))
    parity_images = parity_images.astype(np.float32)
    parity = check_parity(stacked, head, parity_images, parity_features)
    log.info("stacking parity on %d val images: max |Δp| = %.2e", len(parity_paths), parity)
    return Stacked(backbone, head, stacked, head_meta, parity, parity_paths, parity_images)


def trainable_top(s: Stacked, p: FinetuneParams, boundary: str, backbone_name: str, steps: int,
                  replicas: int) -> tuple[Cut, int]:
    """Unfreeze from ``boundary``, fold BatchNorm scales, cut the stacked model there and compile its top
    (:mod:`pipeline.finetuning.recipe`) → (the cut, the backbone's trainable weights count)."""
    base = get_base(s.backbone)
    n_trainable = unfreeze_from(base, boundary, backbone_name)
    unfrozen = count_params(base.trainable_weights)
    if p.fold_bn:  # before the cut: it reads each BN's single inbound node
        log.info("BatchNorm scale folded into %d unfrozen conv layers (finetune.fold_bn)", fold_bn_scale(base))
    total = count_params(base.weights)
    log.info("unfrozen from %s%s: %d trainable tensors, %d of the backbone's %d params (%.0f %%)", boundary,
             " (finetune.unfreeze_from: auto)" if boundary != p.unfreeze_from else "", n_trainable, unfrozen,
             total, 100 * unfrozen / total)
    cut = cut_at(s.backbone, s.head, boundary)
    compile_top(cut.top, p, steps, replicas)
    return cut, unfrozen


def train_data(acts: Activations, raw_dir: Path, train: list[Item], val: list[Item], index: dict,
               batch_size: int) -> tuple[TrainData, list[bytes]]:
    """The images' content digests and the top's input: activations on demand, clean val activations now
    → (train data, the digests of ``train + val``)."""
    train_paths, val_paths = _paths(raw_dir, train), _paths(raw_dir, val)
    digests = file_digests(train_paths + val_paths)
    val_d = digests[len(train):]
    data = TrainData(acts, train_paths, digests[:len(train)], [index[it.label] for it in train], len(index),
                     clean_dataset(acts, val_paths, val_d, [index[it.label] for it in val], batch_size))
    return data, digests


def run(*, raw_dir: Path, manifest: Path, classes_json: Path, val_features: Path, head_path: Path,
        model_out: Path, history_out: Path, metrics_out: Path, params: Params,
        live_dir: Path | None = None, checkpoint: Path | None = None, activation_cache: Path | None = None,
        strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Fine-tune and save ``model_out``; returns the metrics written to ``metrics_out``.

    ``strategy`` None: :func:`pipeline.finetuning.recipe.default_strategy` (MirroredStrategy when TensorFlow
    sees several GPUs). Under a strategy with R replicas each step trains on R × ``finetune.batch_size``
    images and the learning rate is scaled by :func:`pipeline.finetuning.recipe.replica_lr_scale`.

    With ``live_dir``, every epoch is also logged with dvclive (:func:`pipeline.finetuning.progress.start_live`).
    With ``checkpoint``, the training state is saved there after every epoch, and resumed
    from when ``finetune.resume`` is on and the checkpoint belongs to this run.
    ``activation_cache``: the folder of the frozen bottom's cached activations
    (:mod:`pipeline.finetuning.activations`), kept between runs; None: a throw-away folder for this call only.
    """
    clock = Clock()
    p = params.finetune
    # finetune.unfreeze_from: auto → the backbone's own boundary; recorded in the metrics and the model.
    boundary = resolve_unfreeze_from(p.unfreeze_from, params.backbone.name)
    classes = read_json(classes_json)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    expected = feature_provenance(params.backbone, classes)
    strategy, replicas = _strategy(strategy, p)
    train, val = read_manifest(manifest, splits=("train",)), read_manifest(manifest, splits=("val",))
    # Every variable (head, backbone, optimizer) is created under the strategy's scope.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        s = stack_head(params, head_path, val_features, raw_dir, expected, boundary)
        # The training stream's steps: whole multiples of the replicas, in global batches.
        steps = math.ceil((len(train) - len(train) % replicas) / (p.batch_size * replicas))
        cut, unfrozen = trainable_top(s, p, boundary, params.backbone.name, steps, replicas) if p.epochs else (None, 0)
    val_labels = np.asarray([index[it.label] for it in val])
    with tempfile.TemporaryDirectory(prefix="activations-") as scratch:
        if cut is None:  # the head-only model, saved as stacked: nothing trains, no activations
            state, val_probs, acts, live = _head_only(s.model, raw_dir, val, val_labels, params, live_dir)
            split_parity = 0.0
        else:
            acts, engine = _activations(cut, params, boundary, activation_cache or Path(scratch))
            data, digests = train_data(acts, raw_dir, train, val, index, p.batch_size)
            state, live = _epoch_0(cut.top, data, live_dir, clock)
            items = [(it.path, it.label, it.split, d) for it, d in zip(train + val, digests)]
            fp = fingerprint(params, expected, head_path, items, engine, replicas,
                             unfreeze_from=boundary) if checkpoint else ""
            state, fitted, fit_seconds = fit_top(cut.top, state, params, data, RunCheckpoint(checkpoint, fp), live,
                                                 replicas)
            clock.seconds.update(fit_seconds)
            if live is not None and not fitted:
                live.end()  # no fit, so no DVCLiveCallback to end the run
            keep_best(cut.top, state)
            # The kept weights' val probabilities, for the temperature: the top on the stored clean val
            # activations (the stacked model's to the cut parity below).
            with clock.part("validate"):
                val_probs = cut.top.predict(data.val, verbose=0)
            clock.begin("finish")  # the cut parity, calibration and saving
            split_parity = _cut_parity(cut, s, acts, raw_dir, dict(zip(_paths(raw_dir, val), digests[len(train):])))
    # The saved model is for inference: everything frozen again, as a loaded model would be used.
    get_base(s.backbone).trainable = False
    calibration = fit_on_val(val_probs, val_labels)
    log.info("fine-tuned model: %s", describe(calibration))
    metrics = {**_epoch_metrics(state), "parity_max_abs_diff": s.parity, "split_parity_max_abs_diff": split_parity,
               "bottom_images_computed": acts.computed if acts is not None else 0,
               "bottom_seconds": round(acts.seconds, 1) if acts is not None else 0.0,
               "unfreeze_from": boundary, "unfrozen_params": unfrozen,
               "unfrozen_share": round(unfrozen / count_params(get_base(s.backbone).weights), 4),
               "calibration": calibration}
    save_model(with_temperature(s.model, calibration["temperature"]), model_out, {
        "kind": "finetuned", "class_names": classes, "provenance": expected, "head_type": s.head_meta["head_type"],
        "finetune_params": as_dict(p), "unfreeze_from": boundary, "seed": params.seed, "best_epoch": state.best_epoch,
        "temperature": calibration["temperature"], "versions": library_versions(),
    })
    write_history(history_out, state.rows)
    clock.end("finish")
    clock.seconds["bottom"] = acts.seconds if acts is not None else 0.0
    metrics["seconds_by_part"] = clock.by_part(("bottom", "train", "validate", "checkpoint", "finish"))
    metrics["seconds"] = round(time.perf_counter() - clock.start, 1)
    write_json(metrics_out, metrics)
    log.info("fine-tuned: val acc %.4f → %.4f (epoch %d), %.0fs", metrics["head_only_val_accuracy"],
             metrics["val_accuracy"], state.best_epoch, metrics["seconds"])
    return metrics


def _strategy(strategy: Optional[tf.distribute.Strategy],
              p: FinetuneParams) -> tuple[Optional[tf.distribute.Strategy], int]:
    """``strategy``, else :func:`pipeline.finetuning.recipe.default_strategy`, and its replica count (logged if > 1)."""
    strategy = strategy if strategy is not None else default_strategy()
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas > 1:
        log.info("%d replicas (%s): global batch %d, learning rate x %.3g", replicas, type(strategy).__name__,
                 p.batch_size * replicas, replica_lr_scale(p.optimizer, replicas))
    return strategy, replicas


def _epoch_0(top: keras.Model, data: TrainData, live_dir: Path | None, clock: Clock):
    """Epoch 0, the head-only model, measured on the val activations → (its state, the dvclive run or None)."""
    with clock.part("validate"):
        loss, acc = top.evaluate(data.val, verbose=0)
    live = start_live(live_dir, loss, acc) if live_dir is not None else None
    return initial_state(loss, acc, top.get_weights()), live


def _epoch_metrics(state: TrainState) -> dict:
    """The kept epoch and its val metrics, beside the head-only model's (epoch 0)."""
    best_acc = next(r[4] for r in state.rows if r[0] == state.best_epoch)
    return {"best_epoch": state.best_epoch, "val_loss": float(state.best_loss), "val_accuracy": float(best_acc),
            "head_only_val_loss": float(state.rows[0][3]), "head_only_val_accuracy": float(state.rows[0][4])}


def _paths(raw_dir: Path, items: list[Item]) -> list[str]:
    return [str(raw_dir / it.path) for it in items]


def _head_only(stacked: keras.Model, raw_dir: Path, val: list[Item], val_labels: np.ndarray, params: Params,
               live_dir: Path | None):
    """``finetune.epochs: 0``: the stacked head-only model measured on the val images → (state, val
    probabilities, no activations, the dvclive run)."""
    val_ds = image_dataset(_paths(raw_dir, val), image_size(params.backbone), params.finetune.batch_size,
                           labels=list(val_labels))
    stacked.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    init_loss, init_acc = stacked.evaluate(val_ds, verbose=0)
    val_probs = stacked.predict(val_ds, verbose=0)
    state = initial_state(init_loss, init_acc, None)
    live = start_live(live_dir, init_loss, init_acc) if live_dir is not None else None
    if live is not None:
        live.end()  # no fit, so no DVCLiveCallback to end the run
    return state, val_probs, None, live


def _activations(cut: Cut, params: Params, boundary: str, folder: Path) -> tuple[Activations, dict]:
    """The bottom's activations of this run, cached in ``folder`` under the key of what decides them, and the
    description of the engine that computes them."""
    engine, engine_desc = bottom_engine()
    key, desc = cache_key(backbone_provenance(params.backbone), boundary, engine_desc, library_versions())
    size = image_size(params.backbone)
    cache = ActivationCache(folder, key, desc, cut.activation_shape)
    acts = Activations(cache, lambda: compile_engine(cut.bottom, size, engine, BOTTOM_BATCH),
                       params.finetune.augment, params.seed, size, BOTTOM_BATCH)
    return acts, engine_desc


def _cut_parity(cut: Cut, s: Stacked, acts: Activations, raw_dir: Path, digest_of: dict) -> float:
    """:func:`pipeline.finetuning.parity.check_cut_parity` on the stacking parity's val images."""
    parity_acts = acts.cache.get_many(acts.keys([digest_of[str(raw_dir / q)] for q in s.parity_paths], None))
    diff = check_cut_parity(cut.top, s.model, parity_acts, s.parity_images)
    log.info("cut parity on %d val images: max |Δp| = %.2e", len(s.parity_paths), diff)
    return diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("raw-dir", "manifest", "classes", "val-features", "head", "model", "history", "metrics"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--live-dir", type=Path, default=None, help="dvclive folder for per-epoch metrics")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="per-epoch training state, resumed from with finetune.resume (HDF5)")
    ap.add_argument("--activation-cache", type=Path, default=None,
                    help="cache of the frozen bottom's activations kept between runs (not a DVC out)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "finetune", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest, classes_json=args.classes, val_features=args.val_features,
            head_path=args.head, model_out=args.model, history_out=args.history, metrics_out=args.metrics,
            params=params, live_dir=args.live_dir, checkpoint=args.checkpoint, activation_cache=args.activation_cache)


if __name__ == "__main__":
    main()
