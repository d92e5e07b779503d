"""The one head builder, the logreg → Keras conversion, the stacked model, the temperature layer,
and model files with their provenance sidecar (what the training stages share besides: :mod:`pipeline.models.training`).

A head maps pooled features ``(B, D)`` float32 → class probabilities ``(B, K)`` float32
(softmax, also for K = 2, where a 2-way softmax equals a sigmoid on the logit difference).
Every saved model (``head.keras``, ``model.keras``) ends in a :class:`Temperature` layer that
holds the model's fitted temperature, so the model file and every format exported from it
give calibrated probabilities (:mod:`pipeline.models.calibration`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import keras
import numpy as np

import pipeline.backbones.build  # noqa: F401  (registers the Preprocess layer for deserialization)
from pipeline.core.io import atomic_path, read_json, sha256_file, write_json
from pipeline.extraction.features import ProvenanceError, check_provenance
from pipeline.models.calibration import PROB_FLOOR


def build_head(input_dim: int, n_classes: int, hidden_units: int = 0, dropout: float = 0.0,
               seed: Optional[int] = None) -> keras.Model:
    """Dropout → [Dense(hidden, relu) → Dropout] → Dense(K, softmax); input ``(B, D)``."""
    inputs = keras.Input((input_dim,), dtype="float32", name="features")
    x = inputs
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    if hidden_units > 0:
        x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=None if seed is None else seed + 1, name="hidden_dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="head")


def logreg_to_dense_weights(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
                            scale: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``StandardScaler`` + ``LogisticRegression`` into one softmax Dense layer.

    ``coef`` (K, D) or (1, D) for a binary model; returns kernel ``(D, K)`` and bias ``(K,)``
    float32 such that softmax(x @ kernel + bias) equals sklearn's ``predict_proba(x)``.
    Standardization is linear, so z = W((x − μ)/σ) + b = (W/σ)x + (b − W(μ/σ)).
    For binary sklearn models p(1) = σ(w·x + b); a 2-way softmax over logits (0, w·x + b)
    gives exactly that.
    """
    coef = np.asarray(coef, np.float64)
    intercept = np.asarray(intercept, np.float64)
    w = coef / scale[None, :]
    b = intercept - (coef * (mean / scale)[None, :]).sum(axis=1)
    if n_classes == 2 and w.shape[0] == 1:
        w = np.concatenate([np.zeros_like(w), w], axis=0)
        b = np.concatenate([np.zeros_like(b), b], axis=0)
    return w.T.astype(np.float32), b.astype(np.float32)


def build_stacked(backbone: keras.Model, head: keras.Model) -> keras.Model:
    """Image ``(B, S, S, 3)`` float32 [0, 255] → backbone (inference-mode BN) → head → ``(B, K)``.

    The backbone is always called with training=False, so BatchNormalization keeps using its
    ImageNet moving statistics while the top blocks fine-tune; the head's dropout still
    follows the training flag.
    """
    inputs = keras.Input(backbone.input_shape[1:], dtype="float32", name="image")
    features = backbone(inputs, training=False)
    outputs = head(features)
    return keras.Model(inputs, outputs, name="stacked")


# The name of the Temperature layer at the end of every saved model.
TEMPERATURE_LAYER = "temperature"


@keras.saving.register_keras_serializable(package="pipeline")
class Temperature(keras.layers.Layer):
    """Temperature scaling: class probabilities ``(B, K)`` → ``softmax(log max(p, PROB_FLOOR) / T)`` ``(B, K)``.

    ``log p`` equals the logits up to a per-row constant, so this is softmax(logits / T), computed
    from the probabilities the head's softmax already gives (the head needs no second, logit output).
    ``T`` is a constant of the layer's config (not a weight: nothing trains it), so it is inside
    the graph of every export (SavedModel, ONNX, TFLite) as one scalar. Numerically the same as
    :func:`pipeline.models.calibration.apply_temperature`.
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def call(self, probs):
        p = keras.ops.maximum(keras.ops.cast(probs, "float32"), PROB_FLOOR)
        return keras.ops.softmax(keras.ops.log(p) * (1.0 / self.temperature), axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


def without_temperature(model: keras.Model) -> keras.Model:
    """The model's uncalibrated part: ``model`` itself when it has no :class:`Temperature` layer, else the
    functional model up to that layer's input (same layers, same weights)."""
    try:
        layer = model.get_layer(TEMPERATURE_LAYER)
    except ValueError:
        return model
    return keras.Model(model.inputs, layer.input, name=model.name)


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` (outputs probabilities ``(B, K)``) with its temperature set to ``temperature``: any
    :class:`Temperature` layer it has is replaced, so the result always has exactly one, at the end."""
    inner = without_temperature(model)
    outputs = Temperature(temperature, name=TEMPERATURE_LAYER)(inner.outputs[0])
    return keras.Model(inner.inputs, outputs, name=inner.name)


def model_temperature(model: keras.Model) -> float:
    """The temperature a model applies: its :class:`Temperature` layer's, or 1.0 (uncalibrated) without one."""
    try:
        return float(model.get_layer(TEMPERATURE_LAYER).temperature)
    except ValueError:
        return 1.0


def save_model(model: keras.Model, path: "str | Path", meta: dict) -> None:
    """Save ``model`` atomically as .keras plus a ``<stem>.json`` sidecar with its provenance.

    The sidecar records the model file's sha256, so a reader can tell a sidecar that does not
    belong to the model next to it.
    """
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    write_json(meta_path(path), {**meta, "model_sha256": sha256_file(path)})


def meta_path(path: "str | Path") -> Path:
    path = Path(path)
    return path.with_suffix(".json")


def load_model(path: "str | Path", expected: Optional[dict] = None) -> tuple[keras.Model, dict]:
    """Load a .keras model and its sidecar; check both belong together and match ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model not found; run `dvc repro` for the stage that writes it")
    meta = read_json(meta_path(path))
    if meta.get("model_sha256") != sha256_file(path):
        raise ProvenanceError(
            f"{meta_path(path)} does not describe {path} (sha256 differs); re-run the stage that writes it")
    if expected is not None:
        check_provenance(str(path), meta.get("provenance", {}), expected, "re-run `dvc repro` (or fix params.yaml)")
    model = keras.models.load_model(path, compile=False)
    if "temperature" in meta and not np.isclose(model_temperature(model), meta["temperature"], rtol=1e-6):
        raise ProvenanceError(f"{path} applies temperature {model_temperature(model)}, its sidecar "
                              f"{meta_path(path)} says {meta['temperature']}; re-run the stage that writes it")
    return model, meta


def predict_features(head: keras.Model, ff, rows: int = 8192) -> np.ndarray:
    """The head's probabilities on every row of the open feature file ``ff``
    (:class:`pipeline.extraction.features.FeatureFile`),
    read ``rows`` at a time so the (N, D) features are never in memory at once → (N, C) float32."""
    parts = [head.predict(ff.features(a, b), batch_size=1024, verbose=0) for a, b in ff.blocks(rows)]
    return np.concatenate(parts) if parts else np.zeros((0, int(head.output_shape[-1])), np.float32)
