"""The cut of backbone + head at ``finetune.unfreeze_from`` (pipeline/finetuning/cut.py): a frozen bottom and a
trainable top made of the stacked model's own layers, which together compute the stacked model; a cut that a skip
connection crosses is refused."""
import keras
import numpy as np
import pytest

from pipeline.backbones.build import Preprocess
from pipeline.backbones.registry import BackboneError
from pipeline.finetuning.cut import cut_at
from pipeline.models.heads import build_stacked


def _backbone(base):
    """As build_backbone arranges one: image → preprocess → base → pooling."""
    image = keras.Input(base.input_shape[1:], name="image")
    x = Preprocess("tf", name="preprocess")(image)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D(name="avg_pool")(base(x, training=False)))


def test_bottom_then_top_is_the_stacked_model_and_the_top_trains_its_layers():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="a")(inp)
    x = keras.layers.BatchNormalization(name="a_bn")(x)
    x = keras.layers.Conv2D(5, 3, strides=2, name="b")(x)
    base = keras.Model(inp, keras.layers.Conv2D(6, 1, name="c")(x), name="base")
    backbone = _backbone(base)
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2, activation="softmax")], name="head")
    stacked = build_stacked(backbone, head)
    cut = cut_at(backbone, head, "b")
    assert cut.boundary == "b" and cut.activation_shape == (8, 8, 4)
    images = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    acts = cut.bottom.predict_on_batch(images)
    assert acts.shape == (3, 8, 8, 4)
    np.testing.assert_allclose(cut.top.predict_on_batch(acts), stacked.predict_on_batch(images), atol=1e-6)
    # The top holds the very variables of the layers from the cut up, the bottom those below: training the
    # top trains the stacked model, and nothing below the cut.
    top_vars = {id(v) for v in cut.top.weights}
    assert all(id(v) in top_vars for name in ("b", "c") for v in base.get_layer(name).weights)
    assert not any(id(v) in top_vars for name in ("a", "a_bn") for v in base.get_layer(name).weights)
    before = cut.top.predict_on_batch(acts)
    kernel = base.get_layer("c").kernel
    kernel.assign(kernel.numpy() * 2)
    after = cut.top.predict_on_batch(acts)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, stacked.predict_on_batch(images), atol=1e-6)

def test_a_cut_that_a_skip_connection_crosses_is_refused():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1, name="a")(inp)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    c = keras.layers.Add(name="c")([a, keras.layers.Conv2D(4, 1, name="d")(b)])
    base = keras.Model(inp, c, name="base")
    image = keras.Input((8, 8, 3))
    x = Preprocess("tf", name="preprocess")(image)
    backbone = keras.Model(image, keras.layers.GlobalAveragePooling2D(name="avg_pool")(base(x)))
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    cut_at(backbone, head, "b")  # only a crosses: fine
    with pytest.raises(BackboneError, match="skip connection"):
        cut_at(backbone, head, "d")  # a and b cross
