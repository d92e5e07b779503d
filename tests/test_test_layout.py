"""The tests mirror the code, so a reader finds a module's tests by its name and a module without tests fails here.

- a library module ``pipeline/<package>/<module>.py`` is tested in ``tests/test_<package>_<module>.py``
  (``__main__.py``: ``test_<package>_main.py``);
- a stage ``pipeline/<stage>.py`` in ``tests/test_<stage>.py``;
- either may have more files beside it, named ``test_<that name>_<what>.py`` (``test_prepare_hostile.py``);
- a module whose tests live elsewhere is in :data:`ELSEWHERE`, with the file and the reason;
- every other test file tests across modules and is in :data:`CROSS_CUTTING`, saying what it tests.

Tests stay flat in tests/ (``from conftest import ...`` works, basenames stay unique).
"""
from __future__ import annotations

from pathlib import Path

from conftest import ROOT

TESTS = ROOT / "tests"
PACKAGE = ROOT / "pipeline"

# module (relative to pipeline/) → (test file, why its tests are not in the file named after it). Keep it short.
ELSEWHERE: dict[str, tuple[str, str]] = {}

# Test files that mirror no single module: what each tests.
CROSS_CUTTING = {
    "test_test_layout.py": "this rule: the test files mirror pipeline/",
    "test_structure.py": "the layering of pipeline/'s packages, function length and signature width",
    "test_stage_boundaries.py": "each stage's dvc.yaml deps and params against its imports and reads",
    "test_docs.py": "the docs against the code: links, commands, flags, params, names",
    "test_e2e_dvc.py": "the whole pipeline under `dvc repro` and `dvc exp run`",
    "test_ci_remote.py": "a fresh clone against a DVC remote: what CI re-runs",
    "test_determinism.py": "the whole pipeline twice, in two processes: the same bytes",
    "test_distributed.py": "fine-tuning on 2 replicas against 1 device, and resumed",
    "test_faults.py": "kill -9, a full disk, unwritable outputs and stale artifacts across the stages",
    "test_odd_paths.py": "data.raw_dir with odd names through dvc.yaml's commands",
    "test_plots_render.py": "`dvc plots` of a finished project, rendered",
    "test_real_data.py": "the stages on the real data sets in ../shared/datasets",
    "test_install_tiers.py": "the requirements files and scripts/test.sh",
    "test_multiworker.py": "an upstream Keras limitation the distributed design works around",
}


def mirror_name(module: Path) -> str:
    """The test file named after ``module`` (a path under pipeline/)."""
    rel = module.relative_to(PACKAGE)
    if len(rel.parts) == 1:  # a stage
        return f"test_{rel.stem}.py"
    stem = "main" if rel.stem == "__main__" else rel.stem
    return f"test_{'_'.join(rel.parts[:-1])}_{stem}.py"


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and "__pycache__" not in p.parts)


def present_test_files() -> list[str]:
    return sorted(p.name for p in TESTS.glob("test_*.py"))


def mirrors(test_file: str, module_test: str) -> bool:
    """``test_file`` is ``module_test`` or a file beside it (``test_x_<what>.py`` for ``test_x.py``)."""
    return test_file == module_test or test_file.startswith(module_test[:-len(".py")] + "_")


def test_every_module_has_a_test_module_named_after_it():
    files = present_test_files()
    missing = [f"pipeline/{m.relative_to(PACKAGE)} → tests/{mirror_name(m)}" for m in modules()
               if str(m.relative_to(PACKAGE)) not in ELSEWHERE and mirror_name(m) not in files]
    assert not missing, ("modules without a test module named after them (write it, or add the module to ELSEWHERE "
                         "in tests/test_test_layout.py with the reason):\n" + "\n".join(missing))


def test_every_test_file_mirrors_a_module_or_says_what_it_tests_across_modules():
    names = [mirror_name(m) for m in modules()]
    stray = [f for f in present_test_files() if f not in CROSS_CUTTING and not any(mirrors(f, n) for n in names)]
    assert not stray, ("test files named after no module of pipeline/ (rename them after the module they test, or "
                       "add them to CROSS_CUTTING in tests/test_test_layout.py with what they test):\n"
                       + "\n".join(stray))


def test_the_exceptions_name_what_exists():
    files = present_test_files()
    stale = [f for f in CROSS_CUTTING if f not in files]
    stale += [f"{m} → {f}" for m, (f, _) in ELSEWHERE.items() if not (PACKAGE / m).is_file() or f not in files]
    stale += [m for m, (_, why) in ELSEWHERE.items() if not why.strip()]
    assert not stale, f"CROSS_CUTTING / ELSEWHERE name what is gone, or give no reason: {stale}"


def test_tests_are_flat():
    nested = sorted(str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if p.parent != TESTS)
    assert not nested, f"test files below tests/ (keep them flat: `from conftest import ...` and unique basenames " \
                       f"rely on it): {nested}"
