"""The one folder walker (pipeline/data/scanning.py): image files below a folder in name order, each real file and
folder once whatever links point at them, and a reason for everything it skips."""
import os

from conftest import make_images

from pipeline.data.scanning import Scanner, image_files


def test_the_walk_lists_images_in_name_order_and_reports_every_skip_with_its_reason(tmp_path):
    root = make_images(tmp_path / "cls", classes=("square", "circle"), per_class=2)
    (root / "circle" / "deep" / "er").mkdir(parents=True)
    os.replace(root / "circle" / "circle_001.png", root / "circle" / "deep" / "er" / "z.png")
    (root / "circle" / ".hidden.png").write_bytes(b"x")
    (root / "circle" / ".thumbs").mkdir()
    (root / "circle" / "notes.txt").write_text("x")
    (root / "circle" / "IMG_1.HEIC").write_bytes(b"x")
    (root / "circle" / "Thumbs.db").write_bytes(b"x")
    os.mkfifo(root / "circle" / "pipe.jpg")
    os.symlink("circle_000.png", root / "circle" / "link.png")  # a second path to one file
    os.symlink("..", root / "circle" / "up")  # a loop back to the top
    os.symlink("gone.jpg", root / "circle" / "broken.jpg")  # kept: the decode check reports why
    (root / "circle" / os.fsdecode(b"caf\xe9.png")).write_bytes(b"x")
    sc = Scanner()
    found = sc.walk(str(root), "")
    assert found == ["circle/broken.jpg", "circle/circle_000.png", "circle/deep/er/z.png", "square/square_000.png",
                     "square/square_001.png"]
    skipped = {q.path: (q.kind, q.reason) for q in sc.quarantined}
    assert skipped["circle/.hidden.png"] == ("ignored", "hidden file")
    assert skipped["circle/.thumbs"] == ("ignored", "hidden folder")
    kind, reason = skipped["circle/notes.txt"]
    assert kind == "ignored" and reason.startswith("not an image file name (extension '.txt'; supported: .jpg")
    kind, reason = skipped["circle/IMG_1.HEIC"]
    assert kind == "ignored" and reason.startswith("HEIC files are not decoded; convert to JPEG or PNG")
    assert skipped["circle/Thumbs.db"] == ("ignored", "operating-system metadata file")
    assert skipped["circle/pipe.jpg"] == ("rejected", "not a regular file (a pipe, socket or device)")
    assert skipped["circle/link.png"] == ("ignored",
                                          "same file as circle/circle_000.png (a link); each image is used once")
    assert skipped["circle/up"] == ("ignored", "folder already scanned (a symlink loop or a second link to it)")
    assert skipped["circle/caf\\xe9.png"] == ("rejected", "file name is not valid UTF-8; rename it")
    assert len(skipped) == 9


def test_image_files_are_full_paths_sorted(tmp_path):
    root = make_images(tmp_path / "in", classes=("square", "circle"), per_class=2)
    (root / "circle" / "read me.md").write_text("x")
    assert image_files(root) == [str(root / c / f"{c}_{i:03d}.png") for c in ("circle", "square") for i in range(2)]
