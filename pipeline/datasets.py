"""tf.data input pipelines over image files, decoded by :func:`pipeline.images.load_image`."""
from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.images import load_image
from pipeline.params import AugmentParams


def _decode_fn(size: int):
    def decode(path: tf.Tensor) -> tf.Tensor:
        # Pillow releases the GIL while it decodes and resizes, so parallel map calls overlap.
        img = tf.numpy_function(lambda p: load_image(p.decode("utf-8"), size), [path], tf.uint8, stateful=False)
        img.set_shape((size, size, 3))
        return tf.cast(img, tf.float32)

    return decode


def image_dataset(paths: Sequence[str], size: int, batch_size: int, labels: Optional[Sequence[int]] = None,
                  shuffle: bool = False, seed: int = 0,
                  augment: Optional[keras.Model] = None) -> tf.data.Dataset:
    """Batches of ``(B, size, size, 3)`` float32 [0, 255] images (with int64 labels if given).

    Decoding runs in parallel with autotuned parallelism and the next batches are
    prefetched, so the model never waits on JPEG decoding; order is deterministic.
    """
    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    if labels is not None:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(np.asarray(labels, np.int64))))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    decode = _decode_fn(size)
    if labels is not None:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        if labels is None:
            raise ValueError("augmentation is for training batches, which need labels")
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def build_augmentation(params: AugmentParams, seed: int) -> Optional[keras.Model]:
    """Random flip / rotation / zoom / translation on ``(B, S, S, 3)`` float32; None if all off."""
    layers = []
    if params.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if params.rotation > 0:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="reflect", seed=seed + 1))
    if params.zoom > 0:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="reflect", seed=seed + 2))
    if params.translation > 0:
        layers.append(keras.layers.RandomTranslation(params.translation, params.translation,
                                                     fill_mode="reflect", seed=seed + 3))
    return keras.Sequential(layers, name="augment") if layers else None
