"""Inference engines for the forward-only work (extract, evaluate, predict) and the ONNX conversion.

``tensorflow`` runs the Keras model in one compiled function (:func:`pipeline.inference.compile_uint8`):
the GPU path and the reference. ``onnxruntime`` runs the *same* Keras model converted once per
run to ONNX by tf2onnx (no second definition of any network) on ONNX Runtime's CPU execution
provider: about 1.3-1.8x TensorFlow's throughput on the 2-core CPUs measured (README,
"Inference engines"), features within 3e-5 of TensorFlow's (measured: 5e-6 at 224 px, 1.6e-5 at 64 px,
on features up to ~5-6; tests/test_engines.py holds the bound).

Both take the same uint8 ``(B, S, S, 3)`` batches from the same decode pool and cast to float32
inside the model. Precision is float32 on CPU, forced: :func:`pipeline.converters.to_onnx`
checks that the graph holds no float16/bfloat16 tensor, and ONNX Runtime's CPU provider
computes in the graph's own types, never lowering precision by itself (unlike e.g. OpenVINO's
default bf16 on AMX/AVX-512 CPUs).
"""
from __future__ import annotations

import logging
import os
from typing import Literal, Optional

import keras
import numpy as np

from pipeline.converters import ONNX_OPSET, to_onnx
from pipeline.inference import Infer, compile_uint8

log = logging.getLogger(__name__)

ENGINES = ("tensorflow", "onnxruntime")
Engine = Literal["tensorflow", "onnxruntime"]


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU (what ``auto`` decides on)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_engine(choice: str, gpu: bool) -> Engine:
    """``extract.engine`` → the engine to run: ``auto`` is TensorFlow on a GPU, ONNX Runtime on CPU."""
    if choice == "auto":
        return "tensorflow" if gpu else "onnxruntime"
    if choice not in ENGINES:
        raise ValueError(f"unknown inference engine {choice!r}; use auto or one of {ENGINES}")
    return choice  # type: ignore[return-value]


def engine_version(engine: Engine) -> str:
    """The version of the library that computes the outputs (and of its converter)."""
    if engine == "tensorflow":
        import tensorflow as tf

        return tf.__version__
    import onnxruntime
    import tf2onnx

    return f"onnxruntime {onnxruntime.__version__}; tf2onnx {tf2onnx.__version__}; opset {ONNX_OPSET}"


def onnx_session(onnx_bytes: bytes, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``onnx_bytes`` (all graph optimizations, which keep float32).

    ``threads``: its intra-op pool; None = the cores this process may use.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One intra-op pool over the cores this process may use (not the host's count, which a
    # container or taskset may cap); batches arrive one at a time, so inter-op threads add nothing.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    opts.intra_op_num_threads = threads or cores or 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def compile_onnx(model: keras.Model, size: int, threads: Optional[int] = None) -> Infer:
    """``model`` on ONNX Runtime: ``(B, size, size, 3)`` uint8 → its float32 outputs, ``B`` >= 1.

    ONNX Runtime's CPU kernels compute each image independently of the batch size and of its
    position in the batch, bit for bit (tests/test_engines.py checks it), so unlike
    :func:`pipeline.inference.compile_uint8` no batch needs padding.
    """
    session = onnx_session(to_onnx(model, size), threads)
    name = session.get_inputs()[0].name

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    return infer


def compile_engine(model: keras.Model, size: int, engine: Engine, batch_size: int,
                   threads: Optional[int] = None) -> Infer:
    """``model`` on ``engine``: uint8 ``(B, size, size, 3)`` → float32 outputs (converted/traced once here).

    ``batch_size``: TensorFlow runs every pass at that one shape (see :func:`pipeline.inference.compile_uint8`).
    ``threads``: ONNX Runtime's intra-op threads (None: every core this process may use).
    """
    if engine == "tensorflow":
        return compile_uint8(model, size, batch_size)
    if engine == "onnxruntime":
        return compile_onnx(model, size, threads)
    raise ValueError(f"unknown inference engine {engine!r}; use one of {ENGINES}")
