"""prepare's groups (data.group_pattern, pHash near-copies) and its separate test folder (data.test_dir)."""
import logging

import numpy as np
import pytest
from conftest import as_params, make_images, render, tiny_params
from PIL import Image

from pipeline.core.manifest import read_manifest
from pipeline.core.params import ParamsError
from pipeline.data.near_copies import from_hex
from pipeline.data.scanning import DatasetError
from pipeline.prepare import assign_split, run, scan


def _params(raw, **overrides):
    return as_params(tiny_params(str(raw), **overrides)).data


def _split_of(items):
    return {it.path: it.split for it in items}


# ---- groups in prepare ---------------------------------------------------------------------------------

def _episodes(raw, episodes=12, frames=3, classes=("circle", "square")):
    """``raw/<class>/ep<E>_frame<F>.png``: distinct images, named as frames of episodes."""
    for ci, label in enumerate(classes):
        (raw / label).mkdir(parents=True, exist_ok=True)
        for e in range(episodes):
            for f in range(frames):
                render(label, np.random.default_rng([ci, e, f]), 48).save(raw / label / f"ep{e:02d}_frame{f}.png")
    return raw


def test_group_pattern_keeps_each_group_in_one_split_across_classes(tmp_path):
    raw = _episodes(tmp_path / "raw")
    pattern = r"/(ep\d+)_"
    items = run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json",
                params=_params(raw, **{"data.group_pattern": pattern, "data.group_hash_bits": -1}))
    by_episode = {}
    for it in items:
        by_episode.setdefault(it.path.split("/")[1][:4], set()).add(it.split)
        assert it.group == it.path.split("/")[1][:4]
    assert all(len(s) == 1 for s in by_episode.values()), by_episode
    assert {s for v in by_episode.values() for s in v} == {"train", "val", "test"}
    # Without the pattern, the frames of some episode scatter over splits: the test can fail.
    alone = run(raw_dir=raw, manifest=tmp_path / "m2.csv", classes_out=tmp_path / "c2.json",
                params=_params(raw, **{"data.group_hash_bits": -1}))
    scattered = {}
    for it in alone:
        scattered.setdefault(it.path.split("/")[1][:4], set()).add(it.split)
    assert any(len(s) > 1 for s in scattered.values())


def test_adding_images_never_moves_a_pattern_group(tmp_path):
    raw = _episodes(tmp_path / "raw", episodes=10)
    p = _params(raw, **{"data.group_pattern": r"/(ep\d+)_", "data.group_hash_bits": -1})
    before = _split_of(run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json", params=p))
    _episodes(tmp_path / "raw", episodes=14, frames=4)  # new frames of old episodes, and new episodes
    after = _split_of(run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json", params=p))
    assert all(after[k] == v for k, v in before.items())
    assert len(after) > len(before)


def test_near_copies_share_a_split_and_the_manifest_records_hash_and_group(tmp_path, caplog):
    raw = make_images(tmp_path / "raw", per_class=10)
    src = raw / "circle" / "circle_000.png"
    own = assign_split(42, src.name, 0.25, 0.25)
    # A re-encoded copy whose own path hash sends it to another split than the original's.
    name = next(n for n in (f"copy_{i}.jpg" for i in range(100)) if assign_split(42, n, 0.25, 0.25) != own)
    Image.open(src).convert("RGB").resize((40, 40)).save(raw / "circle" / name, quality=60)
    p = _params(raw)  # data.group_hash_bits: the default
    assert p.group_hash_bits >= 0
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        found = scan(raw, p)
    split = _split_of(found.items)
    assert split[f"circle/{name}"] == split["circle/circle_000.png"]
    assert found.grouping.n_groups >= 1 and found.moved_by_groups >= 1
    rows = {it.path: it for it in found.items}
    # The group's key: the smaller path inside the class folder.
    assert rows[f"circle/{name}"].group == rows["circle/circle_000.png"].group == min(name, "circle_000.png")
    hashes = from_hex([rows["circle/circle_000.png"].phash, rows[f"circle/{name}"].phash])
    assert bin(int(hashes[0] ^ hashes[1])).count("1") <= p.group_hash_bits
    assert "follow their group's split" in caplog.text and "groups: none" not in caplog.text
    # Off: the copy goes where its own path sends it.
    off = _split_of(scan(raw, _params(raw, **{"data.group_hash_bits": -1})).items)
    assert off[f"circle/{name}"] != off["circle/circle_000.png"]


def test_a_pattern_that_misses_images_reports_them(tmp_path, caplog):
    raw = _episodes(tmp_path / "raw")
    Image.open(raw / "circle" / "ep00_frame0.png").rotate(90).save(raw / "circle" / "odd_name.png")
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        found = scan(raw, _params(raw, **{"data.group_pattern": r"/(ep\d+)_", "data.group_hash_bits": -1}))
    assert found.grouping.unmatched == ["circle/odd_name.png"]
    assert "did not match 1 image(s)" in caplog.text and "circle/odd_name.png" in caplog.text


@pytest.mark.parametrize("pattern,says", [("ep(\\d+", "is not a regular expression"),
                                          ("ep\\d+", "has 0 capture groups"),
                                          ("(ep)(\\d+)", "has 2 capture groups")])
def test_a_bad_group_pattern_names_the_param(tmp_path, pattern, says):
    with pytest.raises(ParamsError, match=rf"data.group_pattern: .*{says}"):
        _params(tmp_path, **{"data.group_pattern": pattern})


# ---- data.test_dir --------------------------------------------------------------------------------------

def test_a_test_dir_is_the_test_split_and_raw_dir_splits_into_train_and_val(tmp_path):
    raw = make_images(tmp_path / "data" / "raw", per_class=10)
    test_dir = make_images(tmp_path / "data" / "test", per_class=3, seed=5)
    (test_dir / "README.md").write_text("test images\n")
    items = run(raw_dir=raw, manifest=tmp_path / "m.csv", classes_out=tmp_path / "c.json",
                params=_params(raw), test_dir=test_dir)
    test = [it for it in items if it.split == "test"]
    assert sorted(it.path for it in test) == sorted(f"../test/{c}/{c}_{i:03d}.png" for c in
                                                     ("circle", "square", "stripes") for i in range(3))
    assert all((raw / it.path).is_file() for it in items)  # every stage reads raw_dir / path
    rest = [it for it in items if it.split != "test"]
    assert len(rest) == 30 and {it.split for it in rest} == {"train", "val"}
    assert read_manifest(tmp_path / "m.csv", ("test",)) == test


def test_a_test_dir_without_class_folders_means_none(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=10)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "README.md").write_text("none\n")
    with_dir = scan(raw, _params(raw), test_dir=tmp_path / "test").items
    assert with_dir == scan(raw, _params(raw)).items
    assert any(it.split == "test" for it in with_dir)


def test_test_dir_errors_name_the_param_and_the_fix(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=10)
    with pytest.raises(DatasetError, match=r"data.test_dir: .*nowhere is not a folder"):
        scan(raw, _params(raw), test_dir=tmp_path / "nowhere")
    make_images(tmp_path / "t1", classes=("circle", "square"), per_class=2)
    with pytest.raises(DatasetError, match=r"data.test_dir: .*t1 has class folders \['circle', 'square'\]"):
        scan(raw, _params(raw), test_dir=tmp_path / "t1")
    t2 = make_images(tmp_path / "t2", per_class=2)
    for f in (t2 / "stripes").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"class 'stripes' has no usable image in data.test_dir .*add test images"):
        scan(raw, _params(raw), test_dir=t2)


