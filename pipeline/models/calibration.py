"""Temperature scaling and the reports that say how far a model's probabilities can be trusted.

numpy + scipy only (no TensorFlow), so any runtime can share these definitions.

- Temperature scaling (Guo et al. 2017): one scalar ``T`` per model, fitted on the val split by
  minimising the val log loss; the calibrated probabilities are ``softmax(log p / T)``, i.e. the
  logits divided by ``T`` (``log p`` differs from the logits by a per-row constant, which softmax
  ignores). ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one;
  the arg-max, so accuracy, never changes. The Keras side (the layer that carries ``T`` inside
  every saved and exported model) is :class:`pipeline.models.heads.Temperature`.
- ECE: top-label expected calibration error over :data:`ECE_BINS` equal-width confidence bins,
  ``sum_b (n_b / N) |acc_b - conf_b|``, where ``conf`` is a row's largest probability and ``acc``
  whether its arg-max is the true class.
- The reliability diagram (per bin: mean confidence, accuracy, count) and the accuracy-vs-coverage
  curve (for each threshold P: the share of rows whose top probability is >= P, and their accuracy),
  which tells a user which ``predict --min-confidence P`` to choose.
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# Probabilities are floored here before the log: float32 softmax outputs can underflow to 0, and
# log 0 = -inf would make the layer's output depend on how each runtime handles infinities.
# 1e-30 is far below any probability that matters and above float32's smallest normal (1.2e-38).
PROB_FLOOR = 1e-30
# Standard deviation of the Gaussian prior on log T that fit_temperature maximises the posterior under
# (T within a factor e^0.5 = 1.65 of 1 at one standard deviation). A val split with few or no mistakes
# (common at 98 % accuracy, and the split early stopping already chose the epoch on) makes the
# plain maximum-likelihood T run off towards sharpening: with no mistake at all it would hit T_MIN.
# The prior keeps T near 1 when the val split says little, and is negligible when it says much
# (measured in docs/benchmarks/calibration.md: dogs_vs_cats' fine-tuned model, 1 mistake in 283 val images,
# T 0.76 → 0.86).
LOG_T_PRIOR_SD = 0.5
# Bounds of the fitted T: wide enough for any real model (fitted values are ~0.5-3), narrow enough
# that a degenerate val split (all correct and confident) cannot drive T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0
# Thresholds of the accuracy-vs-coverage curve: 0.00, 0.01, ..., 0.99, then finer steps near 1,
# where fine-tuned models put most of their predictions.
COVERAGE_THRESHOLDS = np.concatenate([np.round(np.arange(0, 100) / 100, 2), [0.995, 0.999]])


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` (N, K) → ``softmax(log max(p, PROB_FLOOR) / T)`` (N, K) float64, in float64 throughout.

    ``apply_temperature(apply_temperature(p, T), 1 / T)`` gives ``p`` back (to the floor): the
    uncalibrated probabilities of a model that carries ``T``.
    """
    z = np.log(np.maximum(np.asarray(probs, np.float64), PROB_FLOOR)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, its probability clipped at 1e-7 (as evaluate's log loss)."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, prior_sd: float | None = LOG_T_PRIOR_SD) -> float:
    """The ``T`` in [T_MIN, T_MAX] that minimises the log loss of ``apply_temperature(probs, T)`` on ``labels``,
    plus ``(log T)^2 / (2 prior_sd^2)`` (the MAP estimate under a Gaussian prior on ``log T``; None: plain
    maximum likelihood).

    ``probs`` (N, K) the model's uncalibrated val probabilities, ``labels`` (N,) int. A bounded
    scalar search on ``log T`` (the loss is smooth and unimodal in it). With no rows, 1.0.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    logp = np.log(np.maximum(np.asarray(probs, np.float64), PROB_FLOOR))

    def loss(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        penalty = 0.0 if prior_sd is None else log_t ** 2 / (2 * prior_sd ** 2)
        return float(np.sum(lse - z[np.arange(len(labels)), labels]) + penalty)

    res = minimize_scalar(loss, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    # The search's own end points are never exactly T = 1; keep the uncalibrated model when that is no worse.
    return 1.0 if loss(0.0) <= res.fun else t


def fit_on_val(probs: np.ndarray, labels: np.ndarray) -> dict:
    """:func:`fit_temperature` on a model's uncalibrated val probabilities ``(N, K)`` → ``temperature`` and the
    val log loss and ECE before (``*_uncalibrated``) and after: the summary train_head and finetune record."""
    t = fit_temperature(probs, labels)
    cal = apply_temperature(probs, t)
    return {"temperature": t, "val_log_loss_uncalibrated": nll(probs, labels), "val_log_loss": nll(cal, labels),
            "val_ece_uncalibrated": ece(probs, labels), "val_ece": ece(cal, labels)}


def describe(summary: dict) -> str:
    """One log line for a :func:`fit_on_val` summary."""
    return ("temperature {temperature:.3f} fitted on val: log loss {val_log_loss_uncalibrated:.4f} → "
            "{val_log_loss:.4f}, ECE {val_ece_uncalibrated:.4f} → {val_ece:.4f}").format(**summary)


def _confidence(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, np.float64)
    return probs.max(axis=1), (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Top-label reliability diagram: per non-empty equal-width confidence bin, its bounds, its rows' mean
    confidence and accuracy, and its count → list of dicts (``lower, upper, confidence, accuracy, count``)."""
    conf, correct = _confidence(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lower, upper], the first also takes 0: a confidence of exactly 1 is in the last bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = idx == b
        if mask.any():
            rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]),
                         "confidence": float(conf[mask].mean()), "accuracy": float(correct[mask].mean()),
                         "count": int(mask.sum())})
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error: ``sum_b (n_b / N) |acc_b - conf_b|`` over ``n_bins`` equal-width
    confidence bins (see :func:`reliability_bins`). 0 = every bin's accuracy equals its confidence."""
    n = len(labels)
    if n == 0:
        return float("nan")
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability_bins(probs, labels, n_bins)))


def coverage_curve(probs: np.ndarray, labels: np.ndarray,
                   thresholds: np.ndarray = COVERAGE_THRESHOLDS) -> list[dict]:
    """For each threshold P: ``coverage`` (share of rows whose top probability is >= P) and the ``accuracy``
    of those rows → list of dicts (``min_confidence, coverage, accuracy, n``); thresholds that keep no row
    are left out (their accuracy is undefined)."""
    conf, correct = _confidence(probs, labels)
    rows = []
    for p in thresholds:
        kept = conf >= p
        if kept.any():
            rows.append({"min_confidence": float(p), "coverage": float(kept.mean()),
                         "accuracy": float(correct[kept].mean()), "n": int(kept.sum())})
    return rows
