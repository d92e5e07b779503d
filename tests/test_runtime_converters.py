"""Keras → ONNX and TFLite (pipeline/runtime/converters.py): uint8 ``images`` in, the named output out, an open batch
dimension, the Keras model's outputs, and float32 only."""
import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import as_params, tiny_params

from pipeline.backbones.build import build_backbone
from pipeline.runtime import converters

SIZE = 16


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name="tiny")


def _pixels(n):
    return np.random.default_rng(n).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_onnx_takes_uint8_images_at_any_batch_and_gives_the_keras_outputs(model):
    data = converters.to_onnx(model, SIZE, output_name="probabilities")
    graph = onnx.load_from_string(data).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["probabilities"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # the batch stays open
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = _pixels(n)
        (got,) = session.run(None, {"images": x})
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, model.predict_on_batch(x.astype(np.float32)), atol=1e-6)


def test_tflite_takes_uint8_images_and_gives_the_keras_outputs(model):
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    runner = interpreter.Interpreter(model_content=converters.to_tflite(model, SIZE)).get_signature_runner()
    x = _pixels(3)
    out = runner(images=x)
    assert list(out) == ["probabilities"] and out["probabilities"].dtype == np.float32
    np.testing.assert_allclose(out["probabilities"], model.predict_on_batch(x.astype(np.float32)), atol=1e-6)

def test_the_cpu_engine_refuses_reduced_precision():
    params = as_params(tiny_params(**{"backbone.weights": "none"})).backbone
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = build_backbone(params)
        with pytest.raises(RuntimeError, match="reduced-precision"):
            converters.to_onnx(half, 64)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _gelu_model() -> keras.Model:
    """Exact GELU (ConvNeXt's activation) inside a nested model, as a backbone sits inside the stacked model."""
    keras.utils.set_random_seed(1)
    inner_in = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.Rescaling(1 / 64, offset=-2)(inner_in))
    inner = keras.Model(inner_in, keras.layers.Activation("gelu", name="gelu")(x), name="inner")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="outer")


def test_exact_gelu_converts_to_onnx_as_erf_with_the_keras_outputs():
    """TensorFlow's exact GELU kernel uses erfc, which tf2onnx leaves unconverted (ONNX Runtime then refuses the
    graph): the converter traces a copy whose GELUs are written with erf, the same function."""
    model = _gelu_model()
    data = converters.to_onnx(model, SIZE)
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert "Erf" in ops and not ops & {"Erfc", "StatefulPartitionedCall"}
    x = _pixels(4)
    (got,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x})
    np.testing.assert_allclose(got, model.predict_on_batch(x.astype(np.float32)), rtol=1e-5, atol=1e-5)
    # The model itself keeps Keras' GELU: the copy exists only for the conversion.
    assert model.get_layer("inner").get_layer("gelu").activation is keras.activations.gelu
