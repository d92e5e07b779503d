"""What several bench scripts share: the CPU's name for their reports, and params.yaml with ``-S`` overrides.

Imported as ``from benchlib import ...`` (a script's own folder is first on ``sys.path``); light on
purpose: no TensorFlow, no Keras.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # pipeline.core.params, for bench_params


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform says: benchmark figures name their machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_params(raw_dir: Path, overrides: list[str] = ()) -> dict:
    """params.yaml as a mapping, ``data.raw_dir`` set to ``raw_dir``, each ``key.sub=value`` override applied
    (values parsed as YAML 1.2, as ``dvc exp run -S`` writes them: ``3e-5`` is a number)."""
    from pipeline.core.params import parse_yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["raw_dir"] = str(raw_dir)
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parse_yaml(value)
    return raw
