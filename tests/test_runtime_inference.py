"""Image files → model outputs (pipeline/runtime/inference.py): consecutive batches with one error per path (a file
that does not decode fails the run, or, tolerant, is reported and skipped), and TensorFlow's compiled function that
runs every pass at the one padded shape."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_images

from pipeline.data.images import ImageDecodeError, load_image
from pipeline.runtime.inference import batched_images, batched_outputs, compile_uint8

SIZE = 12


def _mean_rgb(batch: np.ndarray) -> np.ndarray:
    return batch.astype(np.float32).mean((1, 2))


@pytest.fixture
def files(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle",), per_class=5, size=20)
    good = sorted(str(p) for p in raw.rglob("*.png"))
    (tmp_path / "page.jpg").write_text("<html>404</html>")
    # good, good, not an image, good, missing, good, good
    return good[:2] + [str(tmp_path / "page.jpg")] + good[2:3] + [str(tmp_path / "gone.png")] + good[3:]


def test_tolerant_outputs_skip_what_does_not_decode_and_say_why_per_path(files):
    batches = list(batched_outputs(_mean_rgb, files, SIZE, 3, tolerant=True, progress=False))
    errors = [e for _, batch_errors in batches for e in batch_errors]
    assert [len(e) for _, e in batches] == [3, 3, 1]  # one error slot per path, batch by batch
    assert [bool(e) for e in errors] == [False, False, True, False, True, False, False]
    assert "page.jpg" in errors[2] and "HTML" in errors[2] and "gone.png" in errors[4]
    outputs = np.concatenate([out for out, _ in batches if len(out)])
    good = [p for p, e in zip(files, errors) if not e]
    np.testing.assert_array_equal(outputs, _mean_rgb(np.stack([load_image(p, SIZE) for p in good])))
    assert [len(out) for out, _ in batches] == [2, 2, 1]


def test_without_tolerance_a_file_that_does_not_decode_ends_the_run(files):
    with pytest.raises(ImageDecodeError, match="page.jpg"):
        list(batched_outputs(_mean_rgb, files, SIZE, 3, progress=False))
    assert [len(x) for x, _ in batched_images(files[:2], SIZE, 3, progress=False)] == [2]


class _BatchSize(keras.layers.Layer):
    """Each image's mean colour, then the size of the batch it was computed in."""

    def call(self, x):
        n = tf.cast(tf.shape(x)[0], tf.float32)
        return tf.concat([tf.reduce_mean(x, axis=(1, 2)), tf.fill((tf.shape(x)[0], 1), n)], axis=1)


def test_compile_uint8_runs_every_pass_at_one_padded_shape_and_keeps_each_images_output():
    inputs = keras.Input((SIZE, SIZE, 3))
    infer = compile_uint8(keras.Model(inputs, _BatchSize()(inputs)), SIZE, batch_size=4)
    x = np.random.default_rng(0).integers(0, 256, (9, SIZE, SIZE, 3), dtype=np.uint8)
    for n in (1, 3, 4, 5, 9):
        out = infer(x[:n])
        assert out.dtype == np.float32 and out.shape == (n, 4)
        assert (out[:, 3] == 5).all(), (n, out[:, 3])  # batch 4 + the padding slot, whatever n
        np.testing.assert_allclose(out[:, :3], _mean_rgb(x[:n]), rtol=1e-6)
    assert infer(x[:0]).shape == (0,)
