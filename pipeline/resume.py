"""What makes fine-tuning resumable: an epoch-indexed training stream, a per-epoch checkpoint
and the best-epoch / early-stopping tracker whose state the checkpoint carries.

A resumed run must compute exactly what an uninterrupted run computes, so nothing that
shapes epoch ``e`` may depend on what happened in the process before it:

- the order of the training images in epoch ``e`` is a permutation drawn from
  ``(seed, e)``, and image ``i``'s augmentation is drawn from ``(seed, e, i)`` alone
  (:mod:`pipeline.augment`; no shuffle buffer or seed generator whose state runs on from
  epoch to epoch);
- the checkpoint holds every model variable (weights and the head's dropout seed state),
  every optimizer variable (momentum, iteration count), the history so far, the best epoch
  with its weights and the early-stopping counter.

A checkpoint is used only when its fingerprint matches the current run: the params that
shape training (all of ``finetune`` except ``resume``, and except ``epochs`` under a constant
learning rate; ``augment``, the seed, the backbone
provenance), the head file, every train/val image's bytes and label, and the library
versions. Anything else starts from epoch 0, with a log line saying why.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import h5py
import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.augment import augment as augment_images
from pipeline.datasets import image_dataset
from pipeline.io_utils import atomic_path, library_versions, sha256_file
from pipeline.params import AugmentParams, Params, as_dict

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class TrainState:
    """Progress of a fine-tune after ``epoch`` finished epochs (0 = nothing trained yet)."""

    epoch: int
    rows: list  # history rows (epoch, loss, accuracy, val_loss, val_accuracy), epoch 0 first
    best_loss: float
    best_epoch: int = 0
    wait: int = 0  # epochs since the last val-loss improvement
    stopped: bool = False  # early stopping ended the run
    best_weights: Optional[list] = field(default=None, repr=False)  # model.get_weights() of best_epoch


def fingerprint(params: Params, provenance: dict, head_path: Path, raw_dir: Path,
                items: Sequence[tuple[str, str, str]], replicas: int = 1, unfreeze_from: str | None = None) -> str:
    """sha256 of everything that shapes the training trajectory; ``items`` (path, label, split), ``replicas``
    (the global batch and learning rate scale with them), ``unfreeze_from`` (the layer that
    ``finetune.unfreeze_from`` resolved to, when it was ``auto``)."""
    # More epochs continue the same run, unless the learning-rate curve depends on their number.
    ignored = ("epochs", "resume") if params.finetune.schedule == "constant" else ("resume",)
    p = {k: v for k, v in as_dict(params.finetune).items() if k not in ignored}
    if unfreeze_from is not None:  # the layer itself: `auto` is another layer when the registry's default changes
        p["unfreeze_from"] = unfreeze_from
    images = hashlib.sha256()
    for path, label, split in tqdm(sorted(items), desc="hash images (checkpoint)", unit="img", file=sys.stderr):
        images.update(json.dumps([path, label, split, sha256_file(raw_dir / path)]).encode())
    doc = {"format": FORMAT, "finetune": p, "augment": as_dict(params.augment), "seed": params.seed,
           **({"replicas": replicas} if replicas > 1 else {}),
           "provenance": provenance,
           "head_sha256": sha256_file(head_path), "images": images.hexdigest(), "versions": library_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def training_stream(paths: Sequence[str], labels: Sequence[int], size: int, batch_size: int,
                    augment: AugmentParams, seed: int, first_epoch: int, epochs: int,
                    replicas: int = 1) -> tuple[tf.data.Dataset, int]:
    """Training batches of epochs ``first_epoch`` .. ``epochs - 1``, back to back → (dataset, steps per epoch).

    Batches are ``(B, size, size, 3)`` float32 [0, 255] images, augmented by
    :func:`pipeline.augment.augment` with image ``i``'s view of epoch ``e`` keyed by
    (seed, e, i), and ``(B,)`` int64 labels. Pass the steps to ``fit(steps_per_epoch=...)``:
    Keras then reads one iterator across epochs, so epoch ``e`` gets exactly its own batches.

    ``replicas`` > 1 (``batch_size`` is then the global batch): each epoch uses the first
    ``n - n % replicas`` images of its shuffled order, so every batch, the last included, splits
    evenly over the replicas. Keras averages each replica's mean loss, so an uneven split
    (5 images as 3 + 2) would weigh the images of the smaller part more than one device does.
    """
    n = len(paths) - len(paths) % max(1, replicas)
    steps = math.ceil(n / batch_size)
    salt = seed % 2**32

    def batches() -> Iterator[tuple[tf.Tensor, tf.Tensor]]:
        for e in range(first_epoch, epochs):
            order = np.random.default_rng([salt, e]).permutation(len(paths))[:n]
            ds = image_dataset([paths[i] for i in order], size, batch_size, labels=[labels[i] for i in order])
            for b, (x, y) in enumerate(ds):
                keys = [[salt, e, int(i)] for i in order[b * batch_size:b * batch_size + len(y)]]
                yield augment_images(x, augment, keys), y

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32), tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2), steps


def save_checkpoint(path: Path, fp: str, state: TrainState, model: keras.Model) -> None:
    """Write the checkpoint atomically: a kill leaves the previous checkpoint, never half of one."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            meta = {k: v for k, v in asdict(state).items() if k != "best_weights"}
            h5.attrs["format"] = FORMAT
            h5.attrs["fingerprint"] = fp
            h5.attrs["state"] = json.dumps(meta)
            for group, values in (("model", [v.numpy() for v in model.variables]),
                                  ("optimizer", [v.numpy() for v in model.optimizer.variables])):
                g = h5.create_group(group)
                for i, a in enumerate(values):
                    g.create_dataset(str(i), data=a)
            # The best weights are stored unless they are epoch 0's (rebuilt on every run) or the
            # current ones (in "model"; never so with finetune.ema: the best are the averaged weights).
            if 0 < state.best_epoch and (state.best_epoch < state.epoch or model.optimizer.use_ema):
                g = h5.create_group("best")
                for i, a in enumerate(state.best_weights):
                    g.create_dataset(str(i), data=a)


