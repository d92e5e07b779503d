"""Stage 6: export the fine-tuned model for serving: TensorFlow SavedModel, ONNX and TFLite.

The SavedModel takes what a client has: a batch of raw RGB pixels, ``uint8``
``(B, H, W, 3)``, any H and W (one size per batch). Resizing, the backbone's preprocessing
and the class names are inside it, so it needs neither this project nor Keras to run
(TF Serving, ``tf.saved_model.load``, TFLite converters). Its ``serving_default``
signature returns:

- ``probabilities``: ``(B, K)`` float32 softmax, columns in the order of ``class_names``;
- ``predicted_class``: ``(B,)`` string, the most probable class;
- ``class_names``: ``(B, K)`` string, the same names on every row (a per-row output, as
  TF Serving's row format requires every output to have the batch dimension).

Images already at the model's size (``models/serving.json: image_size``) go straight in and
give the Keras model's probabilities. Other sizes are resized inside by
``tf.image.resize(bilinear, antialias=True)`` and rounded to uint8; that is the same filter as
the Pillow bilinear resize training used, but not bit-identical (and training decodes JPEGs
in libjpeg's draft mode first), so for exact parity resize with
``pipeline.data.images.load_image`` on the client.

The same model as ONNX (``images`` uint8 ``(B, S, S, 3)`` → ``probabilities`` float32 ``(B, K)``,
opset 17, for ONNX Runtime and the many runtimes that read ONNX) and as TFLite (same input
and output, float32 inside, for LiteRT / mobile): pixels at the model's size, preprocessing
inside, class names in the JSON beside them. Every file is reloaded in a fresh ``python -I``
process (its own runtime only, not this project) and must give the Keras model's
probabilities to :data:`EXPORT_TOLERANCE`, or the stage fails. The ``.tflite`` file is run by
LiteRT when installed (``requirements-litert.txt``), else by TensorFlow's ``tf.lite.Interpreter``
with a warning; ``serving.json`` records the runtime that checked each file (``reload_runtime``).

The model ends in its :class:`pipeline.models.heads.Temperature` layer, so every format gives the
calibrated probabilities, the temperature a constant of the graph (``temperature`` in the JSON).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.core.io import (
    PipelineError,
    atomic_dir,
    atomic_path,
    library_versions,
    setup_logging,
    sha256_file,
    user_errors,
    write_json,
)
from pipeline.core.params import DataParams, load_params
from pipeline.models.heads import load_model, model_temperature
from pipeline.runtime.converters import ONNX_OPSET, to_onnx, to_tflite

log = logging.getLogger(__name__)

# The params this stage reads, as in dvc.yaml: the model's sidecar says everything else. The pixel
# limit training ran under is recorded for predict, which refuses larger (untrusted) images.
PARAMS: tuple[str, ...] = ("data.max_image_pixels",)

# Max |Δp| allowed between a reloaded export (any format) and the Keras model on the same pixels.
# All three compute float32; ONNX Runtime and LiteRT sum in other orders than TensorFlow, which
# moves features by ~1e-5 (on values up to ~5) and the softmax outputs by less.
EXPORT_TOLERANCE = 1e-5

# Runs in a fresh `python -I` process: only the format's own runtime, never this project.
# argv: format, model file, input .npy (uint8 pixels), output .npy (float32 probabilities), then
# module names to treat as not installed (tests use it to take the fallback). Prints the runtime.
# A .tflite file is run by LiteRT (ai-edge-litert, the optional requirements-litert.txt tier)
# when installed, else by TensorFlow's own tf.lite.Interpreter: it is checked either way.
RELOAD = r"""
import sys
import numpy as np
fmt, model, pixels, out = sys.argv[1:5]
for name in sys.argv[5:]:
    sys.modules[name] = None
x = np.load(pixels)
if fmt == "onnx":
    import onnxruntime as ort
    runtime = f"onnxruntime {ort.__version__}"
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"images": x})[0]
else:
    try:
        from ai_edge_litert.interpreter import Interpreter
        from importlib.metadata import version
        runtime = f"ai-edge-litert {version('ai-edge-litert')}"
    except ImportError:
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
        runtime = f"tensorflow.lite {tf.__version__} (ai-edge-litert not installed)"
    interp = Interpreter(model_path=model)
    (inp,), (outp,) = interp.get_input_details(), interp.get_output_details()
    interp.resize_tensor_input(inp["index"], x.shape)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    probs = interp.get_tensor(outp["index"])
