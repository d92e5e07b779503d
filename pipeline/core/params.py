"""params.yaml → frozen, validated dataclasses. The only place params are parsed.

Every stage calls :func:`load_params`; an unknown or misspelt key, a wrong type or an
out-of-range value raises :class:`ParamsError` naming the key, the bad value and what is
allowed, before any work starts. Two values depend on the backbone registry, which params does not
import (core sits below every other package): ``backbone.name`` and a ``backbone.image_size`` below that
backbone's smallest input are checked by :func:`pipeline.backbones.registry.image_size` when a stage
resolves the backbone, which each stage that reads ``backbone`` does before its work.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.core.io import PipelineError


class ParamsError(PipelineError):
    """A bad params.yaml: the message names the key and says what is allowed."""


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


# What a path templated into dvc.yaml's commands cannot hold. DVC pastes ``${data.raw_dir}`` into
# the command text, inside double quotes, and runs it with $SHELL (sh, bash, zsh or fish): in
# there a space, an apostrophe or any non-ASCII letter is literal, but ", $, ` and \ are not
# (they end the quotes, expand a variable or a command, or escape), and DVC splits a command at
# line breaks. A leading ~ is not expanded inside quotes (nor by DVC in deps).
_SHELL_SPECIAL = {'"': "a double quote", "$": "a dollar sign", "`": "a backtick", "\\": "a backslash"}


def check_shell_path(key: str, value: str) -> None:
    """:class:`ParamsError` if ``value`` would not reach a stage intact through dvc.yaml's quoted command line."""
    bad = next((c for c in value if c in _SHELL_SPECIAL or c.splitlines() != [c]), None)
    if bad is not None:
        what = _SHELL_SPECIAL.get(bad, f"a line break ({bad!r})")
        raise ParamsError(
            f"{key}: {value!r} contains {what}, which the shell DVC runs each stage in would not pass on as "
            f"written, so the stage would read another path. Rename the folder without it, or make a link "
            f"with a plain name (ln -s {shlex.quote(value)} data/images) and set {key}: data/images")
    if value.startswith("~"):
        raise ParamsError(f"{key}: {value!r} starts with ~, which neither DVC nor the stage's quoted command "
                          f"expands; write the full path ({os.path.expanduser(value)!r})")


@dataclass(frozen=True)
class DataParams:
    raw_dir: str = "data/demo"
    val_fraction: float = field(default=0.15, metadata=_range(0.0, 1.0, lo_open=True, hi_open=True))
    test_fraction: float = field(default=0.15, metadata=_range(0.0, 1.0, hi_open=True))
    seed: int = 42
    # prepare's decode check: the share of image files that may be rejected before the run
    # fails, the fewest usable images a class may end with, the decompression-bomb guard.
    max_rejected_fraction: float = field(default=0.05, metadata=_range(0.0, 1.0))
    min_images_per_class: int = field(default=5, metadata=_range(1, None))
    max_image_pixels: int = field(default=100_000_000, metadata=_range(1, None))
    # Related images that must share a split: a regex with one capture group over each image's path
    # relative to raw_dir (null: none), and pHash near-copies within this many bits (-1: off).
    group_pattern: Optional[str] = None
    group_hash_bits: int = field(default=4, metadata=_range(-1, 32))
    # A folder with the same class sub-folders whose images are the test split; raw_dir is then split
    # into train and val only. A folder without class sub-folders (the default's README only) = none.
    test_dir: Optional[str] = "data/test"  # null is refused with the fix (dvc.yaml needs a folder)

    def __post_init__(self) -> None:
        check_shell_path("data.raw_dir", self.raw_dir)
        if not isinstance(self.test_dir, str):
            raise ParamsError(f"data.test_dir: {self.test_dir!r} is not a folder path; for no separate test set "
                              "point it at a folder without class sub-folders (the default data/test holds only "
                              "a README): dvc.yaml passes it to prepare and tracks it, so it must name a folder")
        check_shell_path("data.test_dir", self.test_dir)
        if self.group_pattern is not None:
            try:
                groups = re.compile(self.group_pattern).groups
            except re.error as exc:
                raise ParamsError(f"data.group_pattern: {self.group_pattern!r} is not a regular expression ({exc}); "
                                  "write one with one capture group, e.g. '^[^/]+/(.+)_frame' (null: no groups)"
                                  ) from None
            if groups != 1:
                raise ParamsError(
                    f"data.group_pattern: {self.group_pattern!r} has {groups} capture groups; it needs exactly one, "
                    "the part of the path that names the group (use (?:...) for other parentheses), e.g. "
                    "'^[^/]+/(patient\\d+)_' (null: no groups)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamsError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves nothing to train on; their sum must be < 1 (e.g. 0.15 and 0.15)"
            )