def test_test_images_that_near_copy_a_training_image_are_counted_and_warned(tmp_path, caplog):
    raw = make_images(tmp_path / "raw", per_class=10)
    test_dir = make_images(tmp_path / "test", per_class=2, seed=9)
    Image.open(raw / "circle" / "circle_004.png").convert("RGB").save(test_dir / "circle" / "leak.jpg", quality=70)
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        found = scan(raw, _params(raw), test_dir=test_dir)
    assert found.given_split_near_copies == 1
    assert "../test/circle/leak.jpg (test) ≈ circle/circle_004.png" in caplog.text
    # The warning says to exclude one of the pair: an exclude list can name a test_dir image as the manifest does.
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("../test/circle/leak.jpg\n")
    found = scan(raw, _params(raw), test_dir=test_dir, exclude=exclude)
    assert found.given_split_near_copies == 0 and "../test/circle/leak.jpg" not in {it.path for it in found.items}
    assert [q.kind for q in found.report if q.path == "../test/circle/leak.jpg"] == ["excluded"]


def test_adding_unrelated_images_moves_no_existing_image_with_near_copy_grouping_on(tmp_path):
    """The guarantee with the default hash grouping: a new image moves an existing one only when it is a
    near-copy of it (or links two groups); distinct new images move nothing."""
    raw = make_images(tmp_path / "raw", per_class=20)
    p = _params(raw)
    assert p.group_hash_bits >= 0
    before = _split_of(scan(raw, p).items)
    make_images(tmp_path / "new", per_class=15, seed=3)
    for f in (tmp_path / "new").rglob("*.png"):
        f.rename(raw / f.parent.name / f"new_{f.name}")
    after = scan(raw, p)
    grouped_with_new = {it.path for it in after.items if it.group and any(
        o.group == it.group and "/new_" in o.path for o in after.items)}
    moved = [k for k, v in before.items() if _split_of(after.items)[k] != v]
    assert set(moved) <= grouped_with_new, moved


def test_a_group_of_many_unrelated_images_is_warned_about(tmp_path, caplog):
    raw = make_images(tmp_path / "raw", per_class=20)
    for i in range(12):  # blank frames: every flat image hashes alike
        Image.new("RGB", (48, 48), (i * 20, 0, 0)).save(raw / "square" / f"blank_{i:02d}.png")
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        found = scan(raw, _params(raw))
    assert found.grouping.largest >= 12
    assert f"one group holds {found.grouping.largest} of 72 images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        scan(raw, _params(raw, **{"data.group_hash_bits": -1}))
    assert "one group holds" not in caplog.text


def test_a_pattern_group_split_between_a_given_test_folder_and_raw_dir_is_warned_about(tmp_path, caplog):
    raw = _episodes(tmp_path / "raw")
    test_dir = _episodes(tmp_path / "test", episodes=2, frames=1)  # episodes 0 and 1 again, as the test set
    with caplog.at_level(logging.WARNING, logger="pipeline.prepare"):
        scan(raw, _params(raw, **{"data.group_pattern": r"/(ep\d+)_", "data.group_hash_bits": -1}),
             test_dir=test_dir)
    assert "2 data.group_pattern group(s) have images in a split you gave" in caplog.text
    assert "'ep00' (" in caplog.text


def test_test_dir_paths_reach_the_images_through_a_symlinked_raw_dir(tmp_path):
    real = make_images(tmp_path / "store" / "images", per_class=10)
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "raw").symlink_to(real)
    test_dir = make_images(tmp_path / "proj" / "data" / "test", per_class=2, seed=4)
    raw = tmp_path / "proj" / "data" / "raw"
    items = scan(raw, _params(raw), test_dir=test_dir).items
    test = [it.path for it in items if it.split == "test"]
    assert len(test) == 6 and all((raw / q).is_file() for q in test)
    assert all(q.startswith("../../proj/data/test/") for q in test), test[:2]  # from the link's target
