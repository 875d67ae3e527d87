"""Experiment specs: typed dataclasses, loaded from YAML, overridden with dotted ``key=value``.

A spec is a tree of dataclasses. Loading checks every key and every type: an unknown key is an error
that lists the valid ones; a wrong type names the field and the type wanted. The resolved spec (every
default filled in) is saved as ``config.yaml`` in the run directory, so a run can be repeated exactly.
Method parameters live under ``method.params`` and are checked against the chosen method's own
dataclass (see ``experiments/methods``), so ``method.params.decay`` is valid for SR-STE but not for
``dense``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ExperimentError


class SpecError(ExperimentError):
    """A spec that cannot be used; the one-line message names the field and the fix."""


# data.image_size bounds: below 8 pixels little is left to convolve; the upper bound catches a typo (2240)
# before it asks for a batch no memory holds (256 images of 3 x 1024 x 1024 floats are 3 GB already).
IMAGE_SIZES = (8, 1024)


@dataclass
class ModelSpec:
    name: str = "lenet5"        # registry model, torchvision:NAME or package.module:function (external.py)
    width: float = 1.0          # channel multiplier (2.0 = Bi-Mask's 2x-wide ResNet-32)
    init: Optional[str] = None  # start from these weights (a state_dict file or a run directory)


@dataclass
class DataSpec:
    dataset: str = "fashion_mnist"
    root: Optional[str] = None  # None: the dataset's default location
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    holdout: Optional[int] = None   # train samples held out and evaluated instead of the test split
    download: bool = False      # CIFAR only, and only when asked
    num_workers: int = 0
    image_size: Optional[int] = None        # pixels a side, resized to (imagefolder, cifar*); None: the dataset's own
    mean: Optional[list[float]] = None      # per-channel normalisation; None: the dataset's own statistics
    std: Optional[list[float]] = None

    def __post_init__(self) -> None:
        # Checked where the spec is loaded, so a bad value stops a run before anything is built or written.
        # Whether the dataset takes an option, and mean/std's length (its channel count), the dataset checks.
        lo, hi = IMAGE_SIZES
        if self.image_size is not None and not lo <= self.image_size <= hi:
            raise SpecError(f"data.image_size: must be {lo} to {hi} pixels (null: the dataset's own size), "
                            f"got {self.image_size}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values or not all(math.isfinite(v) for v in values):
                raise SpecError(f"data.{name}: must be a list of finite numbers, one per image channel "
                                f"(null: the dataset's own), got {values}")
            if name == "std" and min(values) <= 0:
                raise SpecError(f"data.std: every value must be above 0 (it divides the pixels), got {values}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise SpecError(f"data.mean, data.std: {len(self.mean)} and {len(self.std)} values; give one of each "
                            "per image channel")

    def options(self) -> dict[str, Any]:
        """The dataset builder's options this spec sets (image_size, mean, std); unset ones keep its defaults."""
        return {k: getattr(self, k) for k in ("image_size", "mean", "std") if getattr(self, k) is not None}


@dataclass
class MethodSpec:
    name: str = "dense"
    params: dict = field(default_factory=dict)  # checked against the method's own parameter dataclass


@dataclass
class SparsitySpec:
    pattern: str = "2:4"        # N kept of every M
    transposable: bool = False
    layout: str = "nhwc"        # nhwc | flatten
    solver: str = "exact"       # transposable mask solver
    include: list[str] = field(default_factory=list)   # fnmatch globs on module names; empty = default rule
    exclude: list[str] = field(default_factory=list)
    keep_first_dense: bool = True   # the first conv/linear stays dense (docs/methods.md#layer-selection)
    keep_last_dense: bool = True    # the classifier stays dense


@dataclass
class OptimSpec:
    name: str = "sgd"           # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class ScheduleSpec:
    name: str = "cosine"        # cosine | step | constant
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=list)  # epochs, for step
    gamma: float = 0.1


@dataclass
class TrainSpec:
    epochs: int = 1
    max_steps: Optional[int] = None     # stop early (tests, smoke runs)
    eval_interval: int = 0              # steps between evals; 0 = once per epoch
    checkpoint_interval: int = 0        # steps between checkpoints; 0 = once per epoch
    log_interval: int = 20


@dataclass
class SweepSpec:
    """The grid `nmtrain compare` runs when no --methods/--patterns are given."""
    methods: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)   # method name -> method.params for that method's cells
    seeds: list[int] = field(default_factory=list)   # run every cell once per seed (empty: once, with `seed`)


@dataclass
class Spec:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    accel: str = "none"                 # none | semi_structured (2:4 sparse kernels, transposable 2:4 only)
    out: str = "runs/experiment"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    sparsity: SparsitySpec = field(default_factory=SparsitySpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)


# ---------------------------------------------------------------------------------------------
# Typed conversion from plain YAML data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a {_type_name(tp)}, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and where.endswith("pattern"):
        raise SpecError(f"{where}: write the pattern as a quoted string like \"2:4\", got {value!r}")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, where: str = "spec") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = "" if where == "spec" else f"{where}."
        raise SpecError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], name if where == "spec" else f"{where}.{name}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted path of Spec, or None where the schema is open (method params)."""
    tp: Any = Spec
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    raw = raw.strip()
    tp = _field_type(path)
    # Strings stay as typed: YAML would read 2:4 as the base-60 integer 124.
    if tp in (str, Optional[str]):
        return path, None if (tp is Optional[str] and raw in ("null", "None", "~")) else raw
    try:
        return path, yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        return path, raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a plain dict (validation happens when the dict becomes a Spec)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"{'.'.join(path[:i + 1])}: is a value, not a section; cannot set {'.'.join(path)}")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"SPEC: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"SPEC: {path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"SPEC: {path} must hold a mapping of spec sections, got {type(data).__name__}")
    return data


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> Spec:
    data = read_yaml(path) if path is not None else {}
    return from_dict(Spec, apply_overrides(data, list(overrides)))


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)


SPECS_DIR = Path(__file__).parent / "specs"


def shipped_specs() -> list[Path]:
    return sorted(SPECS_DIR.glob("*.yaml"))
