"""The split manifest (pipeline/core/manifest.py): what prepare writes every later stage reads back, names with
commas, quotes and accents included, filtered by split in file order."""
import pytest

from pipeline.core.manifest import Item, read_manifest, write_manifest


def test_items_round_trip_in_file_order_filtered_by_split(tmp_path):
    items = [Item('circle/a, "quoted" name.png', "circle", "train"),
             Item("chat noir é/été n°1.png", "chat noir é", "val"),
             Item("square/x.png", "square", "train", "00ff00ff00ff00ff", "x"),
             Item("square/y.png", "square", "test", "0123456789abcdef")]
    path = tmp_path / "manifest.csv"
    write_manifest(path, items)
    assert path.read_text(encoding="utf-8").splitlines()[0] == "path,label,split,phash,group"
    assert read_manifest(path) == items
    assert read_manifest(path, splits=("train",)) == [items[0], items[2]]
    assert read_manifest(path, splits=("val", "test")) == [items[1], items[3]]


def test_a_missing_manifest_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.csv: manifest not found; run `dvc repro prepare`"):
        read_manifest(tmp_path / "manifest.csv")


def test_a_manifest_without_hash_and_group_columns_reads_them_empty(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("path,label,split\nsquare/x.png,square,train\n", encoding="utf-8")
    assert read_manifest(path) == [Item("square/x.png", "square", "train", "", "")]
