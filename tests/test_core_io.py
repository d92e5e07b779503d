"""Atomic writes, hashing and the stage error line (pipeline/core/io.py): a failed write leaves the previous
file or folder as it was and no temporary beside it; a user's mistake is one ``error:`` line and status 1."""
import hashlib
import logging

import pytest
from conftest import make_images

from pipeline.core.io import (
    PipelineError,
    atomic_dir,
    atomic_path,
    file_digests,
    read_json,
    sha256_digest,
    sha256_file,
    user_errors,
    write_json,
)


def test_hashing_images_before_extract_shows_a_bar(tmp_path, capfd):
    raw = make_images(tmp_path / "raw", per_class=3)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    assert file_digests(paths) == [sha256_digest(p) for p in paths]
    err = capfd.readouterr().err
    assert "hash images" in err and "9/9" in err


def test_digests_are_the_files_sha256_in_order_whatever_the_chunk(tmp_path):
    data = [bytes(range(256)) * (k * 997 + 1) for k in range(5)]
    paths = []
    for k, d in enumerate(data):
        paths.append(tmp_path / f"{k}.bin")
        paths[-1].write_bytes(d)
    want = [hashlib.sha256(d).digest() for d in data]
    assert file_digests(paths, workers=3) == want
    assert [sha256_digest(p, chunk=100) for p in paths] == want  # read in many chunks: the same digest
    assert sha256_file(paths[2]) == want[2].hex()


def _visible(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_write_that_fails_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert read_json(target) == {"v": 1}
    assert _visible(tmp_path) == ["metrics.json"]
    write_json(target, {"v": 2})  # a write that completes replaces it whole
    assert read_json(target) == {"v": 2} and _visible(tmp_path) == ["metrics.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "serving"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("new, half written")
            raise RuntimeError("killed")
    assert _visible(target) == ["a.txt"] and _visible(tmp_path) == ["serving"]
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _visible(target) == ["b.txt"] and _visible(tmp_path) == ["serving"]  # no a.txt left over


def test_a_user_error_is_one_line_and_exit_status_1_and_a_bug_keeps_its_traceback(tmp_path, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        with user_errors():
            raise PipelineError("data.raw_dir: data/x not found; set data.raw_dir")
    assert exc.value.code == 1
    assert [r.getMessage() for r in caplog.records] == ["data.raw_dir: data/x not found; set data.raw_dir"]
    with pytest.raises(SystemExit):
        with user_errors():
            read_json(tmp_path / "missing.json")  # a missing input: the same one line
    assert "missing.json: not found; run the stage that produces it" in caplog.records[-1].getMessage()
    with pytest.raises(KeyError):  # anything else is a bug: not swallowed into a line
        with user_errors():
            {}["missing"]
