"""Fine-tuning's input (pipeline/finetuning/stream.py): epoch ``e`` trains on view ``e % views`` of every image, in an
order drawn from ``(seed, e)`` alone, so a resumed run reads exactly the batches an uninterrupted one read; under
several replicas each epoch is trimmed to a whole multiple of them; the val set is the clean activations, in order."""
import math

import numpy as np
import pytest
from conftest import StandInBottom, make_images, stand_in_activations

from pipeline.core.io import file_digests
from pipeline.finetuning.stream import TrainData, clean_dataset, epoch_view, training_stream


@pytest.fixture
def data(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=3, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    val = make_images(tmp_path / "val", per_class=1, size=20, seed=1)
    val_paths = sorted(str(p) for p in val.rglob("*.png"))
    bottom = StandInBottom()
    acts = stand_in_activations(tmp_path / "cache", bottom)
    labels = [i % 3 for i in range(len(paths))]
    val_digests = file_digests(val_paths)
    return TrainData(acts, paths, file_digests(paths), labels, 3,
                     clean_dataset(acts, val_paths, val_digests, [0, 1, 2], batch_size=2)), bottom


def _epochs(ds, steps):
    batches = list(ds.as_numpy_iterator())
    assert len(batches) % steps == 0
    return [batches[i:i + steps] for i in range(0, len(batches), steps)]


def test_epoch_e_trains_on_view_e_mod_views_in_an_order_drawn_from_seed_and_e(data):
    data, _ = data
    ds, steps = training_stream(data, batch_size=4, seed=3, epochs=range(0, 3), views=2)
    assert steps == 3 and ds.cardinality().numpy() == 9
    epochs = _epochs(ds, steps)
    labels = np.asarray(data.labels)
    for e, batches in enumerate(epochs):
        assert [len(y) for _, y in batches] == [4, 4, 1]
        order = np.random.default_rng([3, e]).permutation(9)
        x = np.concatenate([b for b, _ in batches])
        y = np.concatenate([b for _, b in batches])
        np.testing.assert_array_equal(x, data.acts.cache.get_many(data.acts.keys(data.digests, e % 2))[order])
        np.testing.assert_array_equal(y, labels[order])
    assert not np.array_equal(np.concatenate([b for b, _ in epochs[0]]), np.concatenate([b for b, _ in epochs[2]]))
    assert [epoch_view(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_an_epochs_batches_do_not_depend_on_where_the_run_started(data):
    data, _ = data
    full, steps = training_stream(data, batch_size=4, seed=3, epochs=range(0, 4), views=3)
    resumed, _ = training_stream(data, batch_size=4, seed=3, epochs=range(2, 4), views=3)
    for a, b in zip(_epochs(full, steps)[2:], _epochs(resumed, steps), strict=True):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("replicas, global_batch", [(2, 4), (4, 8), (3, 6)])
def test_replicas_trim_each_epoch_to_a_whole_multiple_of_them(data, replicas, global_batch):
    data, _ = data
    n = 9 - 9 % replicas
    ds, steps = training_stream(data, batch_size=global_batch, seed=3, epochs=range(0, 2), views=1,
                                replicas=replicas)
    assert steps == math.ceil(n / global_batch)
    for e, batches in enumerate(_epochs(ds, steps)):
        assert all(len(y) % replicas == 0 for _, y in batches), [len(y) for _, y in batches]
        x = np.concatenate([b for b, _ in batches])
        order = np.random.default_rng([3, e]).permutation(9)[:n]  # the first n of the epoch's order
        np.testing.assert_array_equal(x, data.acts.cache.get_many(data.acts.keys(data.digests, 0))[order])


def test_a_views_activations_are_computed_when_its_epoch_starts(data):
    data, bottom = data
    assert bottom.images == 3  # the clean val images, for the val set
    ds, steps = training_stream(data, batch_size=4, seed=0, epochs=range(0, 2), views=2)
    assert bottom.images == 3  # nothing computed before the first batch is asked for
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2 * steps and bottom.images == 3 + 2 * 9


def test_the_val_set_is_the_clean_activations_in_order(data):
    data, _ = data
    batches = list(data.val.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [2, 1] and data.val.cardinality().numpy() == 2
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), [0, 1, 2])
    assert np.concatenate([x for x, _ in batches]).shape == (3, 2, 2, 3)
