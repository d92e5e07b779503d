"""The one function that builds a backbone (from its :mod:`pipeline.backbones.registry` entry), and its provenance.

``build_backbone`` returns a Keras model: raw RGB pixels ``(B, S, S, 3)`` float32 in [0, 255]
→ the backbone's own preprocessing → convolutional base → global pooling → ``(B, D)``
float32 features. Extract, finetune and evaluate all use it, so the features a head is
trained on are exactly what the stacked model computes.
"""
from __future__ import annotations

import logging
import re

import keras
import numpy as np

from pipeline.backbones.registry import RANDOM_INIT_SEED, Backbone, BackboneError, get_spec, resolve
from pipeline.core.params import BackboneParams

log = logging.getLogger(__name__)

# Per-channel statistics of the two classic ImageNet preprocessing conventions.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """Raw [0, 255] RGB → what a backbone was trained on.

    Modes: ``tf`` (x/127.5 − 1), ``caffe`` (RGB→BGR, minus the ImageNet BGR mean) and
    ``raw`` (identity: keras' EfficientNetB*, EfficientNetV2, ConvNeXt and MobileNetV3 rescale
    inside the model).
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


def build_backbone(params: "BackboneParams | Backbone") -> keras.Model:
    """Build the frozen feature extractor: ``(B, S, S, 3)`` float32 [0, 255] → ``(B, D)`` float32.

    ``params``: the ``backbone`` params or the :class:`Backbone` they resolve to. The
    convolutional base is a nested model named ``base``; its layers keep their
    keras.applications names so ``finetune.unfreeze_from`` can refer to them.
    """
    b = params if isinstance(params, Backbone) else resolve(params)
    if b.weights_arg is None:
        # Random init must be the same in every stage, or the cached features would not be what
        # finetune's stacked model computes; a fixed seed makes "none" one reproducible backbone.
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    base = b.spec.build(b.weights_arg, (b.size, b.size, 3))
    base.name = "base"  # type: ignore[misc]
    base.trainable = False
    inputs = keras.Input((b.size, b.size, 3), dtype="float32", name="image")
    x = Preprocess(b.spec.preprocessing, name="preprocess")(inputs)
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D if b.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    outputs = pool(name=f"{b.pooling}_pool")(x)
    return keras.Model(inputs, outputs, name=f"backbone_{b.name}")


def backbone_provenance(params: BackboneParams) -> dict:
    """What determines the features: compared by every stage that reads them."""
    return resolve(params).provenance()


def feature_provenance(params: BackboneParams, classes: list[str]) -> dict:
    """The provenance every feature file and model carries, and every reader checks."""
    return {**backbone_provenance(params), "class_names": list(classes)}


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


# ``finetune.unfreeze_from`` value that means "this backbone's own default boundary".
AUTO = "auto"


def resolve_unfreeze_from(layer_name: str, backbone_name: str) -> str:
    """``finetune.unfreeze_from`` → the layer name it means: ``auto`` is the registry entry's default
    boundary (the last stage or two of that backbone), any other value is returned as given."""
    return get_spec(backbone_name).unfreeze_from if layer_name == AUTO else layer_name


def unfreeze_start(base: keras.Model, layer_name: str, backbone_name: str) -> int:
    """Index of ``layer_name`` (or ``auto``, resolved) in ``base.layers``; :class:`BackboneError` listing the
    valid names if absent."""
    layer_name = resolve_unfreeze_from(layer_name, backbone_name)
    names = [layer.name for layer in base.layers]
    if layer_name not in names:
        raise BackboneError(
            f"finetune.unfreeze_from: {layer_name!r} is not a layer of {backbone_name}; use auto (its default, "
            f"{get_spec(backbone_name).unfreeze_from}) or one of its block boundaries (`python -m pipeline.backbones "
            f"{backbone_name}` shows the share of weights each trains): "
            + ", ".join(block_boundaries(base, backbone_name))
        )
    return names.index(layer_name)


def boundary_shares(base: keras.Model, backbone_name: str) -> list[tuple[str, float]]:
    """Each block boundary of ``base`` with the share of its weights that unfreezing from there trains
    (as :func:`unfreeze_from` does: BatchNormalization stays frozen)."""
    total = count_params(base.weights)
    sizes = [0 if isinstance(layer, keras.layers.BatchNormalization) else count_params(layer.weights)
             for layer in base.layers]
    start = {layer.name: i for i, layer in enumerate(base.layers)}
    return [(name, sum(sizes[start[name]:]) / total) for name in block_boundaries(base, backbone_name)]


def count_params(weights: list) -> int:
    return int(sum(np.prod(w.shape) for w in weights))

