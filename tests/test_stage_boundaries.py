"""Stage boundaries DVC can trust: dvc.yaml's deps and params are derived facts, not hand-kept lists.

- a stage's code deps are exactly the pipeline/ modules its module imports, directly or through
  others (pipeline.core.imports.import_closure), so an edit re-runs exactly the stages it can change;
- a stage module imports no other stage module;
- a stage's params are exactly what its module declares in PARAMS, and reading anything else fails;
(the feature cache's key is tested in tests/test_feature_key.py).
"""
import importlib
import re

import pytest
import yaml
from conftest import ROOT

from pipeline.backbones.registry import REGISTRY
from pipeline.core.imports import import_closure
from pipeline.core.params import ParamsError, load_params

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module(stage: str) -> str:
    cmd = DVC[stage]["cmd"]
    if isinstance(cmd, list):  # checks first (python -m pipeline.core.params), the stage's module last
        cmd = cmd[-1]
    m = re.match(r"python -m (pipeline\.\w+)", cmd.strip())
    assert m, f"stage {stage}: command does not run a pipeline module: {DVC[stage]['cmd']}"
    return m.group(1)


STAGE_MODULES = {stage: _module(stage) for stage in DVC}


@pytest.mark.parametrize("stage", list(DVC))
def test_code_deps_are_exactly_the_import_closure(stage):
    listed = sorted(d for d in DVC[stage]["deps"] if d.startswith("pipeline/"))
    assert listed == import_closure(STAGE_MODULES[stage]), (
        f"dvc.yaml deps of {stage} differ from its imports: run python scripts/dvc_deps.py")


@pytest.mark.parametrize("stage", list(DVC))
def test_a_stage_imports_no_other_stage(stage):
    own = STAGE_MODULES[stage].replace(".", "/") + ".py"
    others = {m.replace(".", "/") + ".py" for s, m in STAGE_MODULES.items() if s != stage}
    assert not others & (set(import_closure(STAGE_MODULES[stage])) - {own})


@pytest.mark.parametrize("stage", list(DVC))
def test_declared_params_match_dvc_yaml(stage):
    module = importlib.import_module(STAGE_MODULES[stage])
    assert tuple(DVC[stage].get("params", [])) == module.PARAMS


def test_reading_an_undeclared_param_fails_naming_the_stage():
    params = load_params(ROOT / "params.yaml", "extract", ("backbone", "extract"))
    assert params.extract.batch_size > 0 and params.backbone.name
    with pytest.raises(ParamsError, match=r"stage extract read params 'seed'.*pipeline/extract.py"):
        _ = params.seed
    with pytest.raises(ParamsError, match=r"stage extract read params 'head'"):
        _ = params.head.type


def test_every_registered_backbone_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in REGISTRY if f"`{name}`" not in readme]
    assert not missing, f"README does not mention backbones {missing}"
