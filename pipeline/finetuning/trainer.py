"""Fitting the top: resume from the per-epoch checkpoint when it belongs to this run, then train the remaining
epochs on the activation stream under the recipe's callbacks (best epoch, EMA, checkpoint, progress, dvclive)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from pipeline.core.params import Params
from pipeline.finetuning.checkpoint import TrainState, restore_checkpoint
from pipeline.finetuning.progress import BatchProgress, live_callbacks, log_history
from pipeline.finetuning.recipe import Tracker
from pipeline.finetuning.stream import EpochGate, TrainData, training_stream
from pipeline.models.training import class_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunCheckpoint:
    """Where this run's per-epoch checkpoint goes (None: none kept) and the run's fingerprint
    (:func:`pipeline.finetuning.checkpoint.fingerprint`): only a checkpoint with that fingerprint is resumed."""
    path: Optional[Path]
    fingerprint: str


def initial_state(val_loss: float, val_accuracy: float, weights: Optional[list]) -> TrainState:
    """The state before any epoch: epoch 0 is the head-only model, with its val metrics and (when training
    follows) its weights; it has no training loss, so those cells stay empty."""
    return TrainState(epoch=0, rows=[[0, "", "", float(val_loss), float(val_accuracy)]], best_loss=float(val_loss),
                      best_weights=weights)


def fit_top(top: keras.Model, state: TrainState, params: Params, data: TrainData, checkpoint: RunCheckpoint, live,
            replicas: int) -> tuple[TrainState, bool, dict[str, float]]:
    """Resume from ``checkpoint`` when it belongs to this run, then fit the remaining epochs of ``top``
    (compiled by :func:`pipeline.finetuning.recipe.compile_top`).

    Returns the final state (history, best epoch and its weights), whether ``fit`` ran, and fit's wall
    seconds by part: ``bottom`` (the views computed), ``validate`` (val passes with ``finetune.ema``),
    ``checkpoint`` and ``train`` (the rest: training steps, their input and the callbacks).
    """
    p = params.finetune
    if checkpoint.path is not None and p.resume:
        restored = restore_checkpoint(checkpoint.path, checkpoint.fingerprint, top, state.best_weights, p.epochs)
        if restored is not None:
            state = restored
            log.info("resuming from %s after epoch %d (finetune.resume)", checkpoint.path, state.epoch)
            log_history(live, state.rows[1:])
    if state.epoch >= p.epochs or state.stopped:
        return state, False, {}
    # finetune.batch_size images per replica: one global batch of that many times the replicas.
    # Under a distribution strategy Keras reads a batch from a throw-away iterator before training, and
    # dropping that iterator waits for its stream: a gated stream would never return, so it runs ungated
    # (a multi-GPU run's bottom is on a GPU, and an early stop there may compute one view it does not use).
    gate = EpochGate(state.epoch) if getattr(top, "_distribute_strategy", None) is None else None
    train_ds, steps = training_stream(data, p.batch_size * replicas, params.seed, range(state.epoch, p.epochs),
                                      p.views, replicas, gate)
    # With finetune.ema the Tracker measures val on the averaged weights itself; Keras' own validation
    # would only measure the raw ones.
    tracker = Tracker(state, p.patience, checkpoint.path, checkpoint.fingerprint, ema_val=data.val if p.ema else None)
    t0, bottom0 = time.perf_counter(), data.acts.seconds
    try:
        top.fit(train_ds, steps_per_epoch=steps, validation_data=None if p.ema else data.val,
                initial_epoch=state.epoch, epochs=p.epochs, verbose=2,
                shuffle=False,  # each epoch's stream is already shuffled
                class_weight=class_weights(np.asarray(data.labels), data.n_classes, p.class_weight),
                callbacks=[*([gate] if gate else []), BatchProgress(steps, p.epochs), tracker, *live_callbacks(live)])
    finally:
        if gate is not None:
            gate.close()  # a fit that raised leaves no stream thread waiting
    seconds = {"bottom": data.acts.seconds - bottom0,
               **{part: tracker.clock.seconds[part] for part in ("validate", "checkpoint")}}
    seconds["train"] = time.perf_counter() - t0 - sum(seconds.values())
    return state, True, seconds
