"""Inference engines for the forward-only work (extract, evaluate, predict): one record per engine.

``tensorflow`` runs the Keras model in one compiled function (:func:`pipeline.runtime.inference.compile_uint8`):
the GPU path and the reference. ``onnxruntime`` runs the *same* Keras model converted to ONNX
by tf2onnx (no second definition of any network) on ONNX Runtime's CPU execution provider:
about 1.3-1.8x TensorFlow's throughput on the 2-core CPUs measured (docs/benchmarks/extraction.md),
features within 3e-5 of TensorFlow's (measured: 5e-6 at 224 px, 1.6e-5 at 64 px, on features
up to ~5-6; tests/test_engines.py holds the bound). Extract keeps the converted backbone in its feature
cache (:func:`onnx_backbone`), so a run whose model is cached never imports TensorFlow.

Both take the same uint8 ``(B, S, S, 3)`` batches from the same decode pool and cast to float32
inside the model. Precision is float32 on CPU, forced: :func:`pipeline.runtime.converters.to_onnx`
checks that the graph holds no float16/bfloat16 tensor, and ONNX Runtime's CPU provider
computes in the graph's own types, never lowering precision by itself (unlike e.g. OpenVINO's
default bf16 on AMX/AVX-512 CPUs). Reduced precision on CPU was measured and not kept
(docs/benchmarks/precision.md).

This module imports neither Keras nor TensorFlow at import time: they load only when a model
is built, converted or run on TensorFlow.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional

import numpy as np

from pipeline.core.io import atomic_path, dist_version
from pipeline.runtime.converters import ONNX_OPSET
from pipeline.runtime.inference import Infer

if TYPE_CHECKING:
    import keras

    from pipeline.backbones.registry import Backbone

log = logging.getLogger(__name__)

Engine = Literal["tensorflow", "onnxruntime"]

def _tf_version() -> str:
    return dist_version("tensorflow")


def _ort_version() -> str:
    return (f"onnxruntime {dist_version('onnxruntime')}; tf2onnx {dist_version('tf2onnx')}; "
            f"opset {ONNX_OPSET}; tensorflow {dist_version('tensorflow')}")


@dataclass(frozen=True)
class EngineSpec:
    """What the pipeline needs to know of one engine."""

    name: str
    # Runs on a GPU when TensorFlow sees one (there: mixed_float16 and extract.gpu_batch_size).
    gpu: bool
    # An image's output is the same bits whatever the batch around it (ONNX Runtime's CPU kernels);
    # False: only at one batch shape, which is then part of the feature cache key.
    batch_invariant: bool
    # The version of what computes the outputs (and of its converter): part of the feature cache key.
    version: Callable[[], str]


SPECS: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("tensorflow", gpu=True, batch_invariant=False, version=_tf_version),
    EngineSpec("onnxruntime", gpu=False, batch_invariant=True, version=_ort_version),
)}
ENGINES = tuple(SPECS)


def _gpu_device_nodes() -> bool:
    """Whether a GPU driver's device nodes exist (CUDA, ROCm, WSL): without them TensorFlow sees no GPU."""
    return any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg"))


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU (what ``auto`` decides on).

    On Linux without any GPU device node the answer is no without importing TensorFlow (seconds
    that a CPU run on ONNX Runtime need not pay); otherwise TensorFlow is asked.
    """
    if sys.platform.startswith("linux") and "tensorflow" not in sys.modules and not _gpu_device_nodes():
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def resolve_engine(choice: str, gpu: bool) -> Engine:
    """``*.engine`` → the engine to run: ``auto`` is TensorFlow on a GPU, ONNX Runtime on CPU."""
    if choice == "auto":
        return "tensorflow" if gpu else "onnxruntime"
    if choice not in SPECS:
        raise ValueError(f"unknown inference engine {choice!r}; use auto or one of {ENGINES}")
    return choice  # type: ignore[return-value]


def engine_version(engine: Engine) -> str:
    """The version of the library that computes the outputs (and of its converter)."""
    return SPECS[engine].version()


@dataclass(frozen=True)
class EnginePlan:
    """How a run computes: engine, device, Keras precision policy and batch size."""

    engine: Engine
    on_gpu: bool
    # Keras dtype policy of the model: mixed_float16 on a GPU (float32 outputs), else float32.
    precision: str
    batch_size: int

    def describe(self) -> dict:
        """The engine's part of the feature cache key and of the feature files' attrs."""
        spec = SPECS[self.engine]
        return {"engine": self.engine, "engine_version": spec.version(), "precision": self.precision,
                # TensorFlow's features are bit-identical at one batch shape (the batch + 1 padding slot,
                # pipeline.runtime.inference.compile_uint8), ONNX Runtime's at any.
                "batch_shape": "any" if spec.batch_invariant else self.batch_size + 1}


def plan(choice: str, gpu: bool, batch_size: int, gpu_batch_size: Optional[int] = None) -> EnginePlan:
    """``choice`` (auto | an engine) on a machine with or without a GPU → the :class:`EnginePlan`."""
    engine = resolve_engine(choice, gpu)
    on_gpu = gpu and SPECS[engine].gpu
    return EnginePlan(engine, on_gpu, "mixed_float16" if on_gpu else "float32",
                      gpu_batch_size if on_gpu and gpu_batch_size else batch_size)


def set_keras_precision(precision: str) -> None:
    """Set Keras' global dtype policy before a model is built (explicitly, never inherited from an earlier one)."""
    import keras

    keras.mixed_precision.set_global_policy(precision)


