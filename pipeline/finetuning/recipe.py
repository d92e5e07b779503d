"""The fine-tune recipe, in one place: what trains, how fast, and which epoch is kept.

- **What trains** (:func:`unfreeze_from`): the layers from ``finetune.unfreeze_from`` up (``auto``: the
  backbone's own boundary, its last stage or two), BatchNormalization excepted: its statistics stay the
  ImageNet ones, as the backbone runs in inference mode.
- **BatchNorm folding** (:func:`fold_bn_scale`, ``finetune.fold_bn``): each frozen BN's scale moves into
  its trainable conv, so every channel learns at one rate.
- **Optimizer and schedule** (:func:`build_optimizer`): momentum SGD (or Adam / AdamW) at a low peak
  learning rate, a linear warm-up, then cosine decay to 0 at the last epoch; the rate scaled for the
  global batch under several replicas (:func:`replica_lr_scale`).
- **EMA** (``finetune.ema``): an exponential moving average of the trained weights, kept by the optimizer;
  val is measured on the average and the average is what an epoch keeps.
- **Best epoch** (:class:`Tracker`): the epoch of lowest val loss is kept, epoch 0 (the head alone)
  included, so fine-tuning never returns a model worse on val than the head; ``finetune.patience``
  epochs without improvement stop the run.

docs/finetune-recipe.md explains each choice and docs/benchmarks/finetune.md holds the measurements.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import keras
import numpy as np
import tensorflow as tf

from pipeline.backbones.build import unfreeze_start
from pipeline.core.params import FinetuneParams
from pipeline.finetuning.checkpoint import TrainState, save_checkpoint
from pipeline.finetuning.progress import Clock

log = logging.getLogger(__name__)


def unfreeze_from(base: keras.Model, layer_name: str, backbone_name: str) -> int:
    """Make ``layer_name`` and every later layer trainable, except BatchNormalization.

    BN layers stay frozen (and the base is called with training=False) so their moving
    statistics are not destroyed by small fine-tuning batches. Returns the number of
    trainable weights tensors.
    """
    start = unfreeze_start(base, layer_name, backbone_name)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.trainable_weights)



def fold_bn_scale(base: keras.Model) -> int:
    """Move each inference-mode BatchNormalization's per-channel scale into the trainable conv before it.

    BN in inference mode computes ``s * (z - mean) + beta`` with ``s = gamma / sqrt(var + eps)``
    on the conv output ``z = W x (+ b)``. Rewriting ``W <- s W``, ``b <- s b``, ``mean <- s mean``,
    ``gamma <- 1``, ``var <- 1 - eps`` gives the same function (to float rounding) and the same
    architecture, but changes how a gradient step moves it: before, a step ``dW`` changed the
    channel's output by ``s dW`` and SGD's step itself scaled with ``s``, so each channel learnt
    at ``s**2`` times the learning rate (``s`` spans 0.15-48 in EfficientNet-Lite0's top blocks: a
    10^5 spread). After it, every channel learns at the one rate. Only BN layers whose conv is
    trainable are rewritten. Returns how many.
    """
    folded = 0
    for layer in base.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        conv = parents[0].operation if len(parents) == 1 else None
        if not isinstance(conv, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) or not conv.trainable:
            continue
        if not (layer.scale and layer.center) or layer.axis not in (-1, 3):
            continue
        gamma, beta, mean, var = (np.asarray(w, np.float64) for w in layer.get_weights())
        s = gamma / np.sqrt(var + layer.epsilon)
        weights = [np.asarray(w, np.float64) for w in conv.get_weights()]
        kernel = weights[0]
        # Conv2D kernel (kh, kw, in, out); DepthwiseConv2D (kh, kw, in, multiplier), out = in * multiplier.
        weights[0] = kernel * (s.reshape(kernel.shape[2:]) if isinstance(conv, keras.layers.DepthwiseConv2D) else s)
        if len(weights) > 1:
            weights[1] = weights[1] * s
        conv.set_weights([w.astype(np.float32) for w in weights])
        layer.set_weights([np.ones_like(gamma, np.float32), beta.astype(np.float32), (s * mean).astype(np.float32),
                           np.full(var.shape, 1.0 - layer.epsilon, np.float32)])
        folded += 1
    return folded


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
    """``finetune.optimizer`` (sgd with momentum, adam or adamw) with the warm-up + decay schedule, and the
    weight average of ``finetune.ema`` (docs/finetune-recipe.md: why SGD, why warm-up and decay)."""
    lr = learning_rate_schedule(p, steps_per_epoch, replica_lr_scale(p.optimizer, replicas))
    # finetune.ema: Keras keeps the average in optimizer variables (so checkpoints carry it) and updates it
    # inside the compiled train step.
    ema = {"use_ema": True, "ema_momentum": p.ema} if p.ema > 0 else {}
    if p.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=p.momentum, weight_decay=p.weight_decay or None, **ema)
    if p.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=p.weight_decay, **ema)
    return keras.optimizers.Adam(lr, **ema)


def compile_top(model: keras.Model, p: FinetuneParams, steps_per_epoch: int, replicas: int) -> None:
    """Compile what trains with the recipe's optimizer and sparse cross-entropy; call once the trainable set
    is final, so the optimizer sees exactly what trains."""
    model.compile(optimizer=build_optimizer(p, steps_per_epoch, replicas),
                  loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])


class Tracker(keras.callbacks.Callback):
    """Keeps the epoch with the lowest val loss (epoch 0, the head-only model, included), stops
    after ``patience`` epochs without improvement, and checkpoints after every epoch.

    With ``ema_val`` (the val dataset; the optimizer has ``use_ema``) each epoch is measured on the
    optimizer's moving average of the weights instead of the weights as trained, the average is what
    a best epoch keeps, and ``logs`` get its val metrics for the callbacks after this one.
    ``clock`` adds up the wall time of its own val passes (``validate``) and checkpoints (``checkpoint``).
    """

    def __init__(self, state: TrainState, patience: int, checkpoint: Optional[Path], fp: str, ema_val=None):
        super().__init__()
        self.state = state
        self.patience = patience
        self.checkpoint = checkpoint
        self.fp = fp
        self.ema_val = ema_val
        self.clock = Clock()

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """The optimizer's moving average in place of the trained weights, for the ``with`` block."""
        trained = self.model.trainable_variables
        raw = [v.numpy() for v in trained]
        # The optimizer's averages, in the order of the variables it was built with (= trainable_variables),
        # as Keras' own SwapEMAWeights reads them; swapped back from a copy, so training resumes bit-exact.
        for v, a in zip(trained, self.model.optimizer._model_variables_moving_average):
            v.assign(a)
        try:
            yield
        finally:
            for v, a in zip(trained, raw):
                v.assign(a)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        s = self.state
        with self._averaged_weights() if self.ema_val is not None else contextlib.nullcontext():
            if self.ema_val is not None:
                with self.clock.part("validate"):
                    loss, acc = self.model.evaluate(self.ema_val, verbose=0)
                logs["val_loss"], logs["val_accuracy"] = float(loss), float(acc)
            val_loss = float(logs["val_loss"])
            improved = val_loss < s.best_loss
            if improved:  # the weights in the model now: the average with finetune.ema
                s.best_loss, s.best_epoch, s.wait, s.best_weights = val_loss, epoch + 1, 0, self.model.get_weights()
        s.rows.append([epoch + 1, float(logs["loss"]), float(logs["accuracy"]), val_loss,
                       float(logs["val_accuracy"])])
        s.epoch = epoch + 1
        if not improved:
            s.wait += 1
            if s.wait >= self.patience:
                s.stopped = True
                self.model.stop_training = True
                log.info("no val-loss improvement for %d epochs: stopping", s.wait)
        if self.checkpoint is not None:
            with self.clock.part("checkpoint"):
                save_checkpoint(self.checkpoint, self.fp, s, self.model)


def keep_best(model: keras.Model, state: TrainState) -> None:
    """Put the best epoch's weights into ``model``."""
    model.set_weights(state.best_weights)
    log.info("keeping epoch %d (val loss %.4f)", state.best_epoch, state.best_loss)
