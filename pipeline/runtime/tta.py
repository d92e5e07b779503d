"""Test-time augmentation: views of a uint8 image batch, and the average of a model's probabilities over them.

numpy only, so evaluate (TensorFlow or ONNX Runtime) and predict (ONNX Runtime alone) share one
definition. A view is a function of the decoded, resized image alone (no randomness), so a TTA
prediction is as reproducible as a plain one. Averaging *probabilities* (not logits) over views
is the usual choice: it is what the per-view outputs of every exported format give, and the
average of calibrated probabilities stays a probability.

Views: ``original`` and ``hflip`` (left-right mirror), the view the training augmentation
(``augment.flip``) already taught the model. docs/benchmarks/calibration.md has the measurements behind the
default ``evaluate.tta``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda x: x,
    "hflip": lambda x: np.ascontiguousarray(x[:, :, ::-1, :]),
}
# The views evaluate (evaluate.tta: true) and predict --tta average over.
TTA_VIEWS = ("original", "hflip")


def views(batch: np.ndarray, names: Sequence[str] = TTA_VIEWS) -> list[np.ndarray]:
    """``batch`` uint8 ``(B, S, S, 3)`` → one ``(B, S, S, 3)`` uint8 array per view in ``names``."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a batch of RGB images (B, S, S, 3), got shape {batch.shape}")
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ValueError(f"unknown TTA view(s) {unknown}; use some of {list(VIEWS)}")
    return [VIEWS[n](batch) for n in names]


def average(per_view: Sequence[np.ndarray]) -> np.ndarray:
    """Per-view probabilities, each ``(B, K)`` → their mean ``(B, K)`` float32 (rows still sum to 1)."""
    if len(per_view) == 0:
        raise ValueError("no views to average")
    return np.mean(np.stack([np.asarray(p, np.float32) for p in per_view]), axis=0)


def predict(infer: Callable[[np.ndarray], np.ndarray], batch: np.ndarray,
            names: Sequence[str] = TTA_VIEWS) -> np.ndarray:
    """``infer`` (uint8 ``(B, S, S, 3)`` → probabilities ``(B, K)``) averaged over the views of ``batch``."""
    return average([infer(v) for v in views(batch, names)])
