"""The one function that builds a backbone (from its :mod:`pipeline.registry` entry), and its provenance.

``build_backbone`` returns a Keras model: raw RGB pixels ``(B, S, S, 3)`` float32 in [0, 255]
→ the backbone's own preprocessing → convolutional base → global pooling → ``(B, D)``
float32 features. Extract, finetune and evaluate all use it, so the features a head is
trained on are exactly what the stacked model computes.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import keras
import numpy as np

from pipeline.params import BackboneParams
from pipeline.registry import RANDOM_INIT_SEED, Backbone, BackboneError, get_spec, resolve

__all__ = ["AUTO", "Backbone", "BackboneError", "Preprocess", "resolve", "build_backbone", "backbone_provenance",
           "feature_provenance", "get_base", "block_boundaries", "unfreeze_from", "unfreeze_start",
           "resolve_unfreeze_from", "image_size", "resolve_weights", "count_params", "boundary_shares"]

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


def image_size(params: BackboneParams) -> int:
    """The input size in pixels: ``backbone.image_size`` or the backbone's native size."""
    return params.image_size or get_spec(params.name).default_size


def resolve_weights(params: BackboneParams) -> tuple[Optional[str], str, Optional[str]]:
    """``backbone.weights`` → (argument for the builder, weights id, sha256 of the file or None)."""
    b = resolve(params)
    return b.weights_arg, b.weights_id, b.weights_sha256


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


def count_params(weights: list) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.backbones NAME``: the values ``finetune.unfreeze_from`` takes for backbone NAME."""
    import argparse

    from pipeline.registry import REGISTRY

    ap = argparse.ArgumentParser(description="List a backbone's block boundaries (the values finetune.unfreeze_from "
                                             "takes) and the share of its weights each one trains")
    ap.add_argument("name", choices=list(REGISTRY))
    args = ap.parse_args(argv)
    spec = get_spec(args.name)
    base = spec.build(None, (spec.default_size, spec.default_size, 3))  # random init: only the shapes matter
    print(f"{args.name}: {count_params(base.weights):,} weights; native size {spec.default_size} px, smallest "
          f"{spec.min_size}\n{'finetune.unfreeze_from':30s} share of the weights it trains")
    for name, share in boundary_shares(base, args.name):
        print(f"  {name:28s} {share:6.1%}" + ("   <- auto (the default)" if name == spec.unfreeze_from else ""))


if __name__ == "__main__":
    main()
