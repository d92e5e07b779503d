"""Fine-tuning's input: epoch-indexed batches of boundary activations (:mod:`pipeline.finetuning.activations`).

Nothing that shapes epoch ``e`` depends on what ran before it in the process, so a resumed run
reads exactly the batches an uninterrupted one read:

- the order of the training images in epoch ``e`` is a permutation drawn from ``(seed, e)``;
- epoch ``e`` trains on augmented view ``e % finetune.views`` of every image, drawn from (image
  content, seed, view) (:func:`pipeline.data.augment.view_key`), computed the first time any run
  needs it and read from the activation cache after that.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.finetuning.activations import Activations


def epoch_view(epoch: int, views: int) -> int:
    """The augmented view (0-based) epoch ``epoch`` (0-based) trains on: views are cycled."""
    return epoch % views


class EpochGate(keras.callbacks.Callback):
    """Holds the stream back at each epoch's start until Keras begins that epoch (a callback).

    tf.data's prefetch asks for epoch ``e + 1``'s first batch while epoch ``e`` still trains, and that
    batch needs the bottom over a whole view. Behind the gate the view is computed only once fit
    really starts the epoch, so a run that stops early computes no view it does not train on, and the
    bottom does not compete with the training step for the cores (overlapping them showed no reliable
    gain on 2 cores: docs/benchmarks/finetune.md). ``close()`` (at the end of training, or by the caller
    when fit raises) releases a stream still waiting, which then ends.

    The fit's ``first`` epoch is open from the start: it trains whatever happens, and Keras reads a batch
    before any callback runs when it builds the model under a distribution strategy.
    """

    def __init__(self, first: int = 0):
        super().__init__()
        self._cond = threading.Condition()
        self._begun = first
        self._closed = False

    def wait(self, epoch: int) -> bool:
        """Block until epoch ``epoch`` has begun (True) or the gate is closed (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._begun >= epoch)
            return not self._closed

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        with self._cond:
            self._begun = max(self._begun, epoch)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def on_train_end(self, logs=None) -> None:
        self.close()


@dataclass
class TrainData:
    """What the top trains and validates on: the train images (paths, content digests, label indices),
    their activations (computed on demand) and the clean val activations as a dataset (:func:`clean_dataset`)."""
    acts: Activations
    paths: list[str]
    digests: list[bytes]
    labels: list[int]
    n_classes: int
    val: tf.data.Dataset


def training_stream(data: TrainData, batch_size: int, seed: int, epochs: range, views: int,
                    replicas: int = 1, gate: Optional[EpochGate] = None) -> tuple[tf.data.Dataset, int]:
    """Training batches of ``epochs`` (e.g. ``range(first, last)``), back to back → (dataset, steps per epoch).

    Batches are ``(B, h, w, c)`` float32 activations of view :func:`epoch_view` of each image, and
    ``(B,)`` int64 labels. An epoch's missing activations are computed when its first batch is
    asked for and, with ``gate`` (one of fit's callbacks), not before fit begins that epoch: without
    it the stream's prefetch would compute the next view while the current epoch trains. Pass the steps to
    ``fit(steps_per_epoch=...)``: Keras then reads one iterator across epochs, so epoch ``e``
    gets exactly its own batches.

    ``replicas`` > 1 (``batch_size`` is then the global batch): each epoch uses the first
    ``n - n % replicas`` images of its shuffled order, so every batch, the last included, splits
    evenly over the replicas. Keras averages each replica's mean loss, so an uneven split
    (5 images as 3 + 2) would weigh the images of the smaller part more than one device does.
    """
    acts = data.acts
    n = len(data.paths) - len(data.paths) % max(1, replicas)
    steps = math.ceil(n / batch_size)
    salt = seed % 2**32
    labels_arr = np.asarray(data.labels, np.int64)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for e in epochs:
            if gate is not None and not gate.wait(e):
                return
            view = epoch_view(e, views)
            acts.ensure(data.paths, data.digests, view)
            keys = acts.keys(data.digests, view)
            order = np.random.default_rng([salt, e]).permutation(len(data.paths))[:n]
            for b in range(0, n, batch_size):
                rows = order[b:b + batch_size]
                yield acts.cache.get_many([keys[i] for i in rows]), labels_arr[rows]

    shape = acts.cache.shape
    spec = (tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64))
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    # A known length: Keras then neither warns that the stream "ran out of data" at its end nor guesses.
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps * len(epochs)))
    return ds.prefetch(2), steps


def clean_dataset(acts: Activations, paths: Sequence[str], digests: Sequence[bytes], labels: Sequence[int],
                  batch_size: int) -> tf.data.Dataset:
    """The clean activations of ``paths`` (computed now if missing) with their labels, in order (val),
    read from the cache batch by batch on every pass."""
    acts.ensure(paths, digests, None)
    keys = acts.keys(digests, None)
    labels_arr = np.asarray(labels, np.int64)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in range(0, len(keys), batch_size):
            yield acts.cache.get_many(keys[b:b + batch_size]), labels_arr[b:b + batch_size]

    spec = (tf.TensorSpec((None, *acts.cache.shape), tf.float32), tf.TensorSpec((None,), tf.int64))
    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return ds.apply(tf.data.experimental.assert_cardinality(math.ceil(len(keys) / batch_size)))
