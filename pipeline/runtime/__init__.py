"""Running a network on an engine: Keras → ONNX / TFLite conversion (converters), the engines and their
choice (engines: ONNX Runtime on CPU, TensorFlow on a GPU), batched decode → model outputs (inference)
and test-time augmentation views (tta).

Imports from pipeline: core, data, backbones.
"""