np.save(out, np.asarray(probs, dtype=np.float32))
print(runtime)
"""
RESIZE_METHOD = "tf.image.resize(method='bilinear', antialias=True), rounded to uint8"


def build_archive(model, class_names: list[str], size: int):
    """Wrap ``model`` ((B, S, S, 3) float32 [0, 255] → (B, K)) in a uint8-in, names-out endpoint."""
    import keras
    import tensorflow as tf

    names = tf.constant(class_names, dtype=tf.string)

    def serve(images: tf.Tensor) -> dict:
        x = tf.cast(images, tf.float32)
        hw = tf.shape(images)[1:3]
        same_size = tf.reduce_all(tf.equal(hw, [size, size]))

        def resize() -> tf.Tensor:
            # Pillow's resize returns uint8, so training never saw fractional pixels: round too.
            y = tf.image.resize(x, (size, size), method="bilinear", antialias=True)
            return tf.clip_by_value(tf.round(y), 0.0, 255.0)

        # Images at the model's size skip the resize so they give exactly the Keras model's output.
        x = tf.cond(same_size, lambda: x, resize)
        x = tf.ensure_shape(x, [None, size, size, 3])
        probs = model(x, training=False)
        batch = tf.shape(probs)[0]
        return {
            "probabilities": probs,
            "predicted_class": tf.gather(names, tf.argmax(probs, axis=-1)),
            "class_names": tf.tile(names[None, :], [batch, 1]),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    return archive


def check_export(path: Path, model, size: int, seed: int = 0) -> float:
    """Reload the SavedModel and compare with ``model`` on random pixels; returns max |Δp|."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    served = tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.constant(x))
    expected = model.predict_on_batch(x.astype(np.float32))
    diff = float(np.max(np.abs(served["probabilities"].numpy() - expected)))
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the exported SavedModel {path} differs from the Keras model by {diff:.2e} "
                           f"(> {EXPORT_TOLERANCE}) on the same pixels; it is not the model that was evaluated")
    return diff


def reload_probabilities(fmt: str, path: Path, pixels: np.ndarray,
                         hide: tuple[str, ...] = ()) -> tuple[np.ndarray, str]:
    """Probabilities of the ``fmt`` (onnx | tflite) file ``path`` on ``pixels`` (uint8 (B, S, S, 3)),
    computed in a fresh ``python -I`` process in an empty folder → ((B, K) float32, the runtime that
    ran it). ``hide``: modules that process treats as not installed."""
    with tempfile.TemporaryDirectory(prefix="export-check-") as tmp:
        np.save(Path(tmp) / "x.npy", pixels)
        proc = subprocess.run([sys.executable, "-I", "-c", RELOAD, fmt, str(Path(path).resolve()), "x.npy", "p.npy",
                               *hide], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"reloading the exported {fmt} file {path} failed:\n{proc.stderr[-2000:]}")
        return np.load(Path(tmp) / "p.npy"), proc.stdout.strip().splitlines()[-1]


def check_file(fmt: str, path: Path, model, size: int, seed: int = 0) -> tuple[float, str]:
    """Reload ``path`` in a fresh process, compare with ``model`` on random pixels → (max |Δp|, runtime)."""
    x = np.random.default_rng(seed).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    expected = model.predict_on_batch(x.astype(np.float32))
    got, runtime = reload_probabilities(fmt, path, x)
    diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(f"the exported {fmt} file {path} gives {got.shape} probabilities differing from the "
                           f"Keras model's {expected.shape} by {diff:.2e} (> {EXPORT_TOLERANCE}) on the same pixels "
                           f"({runtime})")
    return diff, runtime