@dataclass(frozen=True)
class BackboneParams:
    # A name of the backbone registry (pipeline.backbones.registry), checked there when the backbone is
    # resolved (params does not import backbone code), as is image_size against that backbone's smallest input.
    name: str = "efficientnet_lite0"
    weights: str = "imagenet"
    image_size: Optional[int] = field(default=None, metadata=_range(32, 1024))
    pooling: Literal["avg", "max"] = "avg"


@dataclass(frozen=True)
class RayParams:
    # Ray cluster address (e.g. ray://head:10001); null = $RAY_ADDRESS, else a local Ray.
    address: Optional[str] = None
    actors: int = field(default=2, metadata=_range(1, 100000))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, 1024.0, lo_open=True))
    gpus_per_actor: float = field(default=0.0, metadata=_range(0.0, 64.0))
    # Images per Ray batch (whole model batches): one committed cache chunk each.
    batch_size: int = field(default=256, metadata=_range(1, 65536))


@dataclass(frozen=True)
class ExtractParams:
    batch_size: int = field(default=32, metadata=_range(1, 4096))
    gpu_batch_size: int = field(default=256, metadata=_range(1, 65536))
    # Augmented views (params ``augment``) of every training image whose features are cached
    # too, so the head is fitted on what fine-tuning trains on.
    augmented_views: int = field(default=4, metadata=_range(0, 64))
    # auto: TensorFlow on a GPU, ONNX Runtime on CPU (pipeline/runtime/engines.py).
    engine: Literal["auto", "tensorflow", "onnxruntime"] = "auto"
    # local: this process; ray: Ray Data actors (see pipeline/extraction/ray_executor.py), same features.
    executor: Literal["local", "ray"] = "local"
    ray: RayParams = RayParams()


@dataclass(frozen=True)
class LogregParams:
    C: float = field(default=0.1, metadata=_range(0.0, None, lo_open=True))
    max_iter: int = field(default=1000, metadata=_range(1, None))


@dataclass(frozen=True)
class DenseParams:
    hidden_units: int = field(default=0, metadata=_range(0, 65536))
    dropout: float = field(default=0.2, metadata=_range(0.0, 1.0, hi_open=True))
    learning_rate: float = field(default=1e-3, metadata=_range(0.0, 1.0, lo_open=True))
    epochs: int = field(default=100, metadata=_range(1, None))
    batch_size: int = field(default=32, metadata=_range(1, 65536))
    patience: int = field(default=10, metadata=_range(1, None))