def _assign(variables: list, group: h5py.Group, what: str) -> None:
    if len(group) != len(variables):
        raise ValueError(f"{what}: checkpoint has {len(group)} variables, the model {len(variables)}")
    arrays = [group[str(i)][...] for i in range(len(variables))]
    for v, a in zip(variables, arrays):
        if tuple(v.shape) != a.shape:
            raise ValueError(f"{what}: variable {v.path} has shape {tuple(v.shape)}, checkpoint {a.shape}")
    for v, a in zip(variables, arrays):
        v.assign(a)


def restore_checkpoint(path: Path, fp: str, model: keras.Model, initial_weights: list,
                       max_epochs: int) -> Optional[TrainState]:
    """Restore ``model`` (compiled, trainable set as for training) from ``path`` → its state.

    Returns None, with a log line saying why, when there is no usable checkpoint of this run;
    ``model`` is then untouched.
    """
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FORMAT or h5.attrs.get("fingerprint") != fp:
                log.info("%s belongs to another run (params, head, images or versions differ): starting at epoch 0",
                         path)
                return None
            meta = json.loads(h5.attrs["state"])
            if meta["epoch"] > max_epochs:
                log.info("%s is at epoch %d, beyond finetune.epochs = %d: starting at epoch 0", path, meta["epoch"],
                         max_epochs)
                return None
            state = TrainState(**meta)
            saved = [v.numpy() for v in model.variables]
            model.optimizer.build(model.trainable_variables)
            try:
                _assign(model.variables, h5["model"], "model")
                _assign(model.optimizer.variables, h5["optimizer"], "optimizer")
            except ValueError:
                for v, a in zip(model.variables, saved):
                    v.assign(a)
                raise
            if state.best_epoch == 0:
                state.best_weights = initial_weights
            elif "best" in h5:
                state.best_weights = [h5["best"][str(i)][...] for i in range(len(h5["best"]))]
            else:
                state.best_weights = model.get_weights()
    except (OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("cannot resume from %s (%s): starting at epoch 0", path, exc)
        return None
    return state


class Tracker(keras.callbacks.Callback):
    """Keeps the epoch with the lowest val loss (epoch 0, the head-only model, included), stops
    after ``patience`` epochs without improvement, and checkpoints after every epoch.

    With ``ema_val`` (the val dataset; the optimizer has ``use_ema``) each epoch is measured on the
    optimizer's moving average of the weights instead of the weights as trained, the average is what
    a best epoch keeps, and ``logs`` get its val metrics for the callbacks after this one.
    """

    def __init__(self, state: TrainState, patience: int, checkpoint: Optional[Path], fp: str, ema_val=None):
        super().__init__()
        self.state = state
        self.patience = patience
        self.checkpoint = checkpoint
        self.fp = fp
        self.ema_val = ema_val

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
            save_checkpoint(self.checkpoint, self.fp, s, self.model)


def finish(model: keras.Model, state: TrainState) -> None:
    """Put the best epoch's weights into ``model``."""
    model.set_weights(state.best_weights)
    log.info("keeping epoch %d (val loss %.4f)", state.best_epoch, state.best_loss)
