"""The dense head streams its features from HDF5 in blocks: every training row once per epoch, a new
deterministic order each epoch, and never more than one window of blocks in memory."""
import h5py
import numpy as np

from pipeline import train_head
from pipeline.extraction.features import FeatureSet, create_feature_file, open_features


def _feature_file(path, n=23, dim=3, views=2):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    vws = rng.normal(size=(n, views, dim)).astype(np.float32)
    labels = np.arange(n) % 3
    with h5py.File(path, "w") as h5:
        ds = create_feature_file(h5, dim, labels, [f"{i}.jpg" for i in range(n)], {"complete": True}, 4, views)
        ds[...] = feats
        h5["views"][...] = vws
    return FeatureSet(feats, labels, [f"{i}.jpg" for i in range(n)], {}, views=vws)


def _rows(batches):
    xs, ys = zip(*(batches[i] for i in range(len(batches))))
    return np.concatenate(xs), np.concatenate(ys)


def test_feature_batches_cover_every_row_once_per_epoch_in_a_new_deterministic_order(tmp_path):
    fs = _feature_file(tmp_path / "train.h5")
    x_all, y_all = train_head.training_rows(fs)  # 23 images × (1 + 2 views) = 69 rows
    key = lambda x, y: sorted(map(tuple, np.column_stack([x, y]).round(6).tolist()))  # noqa: E731
    with open_features(tmp_path / "train.h5") as ff:
        # Blocks of 5 images, windows of 2 blocks: 5 blocks, 3 windows, the last one short.
        b = train_head.FeatureBatches(ff, batch_size=4, seed=7, block_images=5, window_blocks=2)
        x1, y1 = _rows(b)
        assert key(x1, y1) == key(x_all, y_all)  # every row, each once
        assert all(len(b[i][1]) <= 4 for i in range(len(b)))
        # One window in memory: at most 2 blocks × 5 images × 3 rows.
        assert max(len(b._window(w)[1]) for w in range(len(b._windows))) <= 30
        b.on_epoch_end()
        x2, y2 = _rows(b)
        assert key(x2, y2) == key(x_all, y_all) and not np.array_equal(x1, x2)  # epoch 2: another order
        again = train_head.FeatureBatches(ff, batch_size=4, seed=7, block_images=5, window_blocks=2)
        np.testing.assert_array_equal(_rows(again)[0], x1)  # a function of (seed, epoch) alone
        # Without a seed (validation): file order, clean features only.
        plain = train_head.FeatureBatches(ff, batch_size=4, views=False, block_images=5, window_blocks=2)
        xp, yp = _rows(plain)
        np.testing.assert_array_equal(xp, fs.features)
        np.testing.assert_array_equal(yp, fs.labels)


def test_block_predictions_equal_whole_array_predictions(tmp_path):
    from pipeline.models.heads import build_head, predict_features

    fs = _feature_file(tmp_path / "val.h5", n=9)
    head = build_head(3, 3)
    with open_features(tmp_path / "val.h5") as ff:
        np.testing.assert_allclose(predict_features(head, ff, rows=4),
                                   head.predict(fs.features, verbose=0), atol=1e-6)
