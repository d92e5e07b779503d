"""tf.data input pipelines over image files, decoded by :func:`pipeline.data.images.load_image`.

TensorFlow is imported by the tf.data builders only: :func:`decode_ahead` serves ONNX Runtime's path without it.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np

from pipeline.data.images import load_image

if TYPE_CHECKING:
    import tensorflow as tf

T = TypeVar("T")


def _decode_fn(size: int):
    import tensorflow as tf

    def decode(path: tf.Tensor) -> tf.Tensor:
        # Pillow releases the GIL while it decodes and resizes, so parallel map calls overlap.
        img = tf.numpy_function(lambda p: load_image(p.decode("utf-8"), size), [path], tf.uint8, stateful=False)
        img.set_shape((size, size, 3))
        return tf.cast(img, tf.float32)

    return decode


def image_dataset(paths: Sequence[str], size: int, batch_size: int, labels: Optional[Sequence[int]] = None,
                  shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Batches of ``(B, size, size, 3)`` float32 [0, 255] images (with int64 labels if given).

    Decoding runs in parallel with autotuned parallelism and the next batches are
    prefetched, so the model never waits on JPEG decoding; order is deterministic.
    """
    import tensorflow as tf

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
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def decode_ahead(paths: Sequence[str], batch_size: int, fn: Callable[[str], T], lookahead: int = 3,
                 workers: Optional[int] = None) -> Iterator[list[T]]:
    """``[fn(path) for path in batch]`` for consecutive batches of ``paths``, in order.

    A thread pool runs ``fn`` ``lookahead`` batches ahead of the consumer; Pillow releases the
    GIL while it decodes, so decoding overlaps the model.
    """
    batches = [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="decode") as pool:
        pending: collections.deque = collections.deque()
        it = iter(batches)
        for batch in it:
            pending.append([pool.submit(fn, p) for p in batch])
            if len(pending) > lookahead:
                break
        while pending:
            futures = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append([pool.submit(fn, p) for p in nxt])
            yield [f.result() for f in futures]
