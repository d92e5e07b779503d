"""The shape of the package, as rules a change cannot break unseen.

- ``pipeline/<stage>.py`` are the stages (``python -m pipeline.<stage>``); the library lives in sub-packages,
  each of whose ``__init__`` is only a docstring that says what lives there and, on a line
  ``Imports from pipeline: ...``, which other packages it may import;
- every import of a library module (at module level or inside a function) stays inside its own package or
  goes to one its docstring allows: no upward arrow; the allowed lists form a strict order;
- the import graph of all modules has no circle;
- no function is longer than :data:`MAX_LINES` lines, and none but a stage's ``run`` / ``main`` takes more
  than :data:`MAX_PARAMS` parameters.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.core.imports import direct_imports

PACKAGE = ROOT / "pipeline"
MAX_LINES = 80
MAX_PARAMS = 7
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
STAGES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def allowed_imports(package: str) -> set[str]:
    """The packages ``package``'s docstring allows it to import (its ``Imports from pipeline:`` line)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    m = re.search(r"^Imports from pipeline: (.*?)\.?$", doc, re.M)
    assert m, f"pipeline/{package}/__init__.py: its docstring needs a line 'Imports from pipeline: ...'"
    text = m.group(1).strip()
    allowed = set() if text.startswith("nothing") else {w.strip() for w in text.split(",")}
    unknown = allowed - set(SUBPACKAGES)
    assert not unknown, f"pipeline/{package}: 'Imports from pipeline' names unknown packages {unknown}"
    return allowed


def _package_of(path: Path) -> str | None:
    """The sub-package a module lives in; None for a stage module (pipeline/<stage>.py)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else None


def test_there_are_stages_and_library_packages():
    assert {"prepare", "extract", "train_head", "finetune", "evaluate", "export", "predict"} <= set(STAGES)
    assert {"core", "data", "backbones", "runtime", "extraction", "models", "finetuning"} <= set(SUBPACKAGES)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_a_package_init_is_only_its_docstring(package):
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text())
    assert ast.get_docstring(tree), f"pipeline/{package}/__init__.py has no docstring"
    extra = tree.body[1:]
    assert not extra, (f"pipeline/{package}/__init__.py runs code (line {extra[0].lineno}): an __init__ is not "
                       "in any stage's dvc.yaml deps, so it must not hold code")


def test_the_allowed_imports_form_a_strict_order():
    allowed = {p: allowed_imports(p) for p in SUBPACKAGES}
    for p, deps in allowed.items():
        assert p not in deps, f"pipeline/{p} lists itself"
        for q in deps:
            assert p not in allowed[q], f"pipeline/{p} and pipeline/{q} may import each other: no layer order"
    # Transitively closed: a package may use what the packages below it use (no hidden arrows).
    for p, deps in allowed.items():
        for q in deps:
            assert allowed[q] <= deps, f"pipeline/{p} may import {q} but not what {q} imports: {allowed[q] - deps}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_import(module):
    own = _package_of(module)
    targets = direct_imports(module)
    if own is None:  # a stage: library packages only, never another stage
        stages = [t for t in targets if _package_of(t) is None]
        assert not stages, f"{module.relative_to(ROOT)} imports the stage(s) {[s.stem for s in stages]}"
        return
    allowed = allowed_imports(own) | {own}
    bad = sorted(str(t.relative_to(ROOT)) for t in targets if _package_of(t) not in allowed)
    assert not bad, f"{module.relative_to(ROOT)} (package {own}, may import {sorted(allowed)}) imports {bad}"


def test_the_import_graph_has_no_circle():
    graph = {m: direct_imports(m) for m in MODULES}
    state: dict[Path, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: Path, path: list[Path]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(str(c.relative_to(ROOT)) for c in cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def _functions():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_is_too_long():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, n in _functions() if n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines: split them into named steps: {long}"


def test_no_signature_is_too_wide():
    wide = []
    for path, node in _functions():
        a = node.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        n = len([x for x in names if x not in ("self", "cls")])
        if n > MAX_PARAMS and not (_package_of(path) is None and node.name in ("run", "main")):
            wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} parameters)")
    assert not wide, f"signatures over {MAX_PARAMS} parameters: bundle what belongs together: {wide}"
