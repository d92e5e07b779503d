"""The two checks that the model fine-tuning saves computes what it was trained and validated as.

- **Stacking parity**, before any training: on val images, the stacked model (backbone + head) must give
  the head's probabilities on the cached features of the same images, or preprocessing, image size or
  pooling drifted between extract and finetune.
- **Cut parity**, after training: the saved stacked model on the images against the trained top on the
  stored activations (:mod:`pipeline.finetuning.cut`), equal up to the float16 storage of the activations.
"""
from __future__ import annotations

import keras
import numpy as np

PARITY_SAMPLES = 32
PARITY_TOLERANCE = 1e-4
# The trained top on float16-stored activations vs the saved stacked model on the images: float16 rounds
# each activation by up to 2^-11 relative (measured max |Δp| in docs/benchmarks/finetune.md).
CUT_TOLERANCE = 5e-3


class ParityError(RuntimeError):
    """The stacked model does not compute what the head was trained on."""


def check_parity(stacked: keras.Model, head: keras.Model, images: np.ndarray, features: np.ndarray) -> float:
    """Max |stacked(images) − head(features)|; raises :class:`ParityError` above tolerance.

    ``images`` (N, S, S, 3) float32 [0, 255]; ``features`` (N, D) the cached features of the
    same images.
    """
    if len(images) == 0:
        return 0.0
    p_stacked = stacked.predict_on_batch(images)
    p_head = head.predict_on_batch(features)
    diff = float(np.max(np.abs(p_stacked - p_head)))
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(
            f"stacking parity failed: stacked-model probabilities differ from the head's on cached features by "
            f"{diff:.2e} (> {PARITY_TOLERANCE}); preprocessing, image size or pooling drifted since extract. "
            "Re-run `dvc repro extract train_head`."
        )
    return diff


def check_cut_parity(top: keras.Model, stacked: keras.Model, acts: np.ndarray, images: np.ndarray) -> float:
    """Max |top(acts) − stacked(images)|: the saved model computes what the top was trained and validated as
    (up to the float16 storage of the activations); raises :class:`ParityError` above tolerance."""
    if len(images) == 0:
        return 0.0
    diff = float(np.max(np.abs(top.predict_on_batch(acts) - stacked.predict_on_batch(images))))
    if not diff <= CUT_TOLERANCE:
        raise ParityError(f"cut parity failed: the stacked model's probabilities differ from the trained top's on "
                          f"stored activations by {diff:.2e} (> {CUT_TOLERANCE}); delete the activation cache "
                          "folder (--activation-cache) and re-run")
    return diff
