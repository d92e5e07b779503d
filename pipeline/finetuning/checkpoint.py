"""Fine-tuning's per-epoch checkpoint: the training state (:class:`TrainState`, kept by
:class:`pipeline.finetuning.recipe.Tracker`) and the model and optimizer variables, and when it may be resumed from.

A resumed run must compute exactly what an uninterrupted run computes. The input of epoch ``e``
depends on ``e`` alone (:mod:`pipeline.finetuning.stream`), and the checkpoint holds every variable of
the model that trains (the top of the cut model, :mod:`pipeline.finetuning.cut`: weights and the head's dropout seed
state), every optimizer variable (momentum, iteration count, the weight average), the history so
far, the best epoch with its weights and the early-stopping counter.

A checkpoint is used only when its fingerprint matches the current run: the params that
shape training (all of ``finetune`` except ``resume``, and except ``epochs`` under a constant
learning rate, ``finetune.augment`` included; the seed, the backbone
provenance), the head file, every train/val image's bytes and label, the engine that computes the
activations and the library versions. Anything else starts from epoch 0, with a log line saying why.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import keras

from pipeline.core.io import atomic_path, library_versions, sha256_file
from pipeline.core.params import Params, as_dict

log = logging.getLogger(__name__)

# 2: the checkpoint holds the top of the split model (pipeline.finetuning.cut), trained on stored activations.
FORMAT = 2


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


def fingerprint(params: Params, provenance: dict, head_path: Path, items: Sequence[tuple[str, str, str, bytes]],
                engine: dict, replicas: int = 1, unfreeze_from: str | None = None) -> str:
    """sha256 of everything that shapes the training trajectory; ``items`` (path, label, split, content sha256)
    of every train and val image, ``engine`` what computes the activations
    (:func:`pipeline.finetuning.activations.cache_key`),
    ``replicas`` (the global batch and learning rate scale with them), ``unfreeze_from`` (the layer that
    ``finetune.unfreeze_from`` resolved to, when it was ``auto``)."""
    # More epochs continue the same run, unless the learning-rate curve depends on their number.
    ignored = ("epochs", "resume") if params.finetune.schedule == "constant" else ("resume",)
    p = {k: v for k, v in as_dict(params.finetune).items() if k not in ignored}
    if unfreeze_from is not None:  # the layer itself: `auto` is another layer when the registry's default changes
        p["unfreeze_from"] = unfreeze_from
    images = hashlib.sha256()
    for path, label, split, digest in sorted(items):
        images.update(json.dumps([path, label, split, digest.hex()]).encode())
    doc = {"format": FORMAT, "finetune": p, "seed": params.seed,
           **({"replicas": replicas} if replicas > 1 else {}),
           "provenance": provenance, "engine": engine,
           "head_sha256": sha256_file(head_path), "images": images.hexdigest(), "versions": library_versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


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
