"""Keras model → ONNX and TFLite, uint8 pixels in (the cast to float32 inside), float32 only.

Used by :mod:`pipeline.runtime.engines` (the backbone or fine-tuned model on ONNX Runtime) and by the
export stage (the fine-tuned model as ``.onnx`` and ``.tflite`` files). Both formats are made
from the Keras model object itself, so there is no second definition of any network.
"""
from __future__ import annotations

import logging
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# 17: run by every ONNX Runtime since 1.14 and written by tf2onnx 1.17; nothing here needs newer ops.
ONNX_OPSET = 17
INPUT_NAME = "images"


def to_onnx(model: "keras.Model", size: int, output_name: str = "outputs") -> bytes:
    """``model`` ((B, S, S, 3) float32 → (B, D)) as a serialized ONNX graph: uint8 ``images`` → ``output_name``.

    The cast to float32 is inside the graph, as in :func:`pipeline.runtime.inference.compile_uint8`;
    the batch dimension stays open. The traced function is frozen first (every variable and
    captured tensor becomes a constant): tf2onnx's own entry points leave tensors that Keras
    layers capture (e.g. the Normalization statistics of keras' EfficientNetB*) as extra graph
    inputs. Exact GELUs are traced in their erf form (:func:`_erf_gelus`). Raises if the graph holds
    any reduced-precision tensor.
    """
    import tensorflow as tf
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    t0 = time.perf_counter()
    log.info("converting %s to ONNX (opset %d)…", model.name, ONNX_OPSET)
    model = _erf_gelus(model)
    fn = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False))
    frozen = convert_variables_to_constants_v2(
        fn.get_concrete_function(tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME)))
    (inp,), (out,) = frozen.inputs, frozen.outputs
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[inp.name],
                                              output_names=[out.name], opset=ONNX_OPSET)
    _rename(proto, inp.name, INPUT_NAME)
    _rename(proto, out.name, output_name)
    _check_float32(proto, model.name)
    log.info("%s converted to ONNX (opset %d) in %.1fs", model.name, ONNX_OPSET, time.perf_counter() - t0)
    return proto.SerializeToString()


def _gelu_erf(x):
    """Exact GELU, ``x · Φ(x)``, written with erf: what ``gelu(approximate=False)`` computes, in ops tf2onnx
    converts (TensorFlow's own kernel uses erfc, which it does not)."""
    import keras

    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


def _erf_gelus(model: "keras.Model") -> "keras.Model":
    """``model``, or when it holds exact-GELU activation layers (ConvNeXt) a copy of it, same weights, whose
    GELUs are :func:`_gelu_erf`: for tracing only, never saved."""
    import keras

    def exact_gelu(layer) -> bool:
        # Activation("gelu") is always the exact form (gelu's default); the tanh approximation converts as is.
        return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.gelu

    if not any(exact_gelu(layer) for layer in model._flatten_layers()):
        return model

    def clone(layer):
        if exact_gelu(layer):
            return keras.layers.Activation(_gelu_erf, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _rename(proto, old: str, new: str) -> None:
    """Rename graph tensor ``old`` (TensorFlow's ``name:0``) to ``new`` everywhere in ``proto``."""
    graph = proto.graph
    for v in (*graph.input, *graph.output):
        if v.name == old:
            v.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _check_float32(proto, name: str) -> None:
    """Fail if any weight or declared tensor of the ONNX graph is float16 or bfloat16."""
    from onnx import TensorProto

    reduced = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    graph = proto.graph
    bad = [t.name for t in graph.initializer if t.data_type in reduced]
    bad += [v.name for v in (*graph.input, *graph.output, *graph.value_info)
            if v.type.tensor_type.elem_type in reduced]
    if bad:
        raise RuntimeError(f"the ONNX graph of {name} holds reduced-precision tensors ({', '.join(bad[:5])}); "
                           "the CPU engine runs float32 only (a mixed-precision Keras policy leaked into it?)")



def to_tflite(model: "keras.Model", size: int, output_name: str = "probabilities") -> bytes:
    """``model`` as a float32 TFLite flatbuffer: uint8 ``images`` ``(B, size, size, 3)`` → ``output_name``.

    Goes through a SavedModel with that one signature (what TensorFlow's converter reads);
    no optimization is requested, so every weight and activation stays float32.
    """
    import keras
    import tensorflow as tf

    t0 = time.perf_counter()
    log.info("converting %s to TFLite…", model.name)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", lambda x: {output_name: model(tf.cast(x, tf.float32), training=False)},
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8, name=INPUT_NAME)])
    with tempfile.TemporaryDirectory(prefix="tflite-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = []
        converter.target_spec.supported_types = [tf.float32]
        flatbuffer = converter.convert()
    log.info("%s converted to TFLite in %.1fs", model.name, time.perf_counter() - t0)
    return flatbuffer
