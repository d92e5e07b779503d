"""The import closure (pipeline/core/imports.py) that dvc.yaml's code deps and the feature cache key are derived
from: every import of this package counts, at module level or inside a function; a definition's closure follows
only the names its code uses, without docstrings and annotations."""
import shutil

import pytest
from conftest import ROOT

from pipeline.core.imports import definition_closure, direct_imports, import_closure

PIPELINE = ROOT / "pipeline"


def test_direct_imports_count_every_form_of_import_of_this_package_and_nothing_else(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text(
        "import os\n"
        "import numpy as np\n"
        "from pipeline import prepare\n"
        "from pipeline.core.io import atomic_path\n"
        "from . import sibling\n"
        "def f():\n"
        "    import pipeline.data.images\n"
        "    from pipeline.core import manifest\n"
        "    from pipeline.nope import x\n")
    assert direct_imports(module) == {PIPELINE / "prepare.py", PIPELINE / "core" / "io.py",
                                      PIPELINE / "data" / "images.py", PIPELINE / "core" / "manifest.py"}


def test_import_closure_follows_imports_to_the_end_and_refuses_what_is_no_module():
    assert import_closure("pipeline.core.manifest") == ["pipeline/core/io.py", "pipeline/core/manifest.py"]
    # augment imports params, which imports io: io is in augment's closure though augment never names it.
    assert import_closure("pipeline.data.augment") == ["pipeline/core/io.py", "pipeline/core/params.py",
                                                       "pipeline/data/augment.py"]
    with pytest.raises(ValueError, match="not modules of pipeline"):
        import_closure("pipeline.core.manifest", "pipeline.nope")


def _closure(root=None) -> dict[tuple[str, str], str]:
    return {(f, n): code for f, n, code in definition_closure("pipeline.core.manifest.read_manifest", root=root)}


def test_a_definitions_closure_is_what_its_code_uses_and_reads_past_docstrings_and_annotations(tmp_path):
    assert set(_closure()) == {("pipeline/core/manifest.py", n) for n in ("read_manifest", "Item", "SPLITS")}
    shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "pipeline" / "core" / "manifest.py"
    text = path.read_text()
    path.write_text(text.replace('"""The manifest\'s items', '"""Reworded: the items').replace(
        "def read_manifest(path: Path, splits: Sequence[str] = SPLITS) -> list[Item]:",
        "def read_manifest(path: str, splits: tuple = SPLITS) -> list:"))
    assert _closure(tmp_path) == _closure()
    path.write_text(text.replace('if r["split"] in splits]', 'if r["split"] in splits][::-1]'))
    changed = _closure(tmp_path)
    assert changed.keys() == _closure().keys() and changed != _closure()
    with pytest.raises(ValueError, match="no module-level definition 'nope'"):
        definition_closure("pipeline.core.manifest.nope")
