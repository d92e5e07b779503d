"""The audit stage finds planted faults, and prepare's exclude list is how a user acts on them.

The audit's inputs here are real HDF5 feature files of tiny generated images (conftest.make_images),
whose features are drawn around one centre per class (so which image is wrong is known), with a
planted label flip and a planted train copy of a test image; the real backbone's path through the
stage runs in the end-to-end `dvc repro` test.
"""
import csv
import json
import logging

import h5py
import numpy as np
import pytest
from conftest import as_params, make_images, tiny_params

from pipeline import audit, prepare
from pipeline.core.manifest import HEADER as MANIFEST_HEADER
from pipeline.core.manifest import SPLITS, read_manifest
from pipeline.extraction.features import create_feature_file

CLASSES = ("circle", "square", "stripes")


def _features(tmp_path, n_views=2, seed=0):
    """Tiny images, their manifest and feature files: class-centred features (D = 16) with K views per train
    image. Planted: the first train image of 'circle' labelled 'square' in the manifest and the feature file,
    and a train image whose features are a near copy of the first 'stripes' test image's."""
    raw = make_images(tmp_path / "raw", classes=CLASSES, per_class=24)
    params = as_params(tiny_params(str(raw)))
    work = tmp_path / "work"
    prepare.run(raw_dir=raw, manifest=work / "manifest.csv", classes_out=work / "classes.json", params=params.data)
    items = read_manifest(work / "manifest.csv")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(CLASSES), 16)) * 1.5
    flip = next(it for it in items if it.split == "train" and it.label == "circle")
    original = next(it for it in items if it.split == "test" and it.label == "stripes")
    copy = next(it for it in items if it.split == "train" and it.label == "stripes")
    feats = {it.path: (centres[CLASSES.index(it.label)] + rng.normal(0, 1, 16)).astype(np.float32) for it in items}
    feats[copy.path] = feats[original.path] + rng.normal(0, 0.01, 16).astype(np.float32)
    labels = {it.path: CLASSES.index(it.label) for it in items}
    labels[flip.path] = CLASSES.index("square")
    rows = []
    with open(work / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["path"] == flip.path:
                r["label"] = "square"
            rows.append(r)
    with open(work / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, MANIFEST_HEADER)
        w.writeheader()
        w.writerows(rows)
    paths = {}
    for s in SPLITS:
        split = [it.path for it in items if it.split == s]
        k = n_views if s == "train" else 0
        paths[s] = work / f"{s}.h5"
        with h5py.File(paths[s], "w") as h5:
            ds = create_feature_file(h5, 16, [labels[p] for p in split], split,
                                     {"class_names": list(CLASSES), "complete": True}, chunk_rows=8, views=k)
            ds[...] = np.stack([feats[p] for p in split])
            if k:
                h5["views"][...] = np.stack([feats[p] + rng.normal(0, 0.5, (k, 16)) for p in split])
    return raw, work, paths, flip.path, (copy.path, original.path)


def _run(raw, work, paths, **audit_params):
    params = as_params(tiny_params(str(raw), **{f"audit.{k}": v for k, v in audit_params.items()}))
    out = work / "reports"
    res = audit.run(raw_dir=raw, manifest=work / "manifest.csv", classes_json=work / "classes.json", features=paths,
                    label_issues_out=out / "label_issues.csv", duplicates_out=out / "near_duplicates.csv",
                    outliers_out=out / "outliers.csv", imbalance_out=out / "class_imbalance.csv",
                    metrics_out=out / "audit.json", gallery_dir=out / "gallery", params=params)
    return res, out


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("views", [True, False])
def test_planted_flip_and_duplicate_are_found(tmp_path, views):
    raw, work, paths, flipped, (copy, original) = _features(tmp_path)
    res, out = _run(raw, work, paths, views=views, folds=5)
    issues = _csv(out / "label_issues.csv")
    assert issues and issues[0]["path"] == flipped, issues[:3]
    assert issues[0] == {**issues[0], "split": "train", "given_label": "square", "suggested_label": "circle"}
    assert float(issues[0]["score"]) < 0.5
    assert len(issues) <= 3  # the clean images are not flagged wholesale
    dups = _csv(out / "near_duplicates.csv")
    assert {dups[0]["path_a"], dups[0]["path_b"]} == {copy, original}
    assert {dups[0]["split_a"], dups[0]["split_b"]} == {"train", "test"}
    metrics = json.loads((out / "audit.json").read_text())
    assert metrics["label_issues"] == len(issues) and metrics["label_issues_by_split"]["train"] >= 1
    assert metrics["label_issues_likely"] == sum(r["tier"] == "likely" for r in issues)
    assert all(r["tier"] == ("likely" if float(r["score"]) <= audit.LIKELY_MAX_PROBABILITY else "possible")
               for r in issues)
    assert metrics["cross_split_duplicate_pairs"] == 1 == metrics["near_duplicate_pairs"]
    assert metrics["images"] == len(read_manifest(work / "manifest.csv"))
    for name in ("label_issues", "near_duplicates", "outliers"):
        assert (out / "gallery" / f"{name}.png").stat().st_size > 0
    # Every train + val image was scored out of fold: its row sums to one, and the flipped image's
    # probability of its given label is low although the model that scored it would have fit it.
    assert np.allclose(res.probs.sum(1), 1.0)


def test_out_of_fold_means_the_scoring_model_never_saw_the_image(tmp_path):
    """The flip is found because its scorer did not train on it: scored by a model fit on every row
    (in-sample), its given label would look far more plausible."""
    raw, work, paths, flipped, _ = _features(tmp_path)
    res, _ = _run(raw, work, paths, folds=5, C=100.0)
    i = res.pool.paths.index(flipped)
    x, y = res.pool.features, res.pool.labels
    clf, scale = audit._fit(x, y, as_params(tiny_params(str(raw), **{"audit.C": 100.0})).audit, 0)
    in_sample = audit._proba(clf, scale, x[i:i + 1], len(CLASSES))[0, y[i]]
    assert res.quality[i] < 0.2 < in_sample


def _brute_force_pairs(x, hashes, k, ratio, max_bits):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    n = len(x)
    r = np.array([np.sort(np.delete(d[i], i))[k - 1] for i in range(n)])
    out = set()
    for i in range(n):
        for j in range(i + 1, n):
            ref = min(r[i], r[j])
            close_hash = hashes is not None and max_bits >= 0 and bin(int(hashes[i] ^ hashes[j])).count("1") <= max_bits
            if d[i, j] <= ratio * ref + 1e-6 or (close_hash and d[i, j] <= ref + 1e-6):
                out.add((i, j))
    return out


def test_near_duplicates_blockwise_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (60, 8)).astype(np.float32)
    x[30] = x[4] * 2.0  # same direction: distance 0
    x[50] = x[20] + rng.normal(0, 0.05, 8).astype(np.float32)  # a near copy
    hashes = rng.integers(0, 2**63, 60, dtype=np.uint64)
    hashes[41] = hashes[7] ^ np.uint64(0b10110)  # 3 bits apart, features unrelated: not mutual neighbours
    x[11] = x[10] + rng.normal(0, 0.6, 8).astype(np.float32)  # similar, not a copy by features...
    hashes[11] = hashes[10] ^ np.uint64(0b11)  # ...but the hash says so
    monkeypatch.setattr(audit, "BLOCK", 7)  # blocks that do not divide N
    got = audit.near_duplicates(x, 5, 0.33)
    assert {(i, j) for i, j, *_ in got} == _brute_force_pairs(x, None, 5, 0.33, -1)
    assert got[0][:2] == (4, 30) and (20, 50) in {(i, j) for i, j, *_ in got}
    assert [p[2] for p in got] == sorted((p[2] for p in got), reverse=True)
    assert all(p[3] == -1 for p in got)
    got = audit.near_duplicates(x, 5, 0.33, hashes, 3)
    pairs = {(i, j) for i, j, *_ in got}
    assert pairs == _brute_force_pairs(x, hashes, 5, 0.33, 3)
    assert (10, 11) in pairs and (7, 41) not in pairs
    bits = np.array([[bin(int(a) ^ int(b)).count("1") for b in hashes] for a in hashes])
    assert all(b == bits[i, j] for i, j, _, b in got)