def write_file_format(fmt: str, out: Path, model, size: int) -> tuple[float, str]:
    """Convert ``model`` to ``fmt`` (onnx | tflite), write ``out`` atomically once it passed its reload check;
    returns (max |Δp|, the runtime that checked it)."""
    data = to_onnx(model, size, output_name="probabilities") if fmt == "onnx" else to_tflite(model, size)
    t0 = time.perf_counter()
    log.info("checking %s: reloading it in a fresh process…", out)
    with atomic_path(out, suffix=f".{fmt}") as tmp:
        Path(tmp).write_bytes(data)
        diff, runtime = check_file(fmt, Path(tmp), model, size)
    if "not installed" in runtime:
        log.warning("%s checked with %s; `pip install -r requirements-litert.txt` to check it with LiteRT, "
                    "the runtime phones use", out, runtime)
    log.info("exported %s (max |Δp| vs Keras on reload in a fresh process with %s: %.1e), checked in %.1fs", out,
             runtime, diff, time.perf_counter() - t0)
    return diff, runtime


def run(*, model_path: Path, out_dir: Path, meta_out: Path, onnx_out: Path | None = None,
        tflite_out: Path | None = None, max_image_pixels: int = DataParams().max_image_pixels) -> dict:
    """Export ``model_path`` (+ its sidecar) to the SavedModel ``out_dir`` and, when given, to ``onnx_out``
    and ``tflite_out``; returns the metadata written to ``meta_out``. ``max_image_pixels``:
    ``data.max_image_pixels``, recorded as the largest image predict decodes by default."""
    model, meta = load_model(model_path)
    if meta.get("kind") != "finetuned":
        raise PipelineError(f"{model_path} is a {meta.get('kind')!r} model; export needs the fine-tuned image model")
    class_names = list(meta["class_names"])
    size = int(meta["provenance"]["image_size"])
    t0 = time.perf_counter()
    log.info("writing the SavedModel %s and checking it on reload…", out_dir)
    with atomic_dir(out_dir) as tmp:
        tmp.rmdir()  # write_out creates the folder itself
        build_archive(model, class_names, size).write_out(str(tmp), verbose=False)
        diff = check_export(tmp, model, size)
    log.info("exported %s → %s (max |Δp| vs Keras on reload: %.1e) in %.1fs", model_path, out_dir, diff,
             time.perf_counter() - t0)
    info = {
        "kind": "serving", "format": "tensorflow-saved-model", "signature": "serving_default",
        "inputs": {"images": f"uint8 (B, H, W, 3) RGB; H = W = {size} is used as is, other sizes resized inside"},
        "outputs": {"probabilities": "float32 (B, K)", "predicted_class": "string (B,)",
                    "class_names": "string (B, K)"},
        "class_names": class_names, "image_size": size, "resize": RESIZE_METHOD,
        # Training's decompression-bomb guard: predict refuses images whose header declares more pixels.
        "max_image_pixels": max_image_pixels,
        # Fitted on val by finetune; inside the graph of every format written here (probabilities are calibrated).
        "temperature": model_temperature(model),
        "source_model": str(model_path), "source_model_sha256": sha256_file(model_path),
        "reload_max_abs_diff": diff, "provenance": meta["provenance"], "versions": library_versions(),
    }
    files = {}
    for fmt, out in (("onnx", onnx_out), ("tflite", tflite_out)):
        if out is not None:
            reload_diff, runtime = write_file_format(fmt, out, model, size)
            files[fmt] = {
                "path": str(out), "sha256": sha256_file(out), "reload_max_abs_diff": reload_diff,
                "reload_runtime": runtime,
                "inputs": {"images": f"uint8 (B, {size}, {size}, 3) RGB, resized with pipeline.data.images.load_image"},
                "outputs": {"probabilities": "float32 (B, K), columns in the order of class_names"},
                "precision": "float32", **({"opset": ONNX_OPSET} if fmt == "onnx" else {}),
            }
    info["files"] = files
    write_json(meta_out, info)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="fine-tuned .keras model (with its .json sidecar)")
    ap.add_argument("--out", type=Path, required=True, help="SavedModel folder to write")
    ap.add_argument("--meta", type=Path, required=True, help="JSON describing the export (signature, classes)")
    ap.add_argument("--onnx", type=Path, default=None, help="also write the model as this ONNX file")
    ap.add_argument("--tflite", type=Path, default=None, help="also write the model as this TFLite file")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "export", PARAMS)
        run(model_path=args.model, out_dir=args.out, meta_out=args.meta, onnx_out=args.onnx,
            tflite_out=args.tflite, max_image_pixels=params.data.max_image_pixels)


if __name__ == "__main__":
    main()
