"""Which modules of ``pipeline/`` a module imports, directly or through others (its import closure).

Two things are derived from it instead of being kept by hand: each stage's code deps in
dvc.yaml (a test asserts that they equal the stage module's closure) and the code part of
the feature cache key (:func:`pipeline.feature_cache.code_fingerprint`). Every import
counts, at module level or inside a function, since either can run.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent


def _module_file(name: str) -> Path | None:
    """``pipeline.x`` → ``pipeline/x.py`` when it is a module of this package, else None."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    path = ROOT.joinpath(*parts[1:]).with_suffix(".py")
    return path if path.is_file() else None


def direct_imports(path: Path) -> set[Path]:
    """The package's modules that ``path`` imports itself."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import x` names module x; `from pipeline.x import f` names module x.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if (file := _module_file(name)) is not None:
                found.add(file)
    return found


def import_closure(*modules: str) -> list[str]:
    """``pipeline.x`` names → every package module they import, themselves included, as sorted
    paths relative to the project root (``pipeline/x.py``, as dvc.yaml lists deps)."""
    todo = [f for f in (_module_file(m) for m in modules) if f is not None]
    if len(todo) != len(modules):
        raise ValueError(f"not modules of {PACKAGE}: {modules}")
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(direct_imports(path) - seen)
    return sorted(str(p.relative_to(ROOT.parent)) for p in seen)
