"""Paths as users name them: ``data.raw_dir`` with spaces, non-ASCII letters and an apostrophe goes
through a real ``dvc repro``; what dvc.yaml's double-quoted commands cannot carry (" $ ` \\) stops
before any shell parses it, with one error line naming ``data.raw_dir``."""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, make_images, new_tiny_project, ran_stages, run_dvc

from pipeline.core.manifest import read_manifest

ODD = "my photos é n°1 l'été"  # a space, non-ASCII letters, an apostrophe


def _set_raw_dir(proj, raw_dir: str, **finetune) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["raw_dir"] = raw_dir
    params["finetune"].update(finetune)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")


@pytest.mark.slow
def test_repro_reads_a_raw_dir_named_with_spaces_accents_and_a_quote(tmp_path):
    # The project's own folder is oddly named too; the images sit outside it, by absolute path, as a
    # user's photo folder does.
    proj = new_tiny_project(tmp_path / "project d'été")
    raw = make_images(tmp_path / ODD, per_class=12)
    _set_raw_dir(proj, str(raw), epochs=1)
    # Every stage that reads data.raw_dir (export does not, and is slow).
    out = run_dvc(proj, "repro", "evaluate", "audit")
    assert ran_stages(out) == {"prepare", "extract", "audit", "train_head", "finetune", "evaluate"}, out
    assert len(read_manifest(proj / "data" / "prepared" / "manifest.csv")) == 36
    assert "finetuned" in json.loads((proj / "reports" / "metrics.json").read_text())
    assert json.loads((proj / "reports" / "audit.json").read_text())["images"] > 0
    # DVC tracks that very folder: nothing changed, nothing runs; a new image re-runs from prepare.
    assert ran_stages(run_dvc(proj, "repro", "evaluate", "audit")) == set()
    make_images(tmp_path / "more", per_class=1)
    (tmp_path / "more" / "circle" / "circle_000.png").rename(raw / "circle" / "new one é.png")
    assert "prepare" in ran_stages(run_dvc(proj, "repro", "prepare"))
    assert len(read_manifest(proj / "data" / "prepared" / "manifest.csv")) == 37


def test_every_command_quotes_raw_dir():
    """A static check over dvc.yaml: an unquoted ${data.raw_dir} splits at the first space of a user's path."""
    import re

    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        for cmd in cmds:
            bare = re.findall(r'(?<!")\$\{data\.raw_dir\}', cmd)
            assert not bare, f"dvc.yaml stage {name}: quote ${{data.raw_dir}} in {cmd!r}"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return new_tiny_project(tmp_path_factory.mktemp("odd"))


@pytest.mark.slow  # a DVC project per module, `dvc repro prepare` per case
@pytest.mark.parametrize("name, what", [
    ("cost $HOME", "a dollar sign"),
    ("x $(touch pwned) y", "a dollar sign"),
    ("it`s", "a backtick"),
    ('a "quoted" one', "a double quote"),
    ('one " quote', "a double quote"),
    ("back\\slash", "a backslash"),
])
def test_a_raw_dir_the_quotes_cannot_carry_stops_before_any_shell_reads_it(project, tmp_path, name, what):
    raw = make_images(tmp_path / name, per_class=6)
    _set_raw_dir(project, str(raw))
    out = run_dvc(project, "repro", "prepare", check=False)
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "data.raw_dir" in errors[0] and what in errors[0] and "ln -s" in errors[0], out
    assert "Traceback" not in out and "unexpected EOF" not in out, out
    assert not (project / "data" / "prepared" / "manifest.csv").exists()
    assert not (project / "pwned").exists(), "a shell ran the command substitution in the folder's name"
