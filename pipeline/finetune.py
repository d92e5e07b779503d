"""Stage 4: stack backbone + trained head, unfreeze the top blocks, train at a low learning rate.

Starting from the trained head is the point: a randomly initialised head sends large
gradients into the pretrained blocks and wrecks them in the first steps. Before any
training the stacking parity is asserted: on val images, stacked-model probabilities must
equal the head's probabilities on the cached features (else preprocessing or pooling
drifted between extract and here). The epoch kept is the one with the lowest val loss,
epoch 0 (the head-only model) included, so fine-tuning never returns a worse model on val.
With ``finetune.ema`` each epoch is measured, and kept, as the optimizer's moving average of
the weights (:class:`pipeline.tracker.Tracker`).

The frozen layers below ``finetune.unfreeze_from`` never change, so they are not run in the
training step: the stacked model is cut there (:mod:`pipeline.split`), the bottom runs once per
augmented view on an inference engine into a float16 activation cache (:mod:`pipeline.activations`),
and only the top trains, on the stored activations (:mod:`pipeline.train_stream`), validated on
the cached clean val activations. The top is the stacked model's own layers, so the saved model
is the full backbone + head; after training, its probabilities on val images are checked
against the trained top's on the stored activations (split parity). docs/finetune.md has the
measurements.

With ``--checkpoint``, the state after every epoch is saved there (atomically), and with
``finetune.resume`` a run whose checkpoint belongs to the same params, head and images
continues after its last finished epoch and ends with the same model as an uninterrupted
run (see :mod:`pipeline.resume`).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.activations import ActivationCache, Activations, cache_key
from pipeline.backbones import (
    backbone_provenance,
    build_backbone,
    count_params,
    feature_provenance,
    fold_bn_scale,
    get_base,
    image_size,
    resolve_unfreeze_from,
    unfreeze_from,
    unfreeze_start,
)
from pipeline.calibration import describe, fit_on_val
from pipeline.datasets import image_dataset
from pipeline.engines import Engine, compile_engine, engine_version, has_gpu, resolve_engine
from pipeline.features import open_features
from pipeline.images import load_batch
from pipeline.io_utils import library_versions, read_json, setup_logging, sha256_digest, user_errors, write_json
from pipeline.manifest import read_manifest
from pipeline.models import build_stacked, load_model, save_model, with_temperature, without_temperature
from pipeline.params import FinetuneParams, Params, as_dict, load_params
from pipeline.resume import TrainState, fingerprint, restore_checkpoint
from pipeline.split import split_at
from pipeline.tracker import Tracker, finish
from pipeline.train_stream import clean_dataset, training_stream
from pipeline.training import class_weights, write_history

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("seed", "backbone", "augment", "finetune")

PARITY_SAMPLES = 32
PARITY_TOLERANCE = 1e-4
# The trained top on float16-stored activations vs the saved stacked model on the images: float16 rounds
# each activation by up to 2^-11 relative (measured max |Δp| in docs/finetune.md).
SPLIT_TOLERANCE = 5e-3
# Images per pass of the frozen bottom (ONNX Runtime: any batch gives the same bits; TensorFlow: this one shape).
BOTTOM_BATCH = 32


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


class BatchProgress(keras.callbacks.Callback):
    """The batches of each fit epoch as a tqdm bar on stderr, like extract's and evaluate's bars.

    On by default only when stderr is a terminal: there the bar fills in during the epoch and
    gives way to Keras' one line per epoch (``verbose=2``); a log file keeps just those lines.
    """

    def __init__(self, steps: int, epochs: int, enabled: Optional[bool] = None):
        super().__init__()
        self.steps, self.epochs = steps, epochs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Optional[tqdm] = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.bar = tqdm(total=self.steps, desc=f"fine-tune epoch {epoch + 1}/{self.epochs}", unit="batch",
                        leave=False, file=sys.stderr, disable=not self.enabled)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def start_live(live_dir: Path, val_loss: float, val_accuracy: float):
    """A dvclive run in ``live_dir``: step 0 = the head-only model, then one step per epoch.

    dvclive fits the epoch loop: each epoch's metrics reach ``live_dir`` (plots/metrics/*.tsv,
    and metrics.json = the latest epoch) while training runs, and DVC Studio when configured.
    ``dvcyaml=None``: dvc.yaml declares these outputs, dvclive must not rewrite it mid-stage.
    """
    from dvclive import Live

    live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    live.log_metric("eval/loss", float(val_loss))
    live.log_metric("eval/accuracy", float(val_accuracy))
    live.next_step()
    return live


def live_callbacks(live) -> list:
    """dvclive's Keras callback (logs each epoch, ends the run after fit); none without a run."""
    if live is None:
        return []
    from dvclive.keras import DVCLiveCallback

    return [DVCLiveCallback(live=live)]


