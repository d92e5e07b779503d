"""What every bench script shares: the project root on ``sys.path``, the shared data sets, the machine's
CPU, params.yaml with overrides, one child-process timer (wall seconds + peak RSS), the idle-machine
check of the measuring protocol, and the ``--help`` every script prints.

A script imports it before any ``pipeline`` module (``from benchlib import ROOT, ...``; the script's
own folder is first on ``sys.path``, and isort's order puts it before the first-party ``pipeline``
block): importing it puts the project root on ``sys.path``, so the script then imports ``pipeline``
modules normally. Light on purpose: no TensorFlow, no Keras.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the one place: every script then imports pipeline.* as usual

# The real photo sets, read in place (never copied into the project): ../shared/datasets/<name>/<class>/...
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"

# The measuring protocol (bench/README.md), as every script's --help states it.
LOAD_LIMIT = 1.5
PROTOCOL = (
    f"speed: only on an idle machine (1-minute load average below {LOAD_LIMIT} before and during, no other job;\n"
    "  timing scripts print the load at start and end and warn at or above it), as ratios measured side by\n"
    "  side in one process, a first run (nothing cached) and a re-run reported apart. accuracy: a change needs\n"
    "  >= 3 seeds, paired (same split, features, head), reported as mean ± SD; 1-3 test images are noise."
)


def bench_parser(doc: str, takes: str) -> argparse.ArgumentParser:
    """The script's parser: ``--help`` shows its docstring (what it measures, how), how long a default run
    takes (``takes``), the measuring protocol and where the index of all bench scripts is."""
    epilog = "\n\n".join([
        textwrap.fill(f"default run: {takes}", 100, subsequent_indent="  "),
        f"measuring protocol:\n  {PROTOCOL}",
        "every bench script, its figures' doc page and command line: bench/README.md",
    ])
    return argparse.ArgumentParser(description=doc.strip(), epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform says: benchmark figures name their machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty when they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16 in the CPU flags: bf16 is measured where the CPU has it, never assumed."""
    return bool(set(BF16_FLAGS) & cpu_flags())


def bench_params(raw_dir: Path | str | None = None, overrides: list[str] = ()) -> dict:
    """params.yaml as a mapping, ``data.raw_dir`` set to ``raw_dir`` (unless None), each ``key.sub=value``
    override applied (values parsed as YAML 1.2, as ``dvc exp run -S`` writes them: ``3e-5`` is a number)."""
    from pipeline.core.params import parse_yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if raw_dir is not None:
        raw["data"]["raw_dir"] = str(raw_dir)
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = parse_yaml(value)
    return raw


def child_env(pythonpath: Path = ROOT, **extra: str) -> dict[str, str]:
    """This process's environment for a child, ``PYTHONPATH`` set to ``pythonpath`` (``python -m pipeline.x``
    finds that tree's library), plus ``extra`` variables."""
    return {**os.environ, "PYTHONPATH": str(pythonpath), **extra}


class Child(NamedTuple):
    seconds: float  # wall time around the process, start-up included
    peak_rss_mib: float  # the child's ru_maxrss: the largest of it and each descendant it waited for


def run_child(cmd: str | list[str], cwd: Path, env: dict[str, str] | None = None) -> Child:
    """Run ``cmd`` in ``cwd`` to completion (a string runs through the shell), stdout discarded →
    :class:`Child` (wall seconds, peak RSS in MiB from ``os.wait4``; Linux reports KiB). Raises
    RuntimeError with the tail of the child's stderr on a non-zero exit."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str),
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            text = cmd if isinstance(cmd, str) else " ".join(map(str, cmd))
            raise RuntimeError(f"{text} failed in {cwd} ({proc.returncode}):\n"
                               f"{err.read().decode(errors='replace')[-3000:]}")
    return Child(seconds, usage.ru_maxrss / 1024)


class IdleCheck:
    """Is the machine idle, as the measuring protocol asks? Prints the load averages (as ``uptime`` shows
    them) to stderr when created and at :meth:`finish` (or the end of a ``with`` block), samples the 1-minute
    load in between, and warns loudly whenever it is at or above ``LOAD_LIMIT``. ``start``, ``end``: the
    (1, 5, 15-minute) load averages; ``peak``: the highest 1-minute load seen."""

    def __init__(self, what: str, interval: float = 5.0):
        self.what = what
        self.start = self._report("start")
        self.end: tuple[float, float, float] | None = None
        self.peak = self.start[0]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._sampler.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, os.getloadavg()[0])

    def _report(self, when: str, peak: float | None = None) -> tuple[float, float, float]:
        load = os.getloadavg()
        during = "" if peak is None else f"; highest 1-minute load during: {peak:.2f}"
        print(f"[{self.what}] load average at {when}: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}{during}",
              file=sys.stderr, flush=True)
        worst = load[0] if peak is None else max(load[0], peak)
        if worst >= LOAD_LIMIT:
            bar = "!" * 100
            where = f"at the {when}" if peak is None else "during or at the end"
            print(f"{bar}\n!!! NOT IDLE: 1-minute load average {worst:.2f} >= {LOAD_LIMIT} {where} of {self.what}.\n"
                  f"!!! Speed figures from this run break the measuring protocol (bench/README.md): rerun on an "
                  f"idle machine.\n{bar}", file=sys.stderr, flush=True)
        return load

    def finish(self) -> tuple[float, float, float]:
        """The end of the measurement: stop sampling, print (and check) the load averages; once."""
        if self.end is None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self.peak, os.getloadavg()[0])
            self.end = self._report("end", self.peak)
        return self.end

    def __enter__(self) -> IdleCheck:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def idle_check(what: str) -> IdleCheck:
    """Start the idle-machine check of one measurement (see :class:`IdleCheck`): ``with idle_check(name): ...``,
    or ``check = idle_check(name)`` ... ``check.finish()``."""
    return IdleCheck(what)
