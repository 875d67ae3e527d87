"""Experiment specs: typed dataclasses, loaded from YAML, overridden with dotted ``key=value``.

A spec is a tree of dataclasses. Loading checks every key and every type: an unknown key is an error
that lists the valid ones; a wrong type names the field and the type wanted. The resolved spec (every
default filled in) is saved as ``config.yaml`` in the run directory, so a run can be repeated exactly.
Method parameters live under ``method.params`` and are checked against the chosen method's own
dataclass (see ``experiments/methods``), so ``method.params.decay`` is valid for SR-STE but not for
``dense``.

Two checks stand between hostile input and a run, one mechanism each:

* every YAML nmtrain reads (a spec, an override's value, a run's config.yaml) goes through `yamlfile.load_yaml`:
  one regular UTF-8 text file of bounded size, no key twice in a mapping, and a bounded number of
  values and levels counted as if every alias were expanded (a "billion laughs" is refused, not built);
* every number in a spec (and in a method's parameters) is checked against its meaning, and every word
  with choices against them, when the YAML data becomes a dataclass: before anything is built or written.
  The rules sit on the fields (`rules.param`), the spec's sections' and a method's parameters' alike.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import SpecError
from .rules import SEED, Choice, Rule, above, at_least, choice_of, param, rule_of, rules_by_path
from .yamlfile import load_yaml, read_yaml


@dataclass
class ModelSpec:
    name: str = "lenet5"        # registry model, torchvision:NAME or package.module:function (external.py)
    width: float = param(1.0, above(0, "(the channel multiplier)"))   # channel multiplier (2.0 = Bi-Mask's 2x-wide ResNet-32)
    init: Optional[str] = None  # start from these weights (a state_dict file or a run directory)
    # The size of a language model (gpt, or your own): image models take none of these. The bounds catch a
    # typo before it asks for more memory than a machine has (n_embd 65536 is 4 GB per block already).
    n_layer: int = param(4, Rule(lo=1, hi=256, note="(transformer blocks)"))
    n_head: int = param(4, Rule(lo=1, hi=1024, note="(attention heads; n_embd must divide by it)"))
    n_embd: int = param(128, Rule(lo=1, hi=65536, note="(the embedding width)"))
    dropout: float = param(0.0, Rule(lo=0, hi=1, hi_open=True, note="(the share of activations dropped)"))
    bias: bool = False          # biases in the Linear layers and LayerNorms (nanoGPT's default is without)

    def __post_init__(self) -> None:
        # Every head gets n_embd / n_head dimensions: checked here, as the spec loads, before any data is read.
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (self.n_embd, self.n_head))
        if ints and self.n_embd % self.n_head:
            raise SpecError(f"model.n_embd: {self.n_embd} does not divide into model.n_head={self.n_head} heads; "
                            f"make n_embd a multiple of n_head (e.g. {self.n_head * max(1, self.n_embd // self.n_head)})")


# The model sizes a builder may take, with their defaults: read off ModelSpec, so they are written once.
MODEL_SIZES = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name not in ("name", "init")}


@dataclass
class DataSpec:
    dataset: str = "fashion_mnist"
    root: Optional[str] = None  # None: the dataset's default location
    batch_size: int = param(128, at_least(1))
    eval_batch_size: int = param(512, at_least(1))
    augment: bool = False
    train_subset: Optional[int] = param(None, at_least(1, "(null: the whole split)"))
    test_subset: Optional[int] = param(None, at_least(1, "(null: the whole split)"))
    holdout: Optional[int] = param(None, at_least(1, "(null: evaluate on the test split)"))   # train samples held out and evaluated instead of the test split
    download: bool = False      # CIFAR only, and only when asked
    num_workers: int = param(0, at_least(0, "(0: load in the main process)"))
    # pixels a side, resized to (imagefolder, cifar*); None: the dataset's own. Below 8 pixels little is left
    # to convolve; the upper bound catches a typo (2240) before it asks for a batch no memory holds (256
    # images of 3 x 1024 x 1024 floats are 3 GB already)
    image_size: Optional[int] = param(None, Rule(lo=8, hi=1024, note="pixels (null: the dataset's own size)"))
    # per-channel normalisation; None: the dataset's own statistics
    mean: Optional[list[float]] = param(None, Rule(note="(one per image channel)"))
    std: Optional[list[float]] = param(None, above(0, "(it divides the pixels)"))
    # Language-model datasets (shakespeare, text; data/text.py) only, so null means theirs: the char tokenizer
    # (byte: 256 symbols, any text) and 64 tokens of context. Set, an image dataset refuses them as any option
    # it does not take. The choices are data/tokenizer.py's TOKENIZERS, spelled here so the spec needs no torch.
    tokenizer: Optional[str] = param(None, choice=Choice(("char", "byte")))
    block_size: Optional[int] = param(None, Rule(lo=1, hi=65_536, note="tokens of context (null: 64)"))

    def __post_init__(self) -> None:
        # The list's shape; each value's range is on its field (data.mean, data.std).
        # Whether the dataset takes an option, and mean/std's length (its channel count), the dataset checks.
        for name in ("mean", "std"):
            if getattr(self, name) == []:
                raise SpecError(f"data.{name}: must be a list of finite numbers, one per image channel "
                                "(null: the dataset's own), got []")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise SpecError(f"data.mean, data.std: {len(self.mean)} and {len(self.std)} values; give one of each "
                            "per image channel")

    def options(self) -> dict[str, Any]:
        """The dataset builder's options this spec sets (image_size, mean, std; tokenizer, block_size); unset
        ones keep its defaults, and a set one the dataset does not take is refused (`data.check_options`)."""
        return {k: getattr(self, k) for k in ("image_size", "mean", "std", "tokenizer", "block_size")
                if getattr(self, k) is not None}


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
    name: str = param("sgd", choice=Choice(("sgd", "adamw")))
    lr: float = param(0.1, above(0, "(the step size)"))
    momentum: float = param(0.9, Rule(lo=0, hi=1, hi_open=True))
    weight_decay: float = param(5e-4, at_least(0))
    nesterov: bool = False
    betas: list[float] = param(rule=Rule(lo=0, hi=1, hi_open=True), default_factory=lambda: [0.9, 0.999])  # adamw
    # which parameters weight_decay applies to: all, or the matrices alone (weights of Linear/Conv and
    # embeddings; no decay on biases and norms, as nanoGPT and most transformer recipes)
    decay_params: str = param("all", choice=Choice(("all", "matrices")))
    grad_clip: Optional[float] = param(None, above(0, "(the gradients' total norm is clipped to it; null: no clipping)"))
    # torch's fused kernel for the update (`fused=True`): one pass over each parameter rather than one per tensor
    # operation, and on a CPU no MKL square root, whose rare-value path takes every zero of a pruned weight's
    # second moment (AdamW). Its arithmetic differs from the default's in the last bits, so off by default:
    # a spec trains as it always has, bit for bit, unless it asks
    fused: bool = False

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise SpecError(f"optim.betas: give two values (beta1, beta2), got {self.betas!r}")


@dataclass
class ScheduleSpec:
    name: str = param("cosine", choice=Choice(("cosine", "step", "constant")))
    warmup_epochs: float = param(0.0, at_least(0))
    warmup_steps: int = param(0, at_least(0, "(optimizer steps; 0: warmup_epochs decides)"))
    min_lr: float = param(0.0, at_least(0, "(the learning rate cosine ends at)"))
    milestones: list[float] = param(rule=at_least(0, "(epochs)"), default_factory=list)  # epochs, for step
    gamma: float = param(0.1, above(0, "(the learning rate's factor at each milestone)"))

    def __post_init__(self) -> None:
        if self.warmup_steps and self.warmup_epochs:
            raise SpecError("schedule.warmup_steps, schedule.warmup_epochs: both set; give the warmup in one of them")


@dataclass
class TrainSpec:
    epochs: int = param(1, at_least(1))
    max_steps: Optional[int] = param(None, at_least(1, "(null: train all epochs)"))     # stop early (tests, smoke runs)
    eval_interval: int = param(0, at_least(0, "(steps; 0: once per epoch)"))
    checkpoint_interval: int = param(0, at_least(0, "(steps; 0: once per epoch)"))
    # The training forward and backward under torch.compile (inductor); the method's per-step work stays
    # eager. Refused at load for what cannot be traced (Method.compile_problem) and for accel kernels.
    compile: bool = False
    # The CPU's denormal numbers taken as zero on every thread for the run (experiments/denormals.py): faster
    # on an Intel CPU where a model's tensors fill with them (STEP's GPT on text); the numbers may change where
    # a denormal reaches a result. x86-64 only, refused at load elsewhere. A CUDA run's kernels are not affected.
    flush_denormals: bool = False


@dataclass
class SweepSpec:
    """The grid `nmtrain compare` runs when no --methods/--patterns are given."""
    methods: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)   # method name -> method.params for that method's cells
    patterns_of: dict = field(default_factory=dict)   # method label -> its own patterns (default: patterns)
    seeds: list[int] = param(rule=SEED, default_factory=list)  # run every cell once per seed (empty: once, with `seed`)


@dataclass
class Spec:
    name: str = "experiment"
    seed: int = param(0, SEED)
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
# What each number may be, checked when YAML data becomes a dataclass (`from_dict`)


# Every number's rule sits on its field (``param(default, rule)``, experiments/rules.py): the spec's
# sections here, a method's parameters on its Params. A float without a rule must still be finite;
# tests/hostile/test_spec_values.py checks that every numeric field has one. RULES is the index of the
# spec's own, by dotted path, for a value checked outside its dataclass (compare's --seeds).
RULES: dict[str, Rule] = rules_by_path(Spec)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(key: str, value: Any, shown: str | None = None, default: Any = None, rule: Rule | None = None) -> None:
    """``value`` (a number or a list of them) against ``rule`` (default: ``RULES[key]``); the error names
    ``shown`` (default: the key), the rule and, where the field has one, its default as the fix."""
    rule = rule or RULES.get(key, Rule())
    values = value if isinstance(value, list) else [value]
    if all(rule.allows(v) for v in values if _is_number(v)):
        return
    floats = any(isinstance(v, float) for v in values)
    says = " ".join(t for t in ("a finite number" if floats else "", rule.says(), rule.note) if t)
    every = "every value " if isinstance(value, list) else ""
    fix = f"; e.g. {shown or key}={default}" if _is_number(default) else ""
    raise SpecError(f"{shown or key}: {every}must be {says or 'a number'}, got {value!r}{fix}")


class ChoiceError(SpecError):
    """A word that is none of its field's choices (its message names the field and the choices)."""


