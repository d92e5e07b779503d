"""Test-time augmentation (pipeline/runtime/tta.py): the views of a uint8 batch and the average over them."""
import numpy as np
import pytest

from pipeline.runtime import tta


def test_views_and_average():
    batch = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    original, flipped = tta.views(batch)
    np.testing.assert_array_equal(original, batch)
    np.testing.assert_array_equal(flipped[:, :, 0], batch[:, :, 3])  # column 0 of the mirror = last column
    np.testing.assert_array_equal(tta.views(flipped)[1], batch)
    p = tta.average([np.array([[0.8, 0.2]]), np.array([[0.4, 0.6]])])
    np.testing.assert_allclose(p, [[0.6, 0.4]])
    with pytest.raises(ValueError, match="unknown TTA view"):
        tta.views(batch, ("original", "vflip"))
    with pytest.raises(ValueError, match="RGB"):
        tta.views(batch[0])


def test_predict_averages_what_the_model_gives_on_each_view():
    batch = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    # A "model" that sees left-right order: the share of brightness in the image's left half.
    def infer(x):
        left = x[:, :, :2].astype(np.float64).sum((1, 2, 3))
        p = left / x.astype(np.float64).sum((1, 2, 3))
        return np.stack([p, 1 - p], 1)
    want = (infer(batch) + infer(batch[:, :, ::-1])) / 2
    np.testing.assert_allclose(tta.predict(infer, batch), want, rtol=1e-6)
    np.testing.assert_allclose(tta.predict(infer, batch, ("original",)), infer(batch), rtol=1e-6)
