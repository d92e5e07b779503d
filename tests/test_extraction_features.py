"""The HDF5 feature files and their provenance (pipeline/extraction/features.py): written and read back in row
blocks, and refused, naming the file and the fix, when they are incomplete, unreadable or made with other params."""
import h5py
import numpy as np
import pytest

from pipeline.extraction.features import (
    CHECKED_KEYS,
    ProvenanceError,
    check_provenance,
    create_feature_file,
    open_features,
    read_features,
)

PROVENANCE = {"backbone": "efficientnet_lite0", "weights_id": "imagenet:x.pth", "weights_sha256": "ab" * 32,
              "image_size": 64, "pooling": "avg", "preprocessing": "pillow-rgb-exif-bilinear-squash;tf",
              "class_names": ["chat noir é", "circle", "square"]}


def _write(path, n=7, dim=3, views=0, complete=True, **attrs):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    vws = rng.normal(size=(n, views, dim)).astype(np.float32) if views else None
    labels, paths = np.arange(n) % 3, [f"chat noir é/{i}, n°{i}.png" for i in range(n)]
    with h5py.File(path, "w") as h5:
        ds = create_feature_file(h5, dim, labels, paths, {**PROVENANCE, "complete": complete, **attrs}, 2, views)
        ds[...] = feats
        if views:
            h5["views"][...] = vws
    return feats, vws, labels, paths


def test_a_file_reads_back_in_blocks_with_its_attrs(tmp_path):
    feats, vws, labels, paths = _write(tmp_path / "train.h5", views=2, augment={"flip": True})
    with open_features(tmp_path / "train.h5", PROVENANCE) as ff:
        assert (ff.n, ff.dim, ff.n_views) == (7, 3, 2)
        assert ff.paths == paths and ff.labels.tolist() == labels.tolist()
        assert ff.attrs["class_names"] == PROVENANCE["class_names"] and ff.attrs["augment"] == {"flip": True}
        assert ff.blocks(3) == [(0, 3), (3, 6), (6, 7)]
        np.testing.assert_array_equal(np.concatenate([ff.features(a, b) for a, b in ff.blocks(3)]), feats)
        np.testing.assert_array_equal(ff.views(2, 5), vws[2:5])
    fs = read_features(tmp_path / "train.h5")
    np.testing.assert_array_equal(fs.features, feats)
    np.testing.assert_array_equal(fs.views, vws)
    assert fs.paths == paths and fs.attrs["image_size"] == 64
    _write(tmp_path / "val.h5")
    assert read_features(tmp_path / "val.h5").views is None


def test_the_provenance_check_names_every_differing_key_and_only_those():
    found = {**PROVENANCE, "engine": "tensorflow"}
    expected = {**PROVENANCE, "image_size": 96, "pooling": "max", "class_names": ["a", "b"], "engine": "onnxruntime"}
    with pytest.raises(ProvenanceError) as exc:
        check_provenance("features/val.h5", found, expected, "re-run `dvc repro extract`")
    msg = str(exc.value)
    assert msg == ("features/val.h5 does not match the current params (image_size: artifact has 64, params give 96; "
                   "pooling: artifact has 'avg', params give 'max'; class_names: artifact has ['chat noir é', "
                   "'circle', 'square'], params give ['a', 'b']); re-run `dvc repro extract`")
    assert "engine" not in CHECKED_KEYS  # the engine is the cache key's business, not the reader's
    check_provenance("x", found, {**PROVENANCE, "engine": "onnxruntime"}, "fix")  # only checked keys count
    # A key missing from the artifact differs too.
    with pytest.raises(ProvenanceError, match="weights_sha256: artifact has None, params give 'abab"):
        check_provenance("x", {k: v for k, v in PROVENANCE.items() if k != "weights_sha256"}, PROVENANCE, "fix")


def test_a_file_from_other_params_is_refused_naming_the_file(tmp_path):
    _write(tmp_path / "val.h5")
    with pytest.raises(ProvenanceError, match=r"val.h5 does not match the current params \(pooling: artifact has "
                                              r"'avg', params give 'max'\); re-run `dvc repro extract`"):
        read_features(tmp_path / "val.h5", {**PROVENANCE, "pooling": "max"})


@pytest.mark.parametrize("complete", [False, None])
def test_incomplete_feature_file_is_refused(tmp_path, complete):
    f = tmp_path / "val.h5"
    _write(f, complete=complete if complete is not None else True)
    if complete is None:  # a file whose writer never got to set the flag
        with h5py.File(f, "a") as h5:
            del h5.attrs["complete"]
    with pytest.raises(ProvenanceError, match="val.h5: incomplete feature file"):
        read_features(f)
    with pytest.raises(ProvenanceError, match="incomplete feature file"):
        open_features(f, PROVENANCE)  # before the provenance, which would match


def test_truncated_feature_file_names_the_file_and_the_fix(tmp_path):
    good = tmp_path / "good.h5"
    _write(good, n=2000, dim=16)
    f = tmp_path / "val.h5"
    data = good.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProvenanceError) as exc:
        read_features(f)
    assert str(f) in str(exc.value) and "delete it and re-run `dvc repro extract`" in str(exc.value)


def test_a_missing_file_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test.h5: feature file not found; run `dvc repro extract`"):
        open_features(tmp_path / "test.h5")