def log_history(live, rows: list) -> None:
    """Re-log the epochs a resumed run restored, so dvclive's series equal an uninterrupted run's."""
    if live is None:
        return
    for _, loss, acc, val_loss, val_acc in rows:
        for name, value in (("train/loss", loss), ("train/accuracy", acc), ("eval/loss", val_loss),
                            ("eval/accuracy", val_acc)):
            live.log_metric(name, float(value))
        live.next_step()


def default_strategy() -> Optional[tf.distribute.Strategy]:
    """``MirroredStrategy`` over every local GPU when TensorFlow sees more than one; None (one device) otherwise."""
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([g.name for g in gpus]) if len(gpus) > 1 else None


def replica_lr_scale(optimizer: str, replicas: int) -> float:
    """Learning-rate factor for a global batch ``replicas`` × ``finetune.batch_size``: linear for SGD (the
    linear scaling rule of Goyal et al. 2017, which needs the warm-up we have), square root for Adam /
    AdamW, whose steps are already normalized by the gradient's scale."""
    if replicas <= 1:
        return 1.0
    return float(replicas) if optimizer == "sgd" else math.sqrt(replicas)


def learning_rate_schedule(p: FinetuneParams, steps_per_epoch: int,
                           scale: float = 1.0) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to ``learning_rate`` × ``scale`` over ``warmup_epochs``, then constant or a cosine
    decay to 0 at the end of epoch ``epochs``; a function of the optimizer's step count only, so a resumed
    run continues the same curve. A run no longer than the warm-up is all warm-up."""
    peak = p.learning_rate * scale
    total = max(1, p.epochs * steps_per_epoch)
    warm = min(int(round(p.warmup_epochs * steps_per_epoch)), total)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warm else peak, decay_steps=max(1, total - warm),
        alpha=1.0 if p.schedule == "constant" else 0.0,  # alpha = 1: no decay
        warmup_target=peak if warm else None, warmup_steps=warm)


def build_optimizer(p: FinetuneParams, steps_per_epoch: int, replicas: int = 1) -> keras.optimizers.Optimizer:
    """``finetune.optimizer`` (sgd with momentum, adam or adamw) with the warm-up + decay schedule.

    Measured on simpsons_dev (README "Fine-tuning that pays"): with the same warm-up and cosine
    decay, SGD at 3e-4 reached a lower val loss than Adam at 1e-4 or 3e-5; at every learning rate
    that moves the network at all, the epochs at the peak rate raise the val loss before the
    decay brings it down, which the warm-up and the decay keep short.
    """
    lr = learning_rate_schedule(p, steps_per_epoch, replica_lr_scale(p.optimizer, replicas))
    # finetune.ema: Keras keeps the average in optimizer variables (so checkpoints carry it) and updates it
    # inside the compiled train step.
    ema = {"use_ema": True, "ema_momentum": p.ema} if p.ema > 0 else {}
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=p.momentum, weight_decay=p.weight_decay or None, **ema)
    if p.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=p.weight_decay, **ema)
    return keras.optimizers.Adam(lr, **ema)


def _compile(model: keras.Model, p: FinetuneParams, steps_per_epoch: int, replicas: int) -> None:
    model.compile(optimizer=build_optimizer(p, steps_per_epoch, replicas),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])


@dataclass
class TrainData:
    """What the top trains and validates on: the train images (paths, content digests, label indices),
    their activations (computed on demand) and the clean val activations as a dataset."""
    acts: Activations
    paths: list[str]
    digests: list[bytes]
    labels: list[int]
    n_classes: int
    val: tf.data.Dataset


@dataclass
class Resume:
    """The checkpoint file (None: none kept) and this run's fingerprint (:func:`pipeline.resume.fingerprint`)."""
    checkpoint: Optional[Path]
    fp: str


