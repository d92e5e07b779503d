"""Calibration (pipeline/models/calibration.py): temperature scaling fitted on val, ECE, reliability bins and the
accuracy-vs-coverage curve. (The temperature layer in saved models: test_models_heads.py; in every export format:
test_export.py.)"""

import numpy as np
import pytest

from pipeline.models.calibration import (
    COVERAGE_THRESHOLDS,
    apply_temperature,
    coverage_curve,
    ece,
    fit_temperature,
    nll,
    reliability_bins,
)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _overconfident(n=20000, k=5, sharpen=2.0, seed=0):
    """Labels drawn from softmax(z); the 'model' reports softmax(sharpen * z): over-confident by T = sharpen."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p_true = _softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p_true])
    return _softmax(sharpen * z), y, p_true


def test_fit_temperature_recovers_a_known_overconfidence_and_fixes_ece():
    probs, y, _ = _overconfident(sharpen=2.0)
    t = fit_temperature(probs, y)
    assert 1.85 < t < 2.15
    cal = apply_temperature(probs, t)
    assert nll(cal, y) < nll(probs, y) - 0.05
    assert ece(cal, y) < 0.02 < 0.05 < ece(probs, y)
    np.testing.assert_array_equal(cal.argmax(1), probs.argmax(1))  # accuracy never changes
    under, y2, _ = _overconfident(sharpen=0.5, seed=1)
    assert 0.45 < fit_temperature(under, y2) < 0.55  # under-confident: T < 1 sharpens


def test_a_val_split_without_mistakes_does_not_send_the_temperature_to_its_bound():
    probs, y, _ = _overconfident(n=100, seed=2)
    y = probs.argmax(1)  # every val image right: the likelihood alone always wants a sharper model
    assert fit_temperature(probs, y, prior_sd=None) < 0.1
    assert 0.15 < fit_temperature(probs, y) < 1.0  # the prior holds it well inside [T_MIN, 1)


def test_apply_temperature_identity_inverse_and_change():
    probs, _, _ = _overconfident(n=50)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)
    np.testing.assert_allclose(apply_temperature(apply_temperature(probs, 2.5), 1 / 2.5), probs, atol=1e-10)
    assert np.max(np.abs(apply_temperature(probs, 2.5) - probs)) > 0.05
    np.testing.assert_allclose(apply_temperature(probs, 3.0).sum(1), 1.0)


def test_ece_and_reliability_bins_by_hand():
    # 4 rows at confidence 0.9 (3 right), 2 rows at 0.6 (both right), 15 bins of width 1/15.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 0, 0])
    bins = reliability_bins(probs, y)
    assert [(round(b["confidence"], 6), b["accuracy"], b["count"]) for b in bins] == [(0.6, 1.0, 2), (0.9, 0.75, 4)]
    assert bins[0]["lower"] < 0.6 <= bins[0]["upper"] and bins[1]["lower"] < 0.9 <= bins[1]["upper"]
    assert ece(probs, y) == pytest.approx(2 / 6 * 0.4 + 4 / 6 * 0.15)
    # A confidence of exactly 1 falls in the last bin, not out of range.
    assert reliability_bins(np.array([[1.0, 0.0]]), np.array([0]))[-1]["upper"] == 1.0


def test_coverage_curve():
    probs = np.array([[0.95, 0.05], [0.8, 0.2], [0.7, 0.3], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1])  # the two most confident right, the two least wrong
    rows = {r["min_confidence"]: r for r in coverage_curve(probs, y)}
    assert rows[0.0]["coverage"] == 1.0 and rows[0.0]["accuracy"] == 0.5
    assert rows[0.75]["coverage"] == 0.5 and rows[0.75]["accuracy"] == 1.0
    assert rows[0.9]["n"] == 1
    assert 0.96 not in rows  # no prediction that confident: no row
    assert set(rows) <= set(COVERAGE_THRESHOLDS.tolist())
