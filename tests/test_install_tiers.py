"""Install tiers (docs/install.md): requirements.txt is what running the pipeline needs; the optional
tiers hold the rest; scripts/test.sh installs every tier the tests use; a missing optional tier
stops with one line naming its install command."""
import re
from pathlib import Path

from conftest import ROOT

OPTIONAL = {"dev": {"pytest", "ruff"}, "ray": {"ray"}, "litert": {"ai-edge-litert"}}


def requirements(path: Path) -> dict[str, str]:
    """``name`` → the full requirement line, following ``-r`` includes; names normalized as pip does."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out.update(requirements(path.parent / line[3:].strip()))
            continue
        name = re.split(r"[\[=<>!~;\s]", line, maxsplit=1)[0].lower().replace("_", "-")
        assert name not in out, f"{path.name}: {name} listed twice"
        out[name] = line
    return out


def test_every_requirement_is_pinned_exactly():
    for path in sorted(ROOT.glob("requirements*.txt")):
        for line in requirements(path).values():
            assert re.search(r"==\d", line), f"{path.name}: {line!r} is not pinned to one version"


def test_runtime_holds_no_optional_tier_and_each_tier_its_packages():
    runtime = set(requirements(ROOT / "requirements.txt"))
    assert {"keras", "dvc", "onnxruntime", "tensorflow-cpu"} <= runtime
    for tier, names in OPTIONAL.items():
        assert not names & runtime, f"{names & runtime} belong to requirements-{tier}.txt, not the runtime"
        assert set(requirements(ROOT / f"requirements-{tier}.txt")) == names


def test_gpu_tier_is_the_runtime_with_tensorflows_cuda_build():
    cpu, gpu = requirements(ROOT / "requirements.txt"), requirements(ROOT / "requirements-gpu.txt")
    version = re.search(r"==([\d.]+)", cpu["tensorflow-cpu"]).group(1)
    assert gpu.pop("tensorflow") == f"tensorflow[and-cuda]=={version}"
    cpu.pop("tensorflow-cpu"), cpu.pop("tensorflow")
    assert gpu == cpu


def test_the_test_script_installs_every_tier_the_tests_use():
    script = (ROOT / "scripts" / "test.sh").read_text()
    m = re.search(r'EXTRAS="\$\{EXTRAS:-([^}]*)\}" source scripts/setup.sh', script)
    assert m and set(m.group(1).split()) == set(OPTIONAL), "scripts/test.sh must install dev ray litert"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
