"""What CI relies on, proved with real git and DVC: a fresh clone restores data and run-cache from
the DVC remote, and ``dvc repro --pull --allow-missing`` re-runs only the stages whose inputs changed.

The tiny project (conftest.tiny_dvc_project) has run the pipeline and committed ``dvc.lock``;
here it pushes its data and run-cache to its local remote, as CI does on ``main``.
Run with ``-s`` to see the DVC output of each step.
"""
import re
from pathlib import Path

import pytest
import yaml
from conftest import run_dvc, run_git

pytestmark = pytest.mark.slow

ALL_STAGES = {"demo", "prepare", "extract", "audit", "train_head", "finetune", "evaluate", "export"}
AFTER_HEAD = {"train_head", "finetune", "evaluate", "export"}


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _show(title: str, output: str) -> None:
    """Print DVC's own lines (stage decisions, diffs), without the stages' TensorFlow logs."""
    keep = re.compile(r"^(Stage |Running stage|'data/|Pulling|Use `dvc push`|Path|\S+\.(json|yaml)|head\.|"
                      r"finetuned\.|Collecting|Fetching|Everything|\d+ files? |Data and pipelines)")
    lines = [ln for ln in output.splitlines() if keep.match(ln.strip())]
    print(f"\n$ {title}\n" + "\n".join(lines))


def _clone(origin: Path, dest: Path) -> Path:
    run_git(dest.parent, "clone", "-q", str(origin), dest.name)
    # A fresh clone has no DVC cache and none of the pipeline's outputs: only git-tracked files.
    assert not (dest / ".dvc" / "cache").exists()
    assert not (dest / "models" / "model.keras").exists() and not (dest / "features" / "train.h5").exists()
    return dest


def _set_head_c(project: Path, value: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["head"]["logreg"]["C"] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def pushed(tiny_dvc_project: Path) -> Path:
    out = run_dvc(tiny_dvc_project, "push", "--run-cache")
    _show("dvc push --run-cache  (origin)", out)
    return tiny_dvc_project


def test_fresh_clone_runs_no_stage(pushed: Path, tmp_path: Path):
    clone = _clone(pushed, tmp_path / "clone")
    out = run_dvc(clone, "repro", "--pull", "--allow-missing")
    _show("dvc repro --pull --allow-missing  (fresh clone, nothing changed)", out)
    assert _ran(out) == set(), out
    assert set(re.findall(r"Stage '(\w+)' didn't change, skipping", out)) == ALL_STAGES, out
    # --pull also fetched the run-cache that origin pushed (used when a stage's inputs match an
    # earlier run that dvc.lock does not record).
    assert any((clone / ".dvc" / "cache" / "runs").rglob("*")), "no run-cache pulled from the remote"
    # Everything the lock file names is in the remote: a full pull leaves nothing to do.
    run_dvc(clone, "pull")
    status = run_dvc(clone, "status")
    assert "Data and pipelines are up to date" in status, status


def test_head_param_change_reruns_only_head_and_later_stages(pushed: Path, tmp_path: Path):
    clone = _clone(pushed, tmp_path / "clone")
    _set_head_c(clone, 0.5)
    out = run_dvc(clone, "repro", "--pull", "--allow-missing")
    _show("dvc repro --pull --allow-missing  (head.logreg.C 0.1 → 0.5)", out)
    assert _ran(out) == AFTER_HEAD, out
    # train_head needed the cached features: pulled from the remote, not recomputed.
    assert (clone / "features" / "train.h5").is_file()

    params = run_dvc(clone, "params", "diff", "main")
    _show("dvc params diff main", params)
    assert re.search(r"head\.logreg\.C\s+0\.1\s+0\.5", params), params
    assert "backbone" not in params
    metrics = run_dvc(clone, "metrics", "diff", "main")
    _show("dvc metrics diff main", metrics)
    assert "reports/metrics.json" in metrics

