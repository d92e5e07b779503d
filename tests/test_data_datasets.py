"""Input pipelines over image files (pipeline/data/datasets.py): decode-ahead runs a bounded number of batches ahead
of its consumer, in order; the tf.data pipeline gives the decoder's pixels, with labels, in order."""
import threading
import time

import numpy as np
from conftest import make_images

from pipeline.data.datasets import decode_ahead, image_dataset
from pipeline.data.images import load_image


def test_decode_ahead_gives_every_batch_in_order_whatever_finishes_first():
    paths = [f"img{i:02d}" for i in range(23)]

    def slow_first(p):  # early items finish last
        time.sleep(0.002 * (23 - int(p[3:])))
        return p.upper()

    batches = list(decode_ahead(paths, 5, slow_first, lookahead=2, workers=4))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sum(batches, []) == [p.upper() for p in paths]
    assert list(decode_ahead([], 5, slow_first)) == []


def test_decode_ahead_runs_lookahead_batches_ahead_of_the_consumer_and_no_further():
    batch, lookahead, n_batches = 3, 2, 8
    started: list[str] = []
    lock = threading.Lock()

    def record(p):
        with lock:
            started.append(p)
        return p

    def started_count() -> int:
        with lock:
            return len(started)

    paths = [str(i) for i in range(batch * n_batches)]
    gen = decode_ahead(paths, batch, record, lookahead=lookahead, workers=4)
    for k in range(n_batches):
        assert next(gen) == paths[k * batch:(k + 1) * batch]
        # While the consumer holds batch k, batches k+1 .. k+1+lookahead are under way, and none beyond.
        ahead = min(n_batches, k + 2 + lookahead) * batch
        deadline = time.monotonic() + 10
        while started_count() < ahead and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02)  # a chance for any extra work to start
        assert started_count() == ahead, (k, started_count(), ahead)
    assert next(gen, None) is None


def test_image_dataset_batches_the_decoders_pixels_with_their_labels_in_order(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=3, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    labels = list(range(len(paths)))
    got = list(image_dataset(paths, 16, 4, labels=labels).as_numpy_iterator())
    assert [len(y) for _, y in got] == [4, 4, 1]
    images = np.concatenate([x for x, _ in got])
    assert images.dtype == np.float32 and images.shape == (9, 16, 16, 3)
    np.testing.assert_array_equal(images, np.stack([load_image(p, 16) for p in paths]).astype(np.float32))
    assert np.concatenate([y for _, y in got]).tolist() == labels
    shuffled = [y for _, y in image_dataset(paths, 16, 9, labels=labels, shuffle=True, seed=3).as_numpy_iterator()]
    assert sorted(shuffled[0].tolist()) == labels and shuffled[0].tolist() != labels
