"""Real `dvc repro` of the real dvc.yaml on tiny images in a temporary project."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_images, tiny_params

pytestmark = pytest.mark.slow

STAGES = ("prepare", "extract", "train_head", "finetune", "evaluate", "export")


def _dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("proj")
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    make_images(proj / "data" / "raw", per_class=12)
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params("data/raw")))
    _git(proj, "init", "-q")
    _dvc(proj, "init", "-q")
    _dvc(proj, "config", "core.analytics", "false")
    _git(proj, "add", "-A")
    _git(proj, "commit", "-qm", "tiny project")
    return proj


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True)


def test_repro_runs_every_stage_and_writes_metrics(project):
    out = _dvc(project, "repro")
    assert _ran(out) == set(STAGES)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for model in ("head", "finetuned"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
        assert metrics[model]["n"] > 0
    details = json.loads((project / "reports" / "per_class.json").read_text())
    for model in ("head", "finetuned"):
        assert len(details[model]["confusion_matrix"]) == 3
        assert set(details[model]["per_class"]) == {"circle", "square", "stripes"}
    assert (project / "reports" / "mistakes.png").stat().st_size > 0
    for f in ("features/train.h5", "features/val.h5", "features/test.h5", "models/head.keras", "models/model.keras"):
        assert (project / f).is_file(), f


def test_second_repro_runs_nothing(project):
    out = _dvc(project, "repro")
    assert _ran(out) == set(), out
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "first run")


def test_head_param_change_reruns_only_downstream_of_extract(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["head"]["logreg"]["C"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = _dvc(project, "repro")
    assert _ran(out) == {"train_head", "finetune", "evaluate", "export"}, out
    diff = _dvc(project, "params", "diff")
    assert "head.logreg.C" in diff and "0.5" in diff
    assert "backbone" not in diff
    _dvc(project, "metrics", "diff")  # compares the run against the committed one


def test_metrics_show_lists_stage_metrics(project):
    out = _dvc(project, "metrics", "show")
    assert "reports/metrics.json" in out and "head.accuracy" in out