def _train(top: keras.Model, state: TrainState, params: Params, data: TrainData, resume: Resume, live,
           replicas: int) -> tuple[TrainState, bool]:
    """Resume from the checkpoint when it belongs to this run, then fit the remaining epochs of ``top``.

    Returns the final state (history, best epoch and its weights) and whether ``fit`` ran.
    """
    p = params.finetune
    if resume.checkpoint is not None and p.resume:
        restored = restore_checkpoint(resume.checkpoint, resume.fp, top, state.best_weights, p.epochs)
        if restored is not None:
            state = restored
            log.info("resuming from %s after epoch %d (finetune.resume)", resume.checkpoint, state.epoch)
            log_history(live, state.rows[1:])
    if state.epoch >= p.epochs or state.stopped:
        return state, False
    # finetune.batch_size images per replica: one global batch of that many times the replicas.
    train_ds, steps = training_stream(data.acts, data.paths, data.digests, data.labels, p.batch_size * replicas,
                                      params.seed, state.epoch, p.epochs, p.views, replicas)
    # With finetune.ema the Tracker measures val on the averaged weights itself; Keras' own validation
    # would only measure the raw ones.
    top.fit(train_ds, steps_per_epoch=steps, validation_data=None if p.ema else data.val,
            initial_epoch=state.epoch, epochs=p.epochs, verbose=2,
            shuffle=False,  # each epoch's stream is already shuffled
            class_weight=class_weights(np.asarray(data.labels), data.n_classes, p.class_weight),
            callbacks=[BatchProgress(steps, p.epochs),
                       Tracker(state, p.patience, resume.checkpoint, resume.fp, ema_val=data.val if p.ema else None),
                       *live_callbacks(live)])
    return state, True


def calibrate(val_probs: np.ndarray, labels: np.ndarray) -> dict:
    """Fit the kept model's temperature on its val probabilities ``(N, K)`` (labels ``(N,)`` int): its
    ``temperature`` and the val log loss and ECE before and after."""
    summary = fit_on_val(val_probs, labels)
    log.info("fine-tuned model: %s", describe(summary))
    return summary


def bottom_engine() -> tuple[Engine, dict]:
    """The engine that runs the frozen bottom (ONNX Runtime on CPU, TensorFlow on a GPU) and its description
    (part of the activation cache key and of the checkpoint fingerprint)."""
    engine = resolve_engine("auto", has_gpu())
    # TensorFlow's outputs are bit-identical at one batch shape only (pipeline.inference.compile_uint8).
    return engine, {"engine": engine, "engine_version": engine_version(engine),
                    "batch_shape": BOTTOM_BATCH + 1 if engine == "tensorflow" else "any"}


def check_split_parity(top: keras.Model, stacked: keras.Model, acts: np.ndarray, images: np.ndarray) -> float:
    """Max |top(acts) − stacked(images)|: the saved model computes what the top was trained and validated as
    (up to the float16 storage of the activations); raises :class:`ParityError` above tolerance."""
    if len(images) == 0:
        return 0.0
    diff = float(np.max(np.abs(top.predict_on_batch(acts) - stacked.predict_on_batch(images))))
    if not diff <= SPLIT_TOLERANCE:
        raise ParityError(f"split parity failed: the stacked model's probabilities differ from the trained top's on "
                          f"stored activations by {diff:.2e} (> {SPLIT_TOLERANCE}); delete the activation cache "
                          "folder (--activation-cache) and re-run")
    return diff


def file_digests(paths: list[str]) -> list[bytes]:
    """Content sha256 of every file (hashlib releases the GIL on large buffers, so threads overlap I/O)."""
    with ThreadPoolExecutor(4) as pool:
        return list(tqdm(pool.map(sha256_digest, paths, chunksize=64), total=len(paths), desc="hash images",
                         unit="img", file=sys.stderr))


