"""The stacked model cut at ``finetune.unfreeze_from`` into a frozen bottom and a trainable top.

Everything below the first unfrozen layer is frozen, so its output for a given (view of an)
image never changes during fine-tuning: fine-tuning runs the bottom once per view
(:mod:`pipeline.finetuning.activations`, on an inference engine) and trains only the top on those
stored activations. Both halves are views of the *same* layer objects as the stacked model
(Keras functional models over existing tensors create no new layers, no new weights), so
training the top trains the stacked model, and the saved model is the full backbone + head.

    bottom: (B, S, S, 3) float32 [0, 255] → preprocess → base up to the boundary → (B, h, w, c) float32
    top:    (B, h, w, c) float32 → rest of the base (inference-mode BN) → pooling → head → (B, K)

For EfficientNet-Lite0 at 224 px and ``block6a_expand_conv`` the boundary is 14 × 14 × 112.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras

from pipeline.backbones.build import get_base
from pipeline.backbones.registry import BackboneError


@dataclass(frozen=True)
class Cut:
    bottom: keras.Model
    top: keras.Model
    boundary: str  # the first layer of the top

    @property
    def activation_shape(self) -> tuple[int, ...]:
        """``(h, w, c)`` of one image's boundary activation."""
        return tuple(int(d) for d in self.top.input_shape[1:])


def cut_at(backbone: keras.Model, head: keras.Model, layer_name: str) -> Cut:
    """Cut backbone + head before ``layer_name`` (a layer of the backbone's nested base).

    Call after :func:`pipeline.finetuning.recipe.fold_bn_scale` (which reads each BN's one inbound node:
    the top adds a second). Raises :class:`BackboneError` when more than one tensor crosses the
    cut (a skip connection over it): the top would then need more than the one stored activation.
    """
    base = get_base(backbone)
    layer = base.get_layer(layer_name)
    boundary = layer.input
    if isinstance(boundary, (list, tuple)):
        # A merge without weights that ends a block (inception_v3's mixedN concatenations): training from it
        # trains exactly what follows it, so the cut is its one output.
        if layer.weights:
            raise BackboneError(f"finetune.unfreeze_from: {layer_name!r} takes several inputs; "
                                "cut at a block's first layer")
        boundary = layer.output
    try:
        base_top = keras.Model(boundary, base.output, name="base_top")
    except ValueError as exc:  # Keras: the graph above the cut needs a tensor from below it
        raise BackboneError(f"finetune.unfreeze_from: the layers from {layer_name!r} up also read tensors from "
                            f"below it (a skip connection over the cut): choose a block boundary ({exc})") from exc
    base_bottom = keras.Model(base.input, boundary, name="base_bottom")
    preprocess, pool = backbone.get_layer("preprocess"), backbone.layers[-1]  # build_backbone: preprocess → base → pool

    image = keras.Input(backbone.input_shape[1:], dtype="float32", name="image")
    bottom = keras.Model(image, base_bottom(preprocess(image), training=False), name="bottom")
    act = keras.Input(tuple(boundary.shape[1:]), dtype="float32", name="boundary")
    # As build_stacked: the backbone part in inference mode (frozen BN statistics), the head's dropout
    # following the training flag.
    top = keras.Model(act, head(pool(base_top(act, training=False))), name="top")
    return Cut(bottom=bottom, top=top, boundary=layer_name)
