"""Stage 6: export the fine-tuned model as a TensorFlow SavedModel for serving.

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
``pipeline.images.load_image`` on the client.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from pipeline.io_utils import (
    PipelineError,
    atomic_dir,
    library_versions,
    setup_logging,
    sha256_file,
    user_errors,
    write_json,
)
from pipeline.models import load_model

log = logging.getLogger(__name__)

# The params this stage reads (none: the model's sidecar says everything), as in dvc.yaml.
PARAMS: tuple[str, ...] = ()

# Max |Δp| allowed between the reloaded export and the Keras model on the same pixels.
EXPORT_TOLERANCE = 1e-5
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


def run(*, model_path: Path, out_dir: Path, meta_out: Path) -> dict:
    """Export ``model_path`` (+ its sidecar) to the SavedModel ``out_dir``; returns the metadata written."""
    model, meta = load_model(model_path)
    if meta.get("kind") != "finetuned":
        raise PipelineError(f"{model_path} is a {meta.get('kind')!r} model; export needs the fine-tuned image model")
    class_names = list(meta["class_names"])
    size = int(meta["provenance"]["image_size"])
    with atomic_dir(out_dir) as tmp:
        tmp.rmdir()  # write_out creates the folder itself
        build_archive(model, class_names, size).write_out(str(tmp), verbose=False)
        diff = check_export(tmp, model, size)
    log.info("exported %s → %s (max |Δp| vs Keras on reload: %.1e)", model_path, out_dir, diff)
    info = {
        "kind": "serving", "format": "tensorflow-saved-model", "signature": "serving_default",
        "inputs": {"images": f"uint8 (B, H, W, 3) RGB; H = W = {size} is used as is, other sizes resized inside"},
        "outputs": {"probabilities": "float32 (B, K)", "predicted_class": "string (B,)",
                    "class_names": "string (B, K)"},
        "class_names": class_names, "image_size": size, "resize": RESIZE_METHOD,
        "source_model": str(model_path), "source_model_sha256": sha256_file(model_path),
        "reload_max_abs_diff": diff, "provenance": meta["provenance"], "versions": library_versions(),
    }
    write_json(meta_out, info)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="fine-tuned .keras model (with its .json sidecar)")
    ap.add_argument("--out", type=Path, required=True, help="SavedModel folder to write")
    ap.add_argument("--meta", type=Path, required=True, help="JSON describing the export (signature, classes)")
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        run(model_path=args.model, out_dir=args.out, meta_out=args.meta)


if __name__ == "__main__":
    main()