def test_a_tight_class_of_distinct_images_is_not_a_pile_of_duplicates():
    """Every image of a class within cosine 0.99 of the others (the demo's synthetic classes sit above 0.9):
    an absolute threshold would pair them all; relative to each image's neighbourhood, only the copy stands out."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 32)) * 10
    x = (np.repeat(centres, 40, axis=0) + rng.normal(0, 1, (120, 32))).astype(np.float32)
    u = audit.unit_rows(x)
    assert (u[:40] @ u[:40].T).min() > 0.9
    assert audit.near_duplicates(x, 10, 0.33) == []
    x[77] = x[5] + rng.normal(0, 0.05, 32).astype(np.float32)  # a copy (of another class's image, even)
    assert [(i, j) for i, j, *_ in audit.near_duplicates(x, 10, 0.33)] == [(5, 77)]


def test_the_audit_uses_prepares_hashes_and_says_when_the_manifest_has_none(tmp_path):
    raw, work, paths, _, _ = _features(tmp_path)
    pool = audit.pool_splits({s: audit.read_features(paths[s]) for s in SPLITS})
    items = {(it.path, it.split): it.phash for it in read_manifest(work / "manifest.csv")}
    h = audit.manifest_hashes(work / "manifest.csv", pool)
    assert [f"{v:016x}" for v in h] == [items[(q, s)] for q, s in zip(pool.paths, pool.splits)]
    old = tmp_path / "old.csv"
    old.write_text("path,label,split\n" + "".join(f"{q},x,{s}\n" for q, s in zip(pool.paths, pool.splits)))
    with pytest.raises(audit.PipelineError, match=r"old.csv has no perceptual hashes.*dvc repro prepare"):
        audit.manifest_hashes(old, pool)


def test_outliers_flag_an_image_unlike_the_rest_and_none_in_clean_clusters():
    rng = np.random.default_rng(0)
    params = as_params(tiny_params()).audit
    x = np.abs(rng.normal(0, 0.2, (120, 16)) + np.repeat(np.eye(16)[:3] * 3, 40, axis=0))
    flagged, _ = audit.outliers(x, params)
    assert len(flagged) == 0
    x[7] = np.eye(16)[10] * 3  # a direction no other image has
    flagged, scores = audit.outliers(x, params)
    assert list(flagged) == [7] and scores[7] == scores.min()


def test_class_imbalance_flags_a_small_class(tmp_path):
    raw = make_images(tmp_path / "raw", classes=("circle", "square"), per_class=40)
    for f in sorted((raw / "square").iterdir())[:34]:
        f.unlink()
    params = as_params(tiny_params(str(raw)))
    prepare.run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json", params=params.data)
    rows = audit.imbalance(tmp_path / "m.csv", ["circle", "square"], 0.2)
    assert [r[0] for r in rows if r[-1]] == ["square"] and rows[0][4] == 40 and rows[1][4] == 6
    assert not any(r[-1] for r in audit.imbalance(tmp_path / "m.csv", ["circle", "square"], 0.05))


def test_exclude_list_leaves_files_out_and_warns_about_unknown_entries(tmp_path, caplog):
    raw = make_images(tmp_path / "raw", per_class=12)
    (raw / "square" / "sub").mkdir()
    for i in range(2):
        (raw / "square" / f"square_{i:03d}.png").rename(raw / "square" / "sub" / f"moved_{i}.png")
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# reviewed 2026-12-05\n\ncircle/circle_003.png\n  ./square/sub/  \n"
                       "stripes/no_such_file.png   \n")
    params = as_params(tiny_params(str(raw)))
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        items = prepare.run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json",
                            params=params.data, quarantine=tmp_path / "q.csv", exclude=exclude)
    paths = {it.path for it in items}
    gone = {"circle/circle_003.png", "square/sub/moved_0.png", "square/sub/moved_1.png"}
    assert not paths & gone and len(paths) == 36 - 3
    report = {r["path"]: r for r in _csv(tmp_path / "q.csv")}
    assert {p for p, r in report.items() if r["kind"] == "excluded"} == gone
    assert f"{exclude} line 3" in report["circle/circle_003.png"]["reason"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stripes/no_such_file.png" in m and ":5:" in m for m in warned), warned
    assert not any("circle_003" in m for m in warned)


@pytest.mark.parametrize("entry", ["../outside.png", "/abs/path.png", "circle/../../x.png"])
def test_exclude_entry_outside_raw_dir_is_an_error_naming_the_line(tmp_path, entry):
    raw = make_images(tmp_path / "raw", per_class=12)
    exclude = tmp_path / "exclude.txt"
    exclude.write_text(f"# c\n{entry}\n")
    with pytest.raises(prepare.DatasetError, match=r"exclude.txt:2: .*not a path inside data.raw_dir"):
        prepare.run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json",
                    params=as_params(tiny_params(str(raw))).data, exclude=exclude)


def test_shipped_exclude_list_has_only_comments():
    from conftest import ROOT

    entries = prepare.read_exclude_list(ROOT / "data" / "exclude.txt")
    assert entries == []


def test_more_exact_copies_than_neighbours_are_all_paired():
    """With more than k copies of one image its k-th neighbour is a copy: the relative rule alone would see
    few of them; nearly identical features are copies whatever the neighbourhood."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (100, 16)).astype(np.float32)
    x[80:95] = x[3] + rng.normal(0, 0.002, (15, 16)).astype(np.float32)  # 15 re-saved copies of row 3, k = 10
    got = {(i, j) for i, j, *_ in audit.near_duplicates(x, 10, 0.33)}
    rows = [3, *range(80, 95)]
    assert {(i, j) for i in rows for j in rows if i < j} <= got
