"""Training-time augmentation as a pure function of (image, key): the same views wherever they are drawn.

One random horizontal flip, then one affine warp (rotation, zoom, translation about the
centre) resampled once, bilinear, with reflected borders. Each image's transform is drawn
from its own key (a few integers) with NumPy's ``default_rng(key)``, never from a generator
whose state runs on from call to call, so a view does not depend on which batch or process
computes it, or on what ran before:

- ``extract`` caches the features of ``extract.augmented_views`` views of every training image
  (view ``k`` of an image keyed by its content digest and ``k``), so the head is fitted on the
  distribution fine-tuning trains on, at head cost;
- ``finetune`` draws view ``k`` of an image keyed by its content digest, ``k`` and the seed, in a
  namespace of its own: a resumed run sees the very images an uninterrupted one saw.

The ``augment`` section of params.yaml configures both.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from pipeline.core.params import AugmentParams


def enabled(params: AugmentParams) -> bool:
    return params.flip or params.rotation > 0 or params.zoom > 0 or params.translation > 0


# The namespace of extract's cached views (extract.augmented_views): the head is fitted on these.
EXTRACT_VIEWS = b"augmented-view"


def finetune_views(seed: int) -> bytes:
    """The namespace of fine-tuning's views under ``seed``: deliberately not extract's (docs/finetune.md)."""
    return b"finetune-view" + (seed % 2**64).to_bytes(8, "little")


def view_key(digest: bytes, view: int, namespace: bytes = EXTRACT_VIEWS) -> list[int]:
    """The augmentation key of view ``view`` (0-based) of the image whose content sha256 is ``digest``, in
    ``namespace`` (:data:`EXTRACT_VIEWS` or :func:`finetune_views`): a function of the image's content, not of
    its place in the manifest."""
    h = hashlib.sha256(digest + namespace + view.to_bytes(4, "little")).digest()
    return [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]


def draw(params: AugmentParams, keys: Sequence[Sequence[int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image flips ``(B,)`` bool and projective transforms ``(B, 8)`` float32 for images of ``size`` px.

    A transform maps output pixel coordinates to input coordinates (TensorFlow's convention):
    rotation by up to ``rotation`` of a full turn, zoom by up to ``zoom`` (in or out) and
    shifts by up to ``translation`` of the size, each uniform, about the image centre.
    """
    flips = np.zeros(len(keys), bool)
    transforms = np.zeros((len(keys), 8), np.float32)
    c = (size - 1) / 2.0
    for i, key in enumerate(keys):
        u = np.random.default_rng(list(key)).uniform(-1.0, 1.0, 5)
        flips[i] = params.flip and u[0] < 0
        theta = u[1] * params.rotation * 2.0 * math.pi
        inv_scale = 1.0 + u[2] * params.zoom  # > 1: a larger input region fills the output (zoom out)
        tx, ty = u[3] * params.translation * size, u[4] * params.translation * size
        cos, sin = math.cos(theta) * inv_scale, math.sin(theta) * inv_scale
        # input = R(-theta) / scale · (output - c - t) + c
        transforms[i] = (cos, sin, c - cos * (c + tx) - sin * (c + ty),
                         -sin, cos, c + sin * (c + tx) - cos * (c + ty), 0.0, 0.0)
    return flips, transforms


@tf.function(reduce_retracing=True)
def _apply(images: tf.Tensor, flips: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    images = tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


def augment(images: "np.ndarray | tf.Tensor", params: AugmentParams, keys: Sequence[Sequence[int]]) -> tf.Tensor:
    """``(B, S, S, 3)`` images (uint8 or float32 [0, 255]) → their augmented views, float32 [0, 255].

    ``keys[i]`` decides image ``i``'s flip and warp; each image is warped on its own, so a
    view is bit-identical whatever else is in the batch.
    """
    images = tf.cast(images, tf.float32)
    if not enabled(params) or len(keys) == 0:
        return images
    flips, transforms = draw(params, keys, int(images.shape[1]))
    return _apply(images, tf.constant(flips), tf.constant(transforms))


def augment_uint8(images: np.ndarray, params: AugmentParams, keys: Sequence[Sequence[int]]) -> np.ndarray:
    """:func:`augment` rounded to ``(B, S, S, 3)`` uint8, as a decoded image is: what extract computes the
    cached views' features from (through the same uint8 path as every image)."""
    return np.clip(np.rint(augment(images, params, keys).numpy()), 0, 255).astype(np.uint8)
