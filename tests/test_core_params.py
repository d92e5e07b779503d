"""params.yaml → validated dataclasses (pipeline/core/params.py): every bad key or value named with what is
allowed, YAML 1.2 numbers, the code defaults equal to params.yaml. (Backbone names and sizes are checked by
the registry: test_backbones_registry.py.)"""
import dataclasses
import re

import pytest
from conftest import ROOT, as_params, tiny_params

from pipeline.core.params import ParamsError, load_params, parse_params


def test_repo_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.backbone.name == "efficientnet_lite0"
    assert p.head.type in ("logreg", "dense")


def test_every_param_in_params_yaml_has_a_comment():
    """A comment must sit directly above every key (sections included)."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_]+):", line)
        if not m:
            continue
        j = i - 1
        commented = False
        while j >= 0 and lines[j].strip().startswith("#"):
            commented = True
            j -= 1
        if not commented:
            missing.append(line.strip())
    assert missing == [], f"params without a comment: {missing}"


@pytest.mark.parametrize("raw, needle", [
    ({"head": {"tpye": "logreg"}}, "unknown key head.tpye"),
    ({"head": {"type": "svm"}}, "'logreg', 'dense'"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction: 1.5 is out of range"),
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "leaves nothing to train on"),
    ({"extract": {"batch_size": "32"}}, "extract.batch_size: '32' is not an integer"),
    ({"augment": {"flip": 1}}, "augment.flip: 1 is not true or false"),
    ({"finetune": {"augment": {"flipp": True}}}, "unknown key finetune.augment.flipp"),
    ({"finetune": {"augment": {"zoom": 1.5}}}, "finetune.augment.zoom: 1.5 is out of range"),
    ({"finetune": {"optimizer": "rmsprop"}}, "finetune.optimizer: 'rmsprop' is not allowed; use one of 'sgd', "
                                             "'adam', 'adamw'"),
    ({"finetune": {"optimizer": "adam", "weight_decay": 0.01}},
     "finetune.weight_decay applies to optimizer sgd or adamw"),
    ({"extract": {"augmented_views": 100}}, "extract.augmented_views: 100 is out of range"),
    ({"finetune": {"learning_rate": 0}}, "finetune.learning_rate: 0.0 is out of range"),
    ({"sed": 1}, "unknown key sed"),
    ({"data": {"raw_dir": "/data/cost $5"}}, "data.raw_dir: '/data/cost $5' contains a dollar sign"),
    ({"data": {"raw_dir": "~/photos"}}, "data.raw_dir: '~/photos' starts with ~"),
    ({"data": {"raw_dir": "two\nlines"}}, "contains a line break"),
])
def test_bad_params_name_key_and_allowed_values(raw, needle):
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert needle in str(exc.value)


def test_params_are_frozen():
    p = as_params(tiny_params())
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 1  # type: ignore[misc]


def test_load_params_names_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("head:\n  type: forest\n")
    with pytest.raises(ParamsError, match=r"params.yaml: head.type"):
        load_params(f)


@pytest.mark.parametrize("written, value", [("1e-4", 1e-4), ("3e-5", 3e-5), ("1E3", 1000.0), (".5", 0.5),
                                            ("2.5e+3", 2500.0), ("3e-05", 3e-5), ("0.0001", 1e-4)])
def test_numbers_written_the_usual_way_are_numbers(tmp_path, written, value):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string; DVC and users write YAML 1.2, where it is a float."""
    f = tmp_path / "params.yaml"
    f.write_text(f"head:\n  logreg:\n    C: {written}\n")
    p = load_params(f)
    assert p.head.logreg.C == pytest.approx(value)
    assert isinstance(p.head.logreg.C, float)


def test_a_string_that_looks_like_a_number_in_an_int_field_is_still_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("extract:\n  batch_size: 1e3\n")
    with pytest.raises(ParamsError, match=r"extract.batch_size: 1000.0 is not an integer"):
        load_params(f)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_code_defaults_equal_params_yaml():
    """One source of defaults: a key left out of params.yaml means what params.yaml itself says."""
    from pipeline.core.params import Params, as_dict, parse_yaml

    written = _leaves(parse_yaml((ROOT / "params.yaml").read_text(encoding="utf-8")))
    code = _leaves(as_dict(Params()))
    assert sorted(written) == sorted(code), "params.yaml and pipeline/core/params.py list different keys"
    # A bool is an int to ==; `true` where a number belongs (or 1 for true) is drift too.
    drift = {k: (code[k], written[k]) for k in code
             if code[k] != written[k] or isinstance(code[k], bool) != isinstance(written[k], bool)}
    assert drift == {}, f"pipeline/core/params.py default vs params.yaml value: {drift}"


@pytest.mark.parametrize("raw, needle", [
    ({"data": {"max_rejected_fraction": 1.5}}, "data.max_rejected_fraction: 1.5 is out of range; allowed [0.0, 1.0]"),
    ({"data": {"min_images_per_class": 0}}, "data.min_images_per_class: 0 is out of range"),
    ({"data": {"max_image_pixels": "1e8"}}, "data.max_image_pixels: '1e8' is not an integer"),
    ({"data": {"max_rejected_fraktion": 0.1}}, "unknown key data.max_rejected_fraktion"),
    ({"head": {"class_weight": "auto"}}, "head.class_weight: 'auto' is not allowed; use one of 'none', 'balanced'"),
    ({"finetune": {"class_weight": True}}, "finetune.class_weight: True is not allowed"),
    ({"finetune": {"resume": "yes"}}, "finetune.resume: 'yes' is not true or false"),
])
def test_bad_new_params_name_the_key_the_value_and_what_is_allowed(raw, needle):
    with pytest.raises(ParamsError) as exc:
        parse_params(raw)
    assert needle in str(exc.value)


def test_new_params_defaults():
    p = parse_params({})
    assert (p.data.max_rejected_fraction, p.data.min_images_per_class, p.data.max_image_pixels) == \
        (0.05, 5, 100_000_000)
    assert (p.head.class_weight, p.finetune.class_weight, p.finetune.resume) == ("none", "none", True)