@dataclass(frozen=True)
class HeadParams:
    type: Literal["logreg", "dense"] = "logreg"
    # "balanced": each class weighted n / (k * count) in the loss (sklearn's formula).
    class_weight: Literal["none", "balanced"] = "none"
    logreg: LogregParams = LogregParams()
    dense: DenseParams = DenseParams()


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = True
    rotation: float = field(default=0.05, metadata=_range(0.0, 0.5))
    zoom: float = field(default=0.1, metadata=_range(0.0, 0.9))
    translation: float = field(default=0.1, metadata=_range(0.0, 0.9))


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = field(default=8, metadata=_range(0, 10000))
    # auto: the backbone's own boundary (pipeline/backbones/registry.py); or a layer name of that backbone.
    unfreeze_from: str = "auto"
    # Move each BN's scale into its trainable conv before training (backbones.fold_bn_scale).
    fold_bn: bool = True
    # sgd: momentum SGD; adam; adamw: Adam with decoupled weight decay (finetune.weight_decay).
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    # Peak learning rate (reached after the warm-up).
    learning_rate: float = field(default=1e-4, metadata=_range(0.0, 1.0, lo_open=True))
    # Linear warm-up from 0 over this many epochs (fractions allowed), then ``schedule``.
    warmup_epochs: float = field(default=1.0, metadata=_range(0.0, None))
    schedule: Literal["constant", "cosine"] = "cosine"
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0, hi_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0, hi_open=True))
    # Momentum of an exponential moving average of the trained weights, updated every step; val
    # is measured on (and the kept epoch is) the average. 0 = off, the weights as trained.
    ema: float = field(default=0.98, metadata=_range(0.0, 1.0, hi_open=True))
    batch_size: int = field(default=16, metadata=_range(1, 4096))
    # Distinct augmented views of each training image, cycled over the epochs (epoch e trains on view
    # e % views); each costs one pass of the frozen bottom, once (cached).
    views: int = field(default=4, metadata=_range(1, 10000))
    patience: int = field(default=3, metadata=_range(1, None))
    class_weight: Literal["none", "balanced"] = "none"
    # Continue from the per-epoch checkpoint when it belongs to this very run (see finetune).
    resume: bool = True
    # Fine-tuning's own views (not the top-level ``augment``, which draws extract's views for the head):
    # stronger, since a top that trains on the same few views memorises them.
    augment: AugmentParams = AugmentParams(rotation=0.1, zoom=0.2, translation=0.15)

    def __post_init__(self) -> None:
        if self.weight_decay > 0 and self.optimizer == "adam":
            raise ParamsError(
                "finetune.weight_decay applies to optimizer sgd or adamw (decoupled decay), not adam; "
                "set finetune.optimizer: adamw, or finetune.weight_decay: 0")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = field(default=32, metadata=_range(1, 4096))
    n_mistakes: int = field(default=16, metadata=_range(0, 1000))
    engine: Literal["auto", "tensorflow", "onnxruntime"] = "auto"
    # Test-time augmentation: average each model's probabilities over the image and its mirror image.
    tta: bool = False


@dataclass(frozen=True)
class AuditParams:
    # k of the stratified k-fold over train + val that gives every image an out-of-fold probability.
    folds: int = field(default=10, metadata=_range(2, 100))
    # Inverse L2 strength of each fold's logistic regression.
    C: float = field(default=0.01, metadata=_range(0.0, None, lo_open=True))
    # Standardize each feature dimension over the fold's training rows (else one RMS scale).
    standardize: bool = True
    max_iter: int = field(default=1000, metadata=_range(1, None))
    # Train the fold models on the cached augmented views too, and average a train image's
    # prediction over it and its views.
    views: bool = True
    # Near-duplicates relative to each image's neighbourhood: a pair whose feature cosine distance is at
    # most duplicate_ratio times the smaller of the two images' distances to their
    # duplicate_neighbors-th nearest image.
    duplicate_neighbors: int = field(default=10, metadata=_range(1, 1000))
    duplicate_ratio: float = field(default=0.33, metadata=_range(0.0, 1.0, lo_open=True))
    # ...or whose 64-bit perceptual hashes differ in at most this many bits while each image is among
    # the other's duplicate_neighbors nearest; -1: off.
    duplicate_hash_bits: int = field(default=6, metadata=_range(-1, 64))
    # Neighbours of cleanlab's kNN out-of-distribution score.
    outlier_neighbors: int = field(default=10, metadata=_range(1, 1000))
    # A class with fewer train images than this share of the largest class's is flagged.
    imbalance_ratio: float = field(default=0.2, metadata=_range(0.0, 1.0))
    # Images (or pairs) per gallery PNG.
    gallery_size: int = field(default=16, metadata=_range(0, 1000))