def run(*, raw_dir: Path, manifest: Path, classes_json: Path, val_features: Path, head_path: Path,
        model_out: Path, history_out: Path, metrics_out: Path, params: Params,
        live_dir: Path | None = None, checkpoint: Path | None = None, activation_cache: Path | None = None,
        strategy: Optional[tf.distribute.Strategy] = None) -> dict:
    """Fine-tune and save ``model_out``; returns the metrics written to ``metrics_out``.

    ``strategy`` None: :func:`default_strategy` (MirroredStrategy when TensorFlow sees several GPUs).
    Under a strategy with R replicas each step trains on R × ``finetune.batch_size`` images and the
    learning rate is scaled by :func:`replica_lr_scale`.

    With ``live_dir``, every epoch is also logged with dvclive (see :func:`start_live`).
    With ``checkpoint``, the training state is saved there after every epoch, and resumed
    from when ``finetune.resume`` is on and the checkpoint belongs to this run.
    ``activation_cache``: the folder of the frozen bottom's cached activations (:mod:`pipeline.activations`),
    kept between runs; None: a throw-away folder for this call only.
    """
    t0 = time.perf_counter()
    p = params.finetune
    # finetune.unfreeze_from: auto → the backbone's own boundary; recorded in the metrics and the model.
    boundary = resolve_unfreeze_from(p.unfreeze_from, params.backbone.name)
    classes = read_json(classes_json)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    expected = feature_provenance(params.backbone, classes)
    strategy = strategy if strategy is not None else default_strategy()
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas > 1:
        log.info("%d replicas (%s): global batch %d, learning rate x %.3g", replicas, type(strategy).__name__,
                 p.batch_size * replicas, replica_lr_scale(p.optimizer, replicas))
    size = image_size(params.backbone)
    train = read_manifest(manifest, splits=("train",))
    val = read_manifest(manifest, splits=("val",))
    # Every variable (head, backbone, optimizer) is created under the strategy's scope.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
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
        base = get_base(backbone)
        if p.epochs > 0:  # a bad layer name fails here, before any expensive work
            unfreeze_start(base, boundary, params.backbone.name)
        stacked = build_stacked(backbone, head)
        parity_images = load_batch([str(raw_dir / q) for q in parity_paths], size).astype(np.float32)
        parity = check_parity(stacked, head, parity_images, parity_features)
        log.info("stacking parity on %d val images: max |Δp| = %.2e", len(parity_paths), parity)
        unfrozen = 0
        if p.epochs > 0:
            n_trainable = unfreeze_from(base, boundary, params.backbone.name)
            unfrozen = count_params(base.trainable_weights)
            if p.fold_bn:  # before the split: it reads each BN's single inbound node
                log.info("BatchNorm scale folded into %d unfrozen conv layers (finetune.fold_bn)", fold_bn_scale(base))
            log.info("unfrozen from %s%s: %d trainable tensors, %d of the backbone's %d params (%.0f %%)", boundary,
                     " (finetune.unfreeze_from: auto)" if boundary != p.unfreeze_from else "", n_trainable, unfrozen,
                     count_params(base.weights), 100 * unfrozen / count_params(base.weights))
            split = split_at(backbone, head, boundary)
            # Compiled once, after the trainable set is final, so the optimizer sees exactly what trains.
            # training_stream's steps: whole multiples of the replicas, in global batches.
            _compile(split.top, p, math.ceil((len(train) - len(train) % replicas) / (p.batch_size * replicas)),
                     replicas)
    if p.epochs == 0:  # the head-only model, saved as stacked: nothing trains, no activations
        val_ds = image_dataset([str(raw_dir / it.path) for it in val], size, p.batch_size,
                               labels=[index[it.label] for it in val])
        stacked.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        init_loss, init_acc = stacked.evaluate(val_ds, verbose=0)
        val_probs = stacked.predict(val_ds, verbose=0)
        state = TrainState(epoch=0, rows=[[0, "", "", float(init_loss), float(init_acc)]],
                           best_loss=float(init_loss))
        fitted, live, split_parity, acts = False, None, 0.0, None
        if live_dir is not None:
            live = start_live(live_dir, init_loss, init_acc)
    else:
        with tempfile.TemporaryDirectory(prefix="activations-") as scratch:
            engine, engine_desc = bottom_engine()
            key, desc = cache_key(backbone_provenance(params.backbone), boundary, engine_desc,
                                  library_versions())
            cache = ActivationCache(activation_cache if activation_cache is not None else Path(scratch), key, desc,
                                    split.activation_shape)
            acts = Activations(cache, lambda: compile_engine(split.bottom, size, engine, BOTTOM_BATCH), params.augment,
                               params.seed, size, BOTTOM_BATCH)
            train_paths, val_paths = [str(raw_dir / it.path) for it in train], [str(raw_dir / it.path) for it in val]
            digests = file_digests(train_paths + val_paths)
            train_d, val_d = digests[:len(train)], digests[len(train):]
            val_labels = [index[it.label] for it in val]
            data = TrainData(acts, train_paths, train_d, [index[it.label] for it in train], len(classes),
                             clean_dataset(acts, val_paths, val_d, val_labels, p.batch_size))
            init_loss, init_acc = split.top.evaluate(data.val, verbose=0)
            # Epoch 0 = the head-only model; it has no training loss, so those cells stay empty.
            state = TrainState(epoch=0, rows=[[0, "", "", float(init_loss), float(init_acc)]],
                               best_loss=float(init_loss), best_weights=split.top.get_weights())
            live = start_live(live_dir, init_loss, init_acc) if live_dir is not None else None
            items = [(it.path, it.label, it.split, d) for it, d in zip(train + val, digests)]
            fp = fingerprint(params, expected, head_path, items, engine_desc, replicas,
                             unfreeze_from=boundary) if checkpoint else ""
            state, fitted = _train(split.top, state, params, data, Resume(checkpoint, fp), live, replicas)
            finish(split.top, state)
            # The kept weights' val probabilities, for the temperature: the top on the stored clean val activations
            # (the stacked model's to the split parity below).
            val_probs = split.top.predict(data.val, verbose=0)
            by_path = dict(zip(val_paths, val_d))
            parity_acts = cache.get_many(acts.keys([by_path[str(raw_dir / q)] for q in parity_paths], None))
            split_parity = check_split_parity(split.top, stacked, parity_acts, parity_images)
            log.info("split parity on %d val images: max |Δp| = %.2e", len(parity_paths), split_parity)
    if live is not None and not fitted:
        live.end()  # no fit, so no DVCLiveCallback to end the run
    # The saved model is for inference: everything frozen again, as a loaded model would be used.
    base.trainable = False
    best_acc = next(r[4] for r in state.rows if r[0] == state.best_epoch)
    calibration = calibrate(val_probs, np.asarray([index[it.label] for it in val]))
    metrics = {"best_epoch": state.best_epoch, "val_loss": float(state.best_loss), "val_accuracy": float(best_acc),
               "head_only_val_loss": float(init_loss), "head_only_val_accuracy": float(init_acc),
               "parity_max_abs_diff": parity, "split_parity_max_abs_diff": split_parity,
               "bottom_images_computed": acts.computed if acts is not None else 0,
               "bottom_seconds": round(acts.seconds, 1) if acts is not None else 0.0,
               "unfreeze_from": boundary, "unfrozen_params": unfrozen,
               "unfrozen_share": round(unfrozen / count_params(base.weights), 4),
               "calibration": calibration, "seconds": round(time.perf_counter() - t0, 1)}
    save_model(with_temperature(stacked, calibration["temperature"]), model_out, {
        "kind": "finetuned", "class_names": classes, "provenance": expected, "head_type": head_meta["head_type"],
        "finetune_params": as_dict(p), "unfreeze_from": boundary, "seed": params.seed, "best_epoch": state.best_epoch,
        "temperature": calibration["temperature"], "versions": library_versions(),
    })
    write_history(history_out, state.rows)
    write_json(metrics_out, metrics)
    log.info("fine-tuned: val acc %.4f → %.4f (epoch %d), %.0fs", init_acc, best_acc, state.best_epoch,
             metrics["seconds"])
    return metrics


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
