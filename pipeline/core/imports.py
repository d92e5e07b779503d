"""Which modules of ``pipeline/`` a module imports, directly or through others (its import closure).

Two things are derived from it instead of being kept by hand: each stage's code deps in
dvc.yaml (a test asserts that they equal the stage module's closure) and the code part of
the feature cache key (:func:`pipeline.extraction.cache.code_fingerprint`). Every import
counts, at module level or inside a function, since either can run.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parents[1]  # the pipeline package


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


def _strip(node: ast.AST) -> ast.AST:
    """A copy of ``node`` without docstrings and annotations: what its code does, not how it reads
    (comments and layout are not in the AST anyway)."""
    node = copy.deepcopy(node)
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n.body = body[1:] or [ast.Pass()]
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.returns = None
            for a in (*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs, n.args.vararg, n.args.kwarg):
                if a is not None:
                    a.annotation = None
        if isinstance(n, ast.AnnAssign):
            n.annotation = ast.Constant(None)
    return node


def _bound_names(stmt: ast.stmt) -> list[str]:
    """Names a module-level statement defines (def, class, assignment)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _module_index(path: Path) -> tuple[dict[str, list[ast.stmt]], dict[str, tuple[str, str | None]]]:
    """``path``'s module-level definitions by name, and what its module-level imports of this package bind
    (local name → (module, name), name None for a whole module)."""
    defs: dict[str, list[ast.stmt]] = {}
    for stmt in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        for name in _bound_names(stmt):
            defs.setdefault(name, []).append(stmt)
    return defs, _package_imports(ast.parse(path.read_text(encoding="utf-8")).body)


def _package_imports(stmts) -> dict[str, tuple[str, str | None]]:
    """Local name → (``pipeline.x``, imported name or None) for the imports of this package among ``stmts``."""
    found: dict[str, tuple[str, str | None]] = {}
    for node in stmts:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if _module_file(f"{node.module}.{a.name}") is not None:  # from pipeline import x
                    found[a.asname or a.name] = (f"{node.module}.{a.name}", None)
                elif _module_file(node.module) is not None:
                    found[a.asname or a.name] = (node.module, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if _module_file(a.name) is not None:
                    found[a.asname or a.name.split(".")[0]] = (a.name, None)
    return found


def definition_closure(*roots: str, root: Path | None = None,
                       exclude: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """``pipeline.x.name`` definitions → every module-level definition of this package they use, directly or
    through others, as sorted (file, name, code) with code the definition's AST without docstrings and
    annotations.

    A definition uses the names its code mentions: the module's own definitions, and what it imports
    from this package (at module level or inside the function). A whole module imported as such counts
    with all its definitions. Names used only in annotations do not count (they decide no value).
    ``root``: the project folder whose ``pipeline/`` is read (default: this one). ``exclude``:
    ``pipeline.x.name`` definitions neither counted nor followed (each must exist).
    """
    base = (root or ROOT.parent) / PACKAGE
    cache: dict[str, tuple[dict, dict]] = {}

    def index(module: str):
        if module not in cache:
            path = base.joinpath(*module.split(".")[1:]).with_suffix(".py")
            if not path.is_file():
                raise ValueError(f"{module} is not a module of {PACKAGE} under {base}")
            cache[module] = _module_index(path)
        return cache[module]

    skip = set()
    for e in exclude:
        module, _, name = e.rpartition(".")
        if name not in index(module)[0]:
            raise ValueError(f"{e}: no module-level definition {name!r} in {module} to exclude")
        skip.add((module, name))
    todo: list[tuple[str, str]] = []
    for r in roots:
        module, _, name = r.rpartition(".")
        if name not in index(module)[0]:
            raise ValueError(f"{r}: no module-level definition {name!r} in {module}")
        todo.append((module, name))
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str, str]] = []
    while todo:
        module, name = todo.pop()
        if (module, name) in seen or (module, name) in skip:
            continue
        seen.add((module, name))
        defs, imports = index(module)
        for stmt in defs.get(name, []):
            code = _strip(stmt)
            out.append((f"{PACKAGE}/{'/'.join(module.split('.')[1:])}.py", name, ast.dump(code)))
            inner = [n for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
            local = {**imports, **_package_imports(inner)}
            for n in ast.walk(code):
                ident = n.id if isinstance(n, ast.Name) else None
                if ident is None:
                    continue
                if ident in local:
                    target_module, target = local[ident]
                    names = [target] if target is not None else list(index(target_module)[0])
                    todo.extend((target_module, t) for t in names if t in index(target_module)[0])
                elif ident in defs:
                    todo.append((module, ident))
    return sorted(out)
