"""What both training stages (train_head, finetune) share: class weights and the per-epoch history CSV."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.io import write_csv

# Columns of the head's and fine-tuning's per-epoch history CSVs (reports/*_history.csv).
HISTORY_HEADER = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def write_history(path: "str | Path", rows: Sequence[Sequence]) -> None:
    """Per-epoch rows (epoch, loss, accuracy, val_loss, val_accuracy) → CSV, atomically."""
    write_csv(path, HISTORY_HEADER, rows)


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """``head.class_weight`` / ``finetune.class_weight`` → Keras' ``class_weight`` dict.

    ``balanced``: n / (k * count) per class, scikit-learn's formula, so each class carries the
    same total weight in the loss; ``none``: None (every image weighs 1). ``labels`` (N,) int.
    """
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels, np.int64), minlength=n_classes)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"class_weight balanced: class indices {missing} have no training image")
    weights = len(labels) / (n_classes * counts.astype(np.float64))
    return {i: float(w) for i, w in enumerate(weights)}