@dataclass(frozen=True)
class Params:
    seed: int = 42
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    augment: AugmentParams = AugmentParams()
    extract: ExtractParams = ExtractParams()
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    audit: AuditParams = AuditParams()


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(key, value, inner, meta)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ParamsError(f"{key}: {value!r} is not allowed; use {_describe(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            allowed = sorted(f.name for f in dataclasses.fields(tp))
            raise ParamsError(f"{key}: expected a mapping of {allowed}, got {value!r}")
        return _build(tp, value, key + ".")
    # bool is an int subclass in Python; a `true` where a number belongs is a mistake.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str) and value != ""
    else:  # pragma: no cover - all field types are listed above
        raise TypeError(tp)
    if not ok:
        raise ParamsError(f"{key}: {value!r} is not {_describe(tp)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ParamsError(f"{key}: {value!r} is not allowed; use one of: {', '.join(meta['choices'])}")
    if "lo" in meta:
        lo, hi = meta["lo"], meta["hi"]
        bad_lo = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
        bad_hi = hi is not None and (value >= hi if meta["hi_open"] else value > hi)
        if bad_lo or bad_hi:
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            brackets = ("(" if meta["lo_open"] or lo is None else "[", ")" if meta["hi_open"] or hi is None else "]")
            raise ParamsError(f"{key}: {value!r} is out of range; allowed {brackets[0]}{lo_s}, {hi_s}{brackets[1]}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        where = f" under {prefix.rstrip('.')}" if prefix else ""
        raise ParamsError(f"unknown key {prefix}{unknown[0]!s} in params.yaml; allowed keys{where}: "
                          + ", ".join(names))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(prefix + f.name, raw[f.name], hints[f.name], dict(f.metadata))
    return cls(**kwargs)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats.

    PyYAML follows YAML 1.1, where a float needs a dot (``1e-4`` and ``3e-5`` load as strings),
    while DVC (``dvc exp run -S``, ``dvc params diff``) reads and writes YAML 1.2. With this
    loader every number a user writes the usual way (``1e-4``, ``3e-5``, ``1E3``, ``.5``,
    ``1_000.0`` stays YAML 1.1's) is a number, wherever it comes from.
    """


_Yaml12Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text → Python objects, numbers read as YAML 1.2 (and DVC) read them."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_params(raw: dict | None) -> Params:
    """Validate a params mapping (as loaded from YAML) into :class:`Params`."""
    return _build(Params, raw or {})


def load_params(path: str | Path = "params.yaml", stage: Optional[str] = None,
                sections: Optional[tuple[str, ...]] = None) -> Params:
    """Load and validate ``params.yaml``; raises :class:`ParamsError` on any bad key or value.

    With ``sections`` (a stage's declared params, as in dvc.yaml), every other top-level
    section is replaced by :class:`Undeclared`, so reading it fails loudly. The whole file is
    still validated.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        params = parse_params(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    if sections is None:
        return params
    return restrict(params, stage or "?", sections)


class StageParams(Params):
    """Params of one stage: reading a top-level key the stage does not declare raises :class:`ParamsError`.

    A stage that read a section DVC does not know it reads would not re-run when that section
    changes; this turns such a read into an error on its first run instead of a stale result.
    """

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "_undeclared"):
            stage = object.__getattribute__(self, "_stage")
            raise ParamsError(
                f"stage {stage} read params {name!r}, but its dvc.yaml entry does not declare it under params: "
                f"add {name!r} there and to PARAMS in pipeline/{stage}.py")
        return object.__getattribute__(self, name)


def restrict(params: Params, stage: str, sections: tuple[str, ...]) -> Params:
    """``params`` with every top-level key outside ``sections`` (dvc.yaml entries, e.g. ``seed``,
    ``backbone``, ``extract.batch_size``) made unreadable."""
    declared = {s.split(".")[0] for s in sections}
    out = object.__new__(StageParams)
    for f in dataclasses.fields(Params):
        object.__setattr__(out, f.name, getattr(params, f.name))
    object.__setattr__(out, "_undeclared", frozenset(f.name for f in dataclasses.fields(Params)) - declared)
    object.__setattr__(out, "_stage", stage)
    return out


def as_dict(params: Any) -> dict:
    """Params (or a section) → plain dict, e.g. for provenance attrs."""
    return dataclasses.asdict(params)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.core.params [params.yaml]``: validate a params file; a bad one is one error line, status 1.

    dvc.yaml runs it before the first command that pastes ``data.raw_dir`` in: a path the quoted
    command cannot carry (:func:`check_shell_path`) is reported by name before a shell reads it.
    """
    import argparse

    from pipeline.core.io import setup_logging, user_errors

    ap = argparse.ArgumentParser(description="Validate params.yaml (every key and value) without running anything")
    ap.add_argument("params", nargs="?", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        load_params(args.params)


if __name__ == "__main__":
    main()
