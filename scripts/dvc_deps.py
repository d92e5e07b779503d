"""Rewrite each stage's code deps in dvc.yaml as the import closure of its module (pipeline.core.imports).

    python scripts/dvc_deps.py          # rewrite dvc.yaml in place (comments and layout kept)
    python scripts/dvc_deps.py --check  # exit 1, listing the stages whose deps differ

tests/test_stage_boundaries.py fails when the deps and the imports disagree; this fixes them.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.imports import import_closure  # noqa: E402


def stage_module(cmd: "str | list[str]") -> str:
    """The ``pipeline.<stage>`` module a stage's command runs (its last command when there are several)."""
    cmd = cmd[-1] if isinstance(cmd, list) else cmd
    m = re.match(r"\s*python -m (pipeline\.\w+)", cmd)
    if not m:
        raise SystemExit(f"dvc.yaml: a stage command does not run a pipeline module: {cmd!r}")
    return m.group(1)


def synced(text: str) -> str:
    """``text`` (dvc.yaml) with every stage's ``pipeline/`` deps replaced by its module's import closure."""
    stages = yaml.safe_load(text)["stages"]
    out, stage, in_deps = [], None, False
    for line in text.splitlines(keepends=True):
        m = re.match(r"^  (\w+):\s*$", line)
        if m and m.group(1) in stages:
            stage = m.group(1)
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out += [f"      - {d}\n" for d in import_closure(stage_module(stages[stage]["cmd"]))]
            continue
        if in_deps and re.match(r"^      - pipeline/", line):
            continue
        if in_deps and not line.startswith("      "):
            in_deps = False
        out.append(line)
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report; exit 1 when dvc.yaml is out of date")
    args = ap.parse_args()
    path = ROOT / "dvc.yaml"
    text = path.read_text(encoding="utf-8")
    new = synced(text)
    if args.check:
        if new != text:
            sys.exit("dvc.yaml's code deps differ from the stages' imports: run python scripts/dvc_deps.py")
        return
    if new != text:
        path.write_text(new, encoding="utf-8")
        print("dvc.yaml: code deps rewritten from the imports")


if __name__ == "__main__":
    main()
