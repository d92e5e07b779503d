"""Augmented views (pipeline/data/augment.py): a pure function of (image, key), so extract can cache them for the
head and fine-tuning draw its own per epoch; flips mirror or keep, a mild warp keeps the picture."""

import numpy as np

from pipeline.core.params import AugmentParams
from pipeline.data.augment import augment, view_key


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_view_depends_on_its_key_alone():
    x = _images(4)
    p = AugmentParams()
    keys = [view_key(bytes([i]), 0) for i in range(4)]
    whole = augment(x, p, keys).numpy()
    # The same image and key in another batch, at another position, gives the same bits.
    alone = augment(np.stack([x[2], x[0]]), p, [keys[2], view_key(b"other", 5)]).numpy()
    np.testing.assert_array_equal(whole[2], alone[0])
    assert not np.array_equal(whole[0], augment(x[:1], p, [view_key(b"\x00", 1)]).numpy()[0])
    assert whole.dtype == np.float32 and whole.shape == x.shape


def test_flip_only_mirrors_or_keeps_and_nothing_on_is_the_identity():
    x = _images(16)
    keys = [[7, i] for i in range(16)]
    flipped = augment(x, AugmentParams(flip=True, rotation=0.0, zoom=0.0, translation=0.0), keys).numpy()
    mirrored = [np.array_equal(f, x[i, :, ::-1].astype(np.float32)) for i, f in enumerate(flipped)]
    kept = [np.array_equal(f, x[i].astype(np.float32)) for i, f in enumerate(flipped)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    off = AugmentParams(flip=False, rotation=0.0, zoom=0.0, translation=0.0)
    np.testing.assert_array_equal(augment(x, off, keys).numpy(), x.astype(np.float32))


def test_warp_keeps_the_picture_recognisable():
    """A mild warp moves pixels, it does not replace the image: the view stays close to the original."""
    grad = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 1, 3))[None]
    view = augment(grad, AugmentParams(flip=False, rotation=0.02, zoom=0.05, translation=0.05), [[1, 2]]).numpy()
    assert 0 < np.abs(view - grad).mean() < 20
