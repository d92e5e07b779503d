"""The one path from image files to model outputs: extract (features), evaluate and predict (probabilities).

Images are decoded by :func:`pipeline.data.images.load_image` in a thread pool a few batches
ahead of the model (:func:`pipeline.data.datasets.decode_ahead`) and fed as uint8; the model is
called in one compiled function that casts to float32 inside (4x less data to copy than
float32 batches). :func:`compile_uint8` decides TensorFlow's feature values, so its code is
part of the feature cache's key (:func:`pipeline.extraction.cache.code_fingerprint`). TensorFlow
is imported only by :func:`compile_uint8`: ONNX Runtime's path runs without it.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.datasets import decode_ahead
from pipeline.data.images import load_image

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

Infer = Callable[[np.ndarray], np.ndarray]


def compile_uint8(model: "keras.Model", size: int, batch_size: int) -> Infer:
    """``model`` as one traced function: ``(B, size, size, 3)`` uint8 → its float32 outputs, any ``B`` >= 1.

    Every forward pass has the one shape ``(batch_size + 1, size, size, 3)``: up to
    ``batch_size`` images, then padding (copies of the last image) in the remaining slots,
    the last slot always padding. oneDNN picks kernels by shape, so per-image results differ
    in the last bits between batch shapes; and within one shape, the last slot of the batch
    takes a tail code path of its own (measured on AVX2: slots 0 .. B-2 give the same bits
    for an image whatever the other images, slot B-1 others). With one shape and the last
    slot never a real image, an image's output depends only on the image: that is what makes
    resumed, incremental and re-batched runs equal a fresh run, and why ``batch_size`` is in
    the feature cache key. Traced once, here (a one-off cost of seconds, not the first batch's).
    """
    import tensorflow as tf

    shape = (batch_size + 1, size, size, 3)
    fn = tf.function(lambda x: tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32),
                     input_signature=[tf.TensorSpec(shape, tf.uint8)])
    t0 = time.perf_counter()
    fn(tf.zeros(shape, tf.uint8))
    log.info("%s traced in %.1fs", model.name, time.perf_counter() - t0)

    def infer(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        outs = []
        for start in range(0, len(batch), batch_size):
            part = batch[start:start + batch_size]
            n = len(part)
            part = np.concatenate([part, np.repeat(part[-1:], batch_size + 1 - n, axis=0)])
            outs.append(fn(part).numpy()[:n])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    return infer


@dataclass(frozen=True)
class PixelLimit:
    """Refuse images whose header declares more than ``pixels`` pixels; ``name`` is the setting that raises it."""

    pixels: int
    name: str


def _decode(path: str, size: int, tolerant: bool | PixelLimit) -> tuple[Optional[np.ndarray], str]:
    if not tolerant:
        return load_image(path, size), ""
    limit = tolerant if isinstance(tolerant, PixelLimit) else None
    try:
        return load_image(path, size, *((limit.pixels, limit.name) if limit else ())), ""
    except ValueError as exc:  # load_image wraps every decoding failure in ImageDecodeError
        return None, str(exc)
    except Exception as exc:  # anything else about one file (permissions, vanished, …) must not end the run
        return None, f"{type(exc).__name__}: {exc}"


def batched_images(paths: Sequence[str], size: int, batch_size: int, tolerant: bool | PixelLimit = False,
                   desc: str = "decode", progress: bool = True) -> Iterator[tuple[np.ndarray, list[str]]]:
    """For consecutive batches of ``paths``: (``(M, size, size, 3)`` uint8 images that decoded, one error per path).

    ``tolerant=False``: a file that does not decode raises (prepare checked every file, so that
    means it changed since); ``True``: it gets its error and the run goes on; a :class:`PixelLimit`:
    that too, and a file whose header declares more pixels is refused undecoded (predict).
    """
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for decoded in decode_ahead(paths, batch_size, lambda p: _decode(p, size, tolerant)):
            images = [img for img, _ in decoded if img is not None]
            bar.update(len(decoded))  # before the yield: a consumer may stop after the last batch
            yield (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)), [e for _, e in decoded]


def batched_outputs(infer: Infer, paths: Sequence[str], size: int, batch_size: int,
                    tolerant: bool | PixelLimit = False, desc: str = "infer",
                    progress: bool = True) -> Iterator[tuple[np.ndarray, list[str]]]:
    """For consecutive batches of ``paths``: (outputs of the images that decoded, one error per path).

    ``outputs`` is ``(M, ...)`` float32 for the ``M`` paths whose error is ``""``, in order; ``tolerant``
    as in :func:`batched_images`.
    """
    for images, errors in batched_images(paths, size, batch_size, tolerant, desc, progress):
        yield (infer(images) if len(images) else np.zeros((0,), np.float32)), errors