def onnx_session(onnx_bytes: "bytes | str", threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``onnx_bytes`` (a model, or its path; all graph optimizations, which keep
    float32).

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


def session_infer(session) -> Infer:
    """An ONNX Runtime session → ``(B, S, S, 3)`` uint8 → its float32 outputs, ``B`` >= 1.

    ONNX Runtime's CPU kernels compute each image independently of the batch size and of its
    position in the batch, bit for bit (tests/test_engines.py checks it), so unlike
    :func:`pipeline.runtime.inference.compile_uint8` no batch needs padding.
    """
    name = session.get_inputs()[0].name

    def infer(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    return infer


def compile_onnx(model: "keras.Model", size: int, threads: Optional[int] = None) -> Infer:
    """``model`` converted to ONNX and run on ONNX Runtime: ``(B, size, size, 3)`` uint8 → float32 outputs."""
    from pipeline.runtime.converters import to_onnx

    return session_infer(onnx_session(to_onnx(model, size), threads))


def compile_engine(model: "keras.Model", size: int, engine: Engine, batch_size: int,
                   threads: Optional[int] = None) -> Infer:
    """``model`` on ``engine``: uint8 ``(B, size, size, 3)`` → float32 outputs (converted/traced once here).

    ``batch_size``: TensorFlow runs every pass at that one shape (see :func:`pipeline.runtime.inference.compile_uint8`).
    ``threads``: ONNX Runtime's intra-op threads (None: every core this process may use).
    """
    if engine == "tensorflow":
        from pipeline.runtime.inference import compile_uint8

        return compile_uint8(model, size, batch_size)
    if engine == "onnxruntime":
        return compile_onnx(model, size, threads)
    raise ValueError(f"unknown inference engine {engine!r}; use one of {ENGINES}")


# The converted backbone inside a feature cache namespace (pipeline.extraction.cache): that namespace's
# key covers everything that decides the converted graph (backbone provenance, the code that builds
# and converts it, the TensorFlow / Keras / tf2onnx versions, the opset, the precision).
ONNX_FILE = "backbone.onnx"


def onnx_backbone(backbone: "Backbone", key_dir: Path) -> Path:
    """The backbone converted to ONNX, stored as ``key_dir/backbone.onnx``: converted (TensorFlow imported)
    only when that file is missing, else read as it is (no TensorFlow). Returns its path."""
    path = Path(key_dir) / ONNX_FILE
    if path.is_file():
        log.info("converted backbone from the cache: %s", path)
        return path
    from pipeline.backbones.build import build_backbone
    from pipeline.runtime.converters import to_onnx

    set_keras_precision("float32")
    t0 = time.perf_counter()
    data = to_onnx(build_backbone(backbone), backbone.size)
    with atomic_path(path, suffix=".onnx") as tmp:
        Path(tmp).write_bytes(data)
    log.info("backbone built and converted to ONNX in %.1fs (kept in %s)", time.perf_counter() - t0, path)
    return path


def backbone_infer(backbone: "Backbone", run: EnginePlan, key_dir: Path,
                   threads: Optional[int] = None) -> tuple[Infer, int]:
    """The backbone on ``run``'s engine → (uint8 ``(B, S, S, 3)`` → ``(B, D)`` float32 features, ``D``).

    ONNX Runtime: from the converted model in ``key_dir`` (:func:`onnx_backbone`). TensorFlow: built
    and traced under ``run.precision``.
    """
    if run.engine == "onnxruntime":
        session = onnx_session(onnx_backbone(backbone, key_dir).read_bytes(), threads)
        dim = session.get_outputs()[0].shape[-1]
        infer = session_infer(session)
        if not isinstance(dim, int):  # a symbolic dimension: ask the model
            dim = int(infer(np.zeros((1, backbone.size, backbone.size, 3), np.uint8)).shape[-1])
        return infer, int(dim)
    import tensorflow as tf

    from pipeline.backbones.build import build_backbone

    if threads and not run.on_gpu:
        # E.g. a Ray actor's CPUs, not the host's: actors side by side must not oversubscribe.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    set_keras_precision(run.precision)
    model = build_backbone(backbone)
    return compile_engine(model, backbone.size, run.engine, run.batch_size, threads), int(model.output_shape[-1])