def _check_fields(obj: Any, where: str) -> None:
    """The rules on one dataclass's own fields: a number's range, a
    word's choices (nested sections are checked as they are built)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), _path(where, f.name)
        if _is_number(value) or (isinstance(value, list) and any(_is_number(v) for v in value)):
            check_number(key, value, default=f.default, rule=rule_of(f))
        choice = choice_of(f)
        if choice is not None and isinstance(value, str) and choice.refusal(key, value):
            raise ChoiceError(choice.refusal(key, value))


def check_values(obj: Any, where: str = "spec") -> None:
    """Every number and word of a dataclass tree (a Spec edited in code, say) against its rules."""
    _check_fields(obj, where)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, _path(where, f.name))


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
    if tp is float and isinstance(value, str) and value.isascii():    # float() would also read '０.１'
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and where.endswith("pattern"):
        raise SpecError(f"{where}: write the pattern as a quoted string like \"2:4\", got {value!r}")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")


# Keys nmtrain once wrote and no longer has, read and dropped: every run directory's config.yaml holds
# every key of its day (resume, adaprune and compare --reuse read it back), and shipped specs copied by
# users held them too. Each was read by nothing when it went, so dropping it changes no run.
RETIRED = frozenset({"train.log_interval"})


def from_dict(cls: type, data: Any, where: str = "spec") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    data = {k: v for k, v in data.items() if _path(where, k) not in RETIRED}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise SpecError(f"{_path(where, unknown[0])}: unknown key; valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], _path(where, name))
    obj = cls(**kwargs)
    _check_fields(obj, where)
    return obj


def _path(where: str, name: str) -> str:
    """A field's dotted path: ``seed`` at the top level, ``optim.lr`` in a section."""
    return name if where == "spec" else f"{where}.{name}"


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
        return path, load_yaml(raw, f"override {text!r}") if raw else None
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


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> Spec:
    data = read_yaml(path) if path is not None else {}
    return from_dict(Spec, apply_overrides(data, list(overrides)))


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(to_dict(spec), sort_keys=False)


SPECS_DIR = Path(__file__).parent / "specs"


def shipped_specs() -> list[Path]:
    return sorted(SPECS_DIR.glob("*.yaml"))
