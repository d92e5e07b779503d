"""Stage train_head (pipeline/train_head.py): the head is fitted on every image and its views; the dense head
streams its features from HDF5 in blocks (every training row once per epoch, a new deterministic order each epoch,
never more than one window of blocks in memory); class weights recover a minority class; features from other
params are refused."""
import h5py
import numpy as np
import pytest
from conftest import as_params, pipeline_until_head, tiny_params

from pipeline import train_head
from pipeline.extraction.features import FeatureSet, ProvenanceError, create_feature_file, open_features
from pipeline.models.heads import load_model


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


def test_head_is_fitted_on_every_image_and_its_views():
    rng = np.random.default_rng(0)
    fs = FeatureSet(rng.normal(size=(5, 3)).astype(np.float32), np.arange(5) % 2, [str(i) for i in range(5)], {},
                    views=rng.normal(size=(5, 2, 3)).astype(np.float32))
    x, y = train_head.training_rows(fs)
    assert x.shape == (15, 3) and list(y[:6]) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(x[3], fs.features[1])
    np.testing.assert_array_equal(x[5], fs.views[1, 1])
    plain = FeatureSet(fs.features, fs.labels, fs.paths, {})
    assert train_head.training_rows(plain)[0] is fs.features


def test_train_head_refuses_features_from_other_params(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path)
    other = as_params(tiny_params(str(raw), **{"backbone.image_size": 96}))
    with pytest.raises(ProvenanceError, match="image_size"):
        train_head.run(train_h5=feats["train"], val_h5=feats["val"], classes_json=out / "classes.json",
                       head_out=out / "head2.keras", metrics_out=out / "m2.json", history_out=out / "h2.csv",
                       params=other)


def test_dense_head_trains_and_writes_history(tmp_path):
    raw, out, feats, params = pipeline_until_head(tmp_path, **{"head.type": "dense", "head.dense.epochs": 5})
    rows = (out / "h.csv").read_text().splitlines()
    assert rows[0] == "epoch,loss,accuracy,val_loss,val_accuracy" and len(rows) >= 2
    head, meta = load_model(out / "head.keras")
    assert meta["head_type"] == "dense" and meta["class_names"] == ["circle", "square", "stripes"]


@pytest.mark.parametrize("head_type", ["logreg", "dense"])
def test_balanced_head_recovers_the_minority_class(head_type, tmp_path):
    import h5py

    from pipeline.extraction.features import create_feature_file, open_features
    from pipeline.train_head import fit_dense, fit_logreg

    rng = np.random.default_rng(0)
    n_major, n_minor, dim = 400, 20, 8
    x = np.concatenate([rng.normal(0, 1, (n_major, dim)), rng.normal(0.8, 1, (n_minor, dim))]).astype(np.float32)
    y = np.array([0] * n_major + [1] * n_minor)
    fs = FeatureSet(x, y, [f"{i}" for i in range(len(y))], {})
    with h5py.File(tmp_path / "f.h5", "w") as h5:  # the dense head streams from a feature file
        create_feature_file(h5, dim, y, fs.paths, {"complete": True}, 64)[...] = x
    recall = {}
    for cw in ("none", "balanced"):
        params = as_params(tiny_params(**{"head.type": head_type, "head.class_weight": cw, "head.logreg.C": 1.0,
                                          "head.dense.epochs": 10, "head.dense.dropout": 0.0,
                                          "head.dense.batch_size": 128, "head.dense.learning_rate": 0.01}))
        if head_type == "logreg":
            head, _ = fit_logreg(fs, fs, 2, params)
        else:
            with open_features(tmp_path / "f.h5") as ff:
                head, _ = fit_dense(ff, ff, 2, params)
        pred = head.predict(x, verbose=0).argmax(1)
        recall[cw] = float((pred[y == 1] == 1).mean())
    assert recall["balanced"] > recall["none"] + 0.2, recall
