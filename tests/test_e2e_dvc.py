"""Real `dvc repro` of the real dvc.yaml on tiny images in a temporary git + DVC project.

Each test that changes a project works on its own copy (conftest.copy_project) of the one
that ran the pipeline once, so the tests do not depend on each other's order.
"""
import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, copy_project, ran_stages, run_dvc, run_git

pytestmark = pytest.mark.slow

STAGES = {"demo", "prepare", "extract", "audit", "train_head", "finetune", "evaluate", "export"}


def test_repro_runs_every_stage_and_writes_metrics(tiny_dvc_run):
    proj = tiny_dvc_run.path
    assert ran_stages(tiny_dvc_run.first_repro) == STAGES
    metrics = json.loads((proj / "reports" / "metrics.json").read_text())
    for model in ("head", "finetuned"):
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
        assert metrics[model]["n"] > 0
    details = json.loads((proj / "reports" / "per_class.json").read_text())
    for model in ("head", "finetuned"):
        assert len(details[model]["confusion_matrix"]) == 3
        assert set(details[model]["per_class"]) == {"circle", "square", "stripes"}
    assert (proj / "reports" / "mistakes.png").stat().st_size > 0
    audit = json.loads((proj / "reports" / "audit.json").read_text())
    assert audit["images"] == 36 and 0.0 <= audit["out_of_fold_accuracy"] <= 1.0
    header = (proj / "reports" / "audit" / "label_issues.csv").read_text().splitlines()[0]
    assert header == "path,split,given_label,suggested_label,score"
    assert (proj / "reports" / "audit" / "gallery" / "near_duplicates.png").stat().st_size > 0
    for f in ("features/train.h5", "features/val.h5", "features/test.h5", "models/head.keras", "models/model.keras"):
        assert (proj / f).is_file(), f
    # The demo stage generated the default images even though this project's params point elsewhere.
    assert (proj / "data" / "demo" / ".demo-dataset").is_file()


def test_second_repro_runs_nothing(tiny_dvc_project, tmp_path):
    proj = copy_project(tiny_dvc_project, tmp_path / "proj")
    out = run_dvc(proj, "repro")
    assert ran_stages(out) == set(), out
    assert "Data and pipelines are up to date" in out


def test_head_param_change_reruns_only_downstream_of_extract(tiny_dvc_project, tmp_path):
    proj = copy_project(tiny_dvc_project, tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["head"]["logreg"]["C"] = 0.5
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_dvc(proj, "repro")
    assert ran_stages(out) == {"train_head", "finetune", "evaluate", "export"}, out
    diff = run_dvc(proj, "params", "diff")
    assert "head.logreg.C" in diff and "0.5" in diff
    assert "backbone" not in diff
    assert "head.accuracy" in run_dvc(proj, "metrics", "diff", "--all")  # the run against the committed one


def test_seed_change_does_not_rerun_extract(tiny_dvc_project, tmp_path):
    """extract does not read `seed`, so it does not declare it: only the stages that read it re-run."""
    proj = copy_project(tiny_dvc_project, tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["seed"] = 7
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_dvc(proj, "repro")
    assert ran_stages(out) == {"audit", "train_head", "finetune", "evaluate", "export"}, out


def test_metrics_show_lists_stage_metrics(tiny_dvc_project):
    out = run_dvc(tiny_dvc_project, "metrics", "show")
    assert "reports/metrics.json" in out and "head.accuracy" in out


def test_missing_raw_dir_is_one_line_that_says_what_to_do(tmp_path):
    """Run directly (as DVC runs it), prepare says in one line which param to fix, with no traceback."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--raw-dir", str(tmp_path / "nope"),
                           "--manifest", str(tmp_path / "m.csv"), "--classes", str(tmp_path / "c.json"),
                           "--params", str(ROOT / "params.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "data.raw_dir" in errors[0] and "point data.raw_dir" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


EXP_PROJECT_STAGE = """stages:
  show_lr:
    cmd: python -c "from pipeline.params import load_params; print(load_params().finetune.learning_rate)" > lr.txt
    deps:
      - pipeline/params.py
    params:
      - finetune.learning_rate
    outs:
      - lr.txt:
          cache: false
"""


@pytest.mark.parametrize("written", ["3e-5", "1E-3", ".5e-4"])
def test_dvc_exp_run_set_param_with_an_exponent_is_a_number(tmp_path, written):
    """`dvc exp run -S` writes params.yaml as YAML 1.2; every number a user types must load as a number."""
    import shutil

    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(ROOT / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    (proj / "dvc.yaml").write_text(EXP_PROJECT_STAGE)
    (proj / ".gitignore").write_text("__pycache__/\n")
    run_git(proj, "init", "-q", "-b", "main")
    run_dvc(proj, "init", "-q")
    run_git(proj, "add", "-A")
    run_git(proj, "commit", "-qm", "exp project")
    out = run_dvc(proj, "exp", "run", "-S", f"finetune.learning_rate={written}")
    assert ran_stages(out) == {"show_lr"}, out
    assert float((proj / "lr.txt").read_text()) == pytest.approx(float(written))
