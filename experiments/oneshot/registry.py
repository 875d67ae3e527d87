"""The one-shot conversion methods by name: the contract a method implements and the registry it joins.

A method turns a trained model's sparse layers into N:M (or N:M-T) layers without retraining it::

    @register_oneshot("name", params=MyParams, sequential=lambda p: True, title="Mine",
                      summary="one line for the docs")
    def mine(job: Job, params: MyParams) -> Outcome:
        for name, layer in job.layers.items():       # the layer plan, in model order
            ...                                      # set layer.weight (masked) in place
        return Outcome(masks={name: keep, ...})

What a method may use is in its `Job`: the original model (read only) and the model it converts in place,
the layer plan, the calibration batches (inputs and targets, from the training split, seeded), the task's
loss, a prior mask per layer (magnitude's), the device, a seeded generator and a progress bar. Its
``params`` are a dataclass whose fields are its choices, each a CLI option of ``nmtrain adaprune`` named
``--field-name``, with the reference's defaults, checked by ``check(pattern)`` (one line naming the
option); `NoParams` when it has none. ``needs_loss`` says that it learns on the task's loss (so the
calibration batches need targets). ``sequential(params)`` says whether a layer sees the inputs of the
already-converted model (its per-layer errors are measured on those), and ``reconstructs`` that it fits
the kept weights itself (so ``--finetune`` would repeat it and is refused).

The method names are the torch-free catalogue's (``experiments/catalogue.py`` ``ONESHOT_METHODS``).
A name the catalogue lists whose module is absent from this installation is refused in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...sparsity import Pattern
from ..catalogue import ONESHOT_METHODS, ONESHOT_MODULES
from ..errors import ExperimentError
from ..tasks import Task


class ConversionError(ExperimentError):
    """Input a one-shot conversion cannot use (source, method, options, output directory); one-line message."""


@dataclass
class Calibration:
    """The calibration batches: ``inputs`` (images, or token windows) and their ``targets`` (labels, or the
    next tokens), a seeded sample of the training split (never its held-out part), on the CPU."""
    inputs: torch.Tensor
    targets: torch.Tensor
    seed: int
    batch: int = 256            # samples per forward pass

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) in order, ``batch`` samples at a time, on ``device``."""
        for i in range(0, len(self), self.batch):
            yield self.inputs[i:i + self.batch].to(device), self.targets[i:i + self.batch].to(device)


@dataclass
class Job:
    """What a one-shot method works on. ``model``'s ``layers`` are converted in place; ``original`` is never changed."""
    original: nn.Module                 # the source model, eval mode, on ``device``
    model: nn.Module                    # the model being converted (a copy of ``original`` at the start)
    layers: dict[str, nn.Module]        # the layer plan: ``model``'s sparse Linear/Conv2d by name, in model order
    pattern: Pattern
    layout: str                         # the GEMM view of a conv weight (sparsity/layout.py)
    solver: str                         # the transposable solver of N:M-T masks
    calib: Calibration
    task: Task                          # ``task.loss(net, x, y)``: the task's own loss
    prior: dict[str, torch.Tensor]      # a prior mask per layer: magnitude's, of ``original``'s weights
    device: torch.device
    generator: torch.Generator          # seeded by --calib-seed: every random draw of a method
    progress: Any                       # a rich Progress (disabled with --no-progress): ``add_task``, ``update``

    def original_layer(self, name: str) -> nn.Module:
        return self.original.get_submodule(name)

    def fresh(self) -> "Job":
        """The same job on a new copy of ``original`` (for a method that needs another method's result, e.g. a prior)."""
        model = copy.deepcopy(self.original)
        return dataclasses.replace(self, model=model, layers={name: model.get_submodule(name) for name in self.layers})


@dataclass
class Outcome:
    """What a method returns; the weights of ``job.layers`` are already set, each with its mask folded in."""
    masks: dict[str, torch.Tensor]                                  # layer name -> keep mask (the weight's shape)
    fields: dict = field(default_factory=dict)                      # the method's own summary.json keys (its cost)
    layer_fields: dict[str, dict] = field(default_factory=dict)     # layer name -> its own per-layer keys


@dataclass
class NoParams:
    """A method without choices."""

    def check(self, pattern: Pattern) -> None:
        pass


@dataclass(frozen=True)
class OneShotMethod:
    name: str
    fn: Callable[[Job, Any], Outcome]
    params: type
    sequential: Callable[[Any], bool]
    reconstructs: bool
    title: str                  # as tables print it ("SparseGPT")
    summary: str
    needs_loss: bool = False    # it learns on the task's loss (so on calibration targets), not on layer outputs


_METHODS: dict[str, OneShotMethod] = {}


def register_oneshot(name: str, *, params: type = NoParams, sequential: Callable[[Any], bool] = lambda p: False,
                     reconstructs: bool = False, title: str | None = None, summary: str = "", needs_loss: bool = False):
    """Register ``fn(job, params) -> Outcome`` as the one-shot method ``name`` (one of the catalogue's)."""
    def decorator(fn: Callable[[Job, Any], Outcome]) -> Callable[[Job, Any], Outcome]:
        if name in _METHODS:
            raise ValueError(f"one-shot method {name!r} is registered twice")
        if name not in ONESHOT_METHODS:
            raise ValueError(f"one-shot method {name!r}: add it to experiments/catalogue.py ONESHOT_METHODS")
        _METHODS[name] = OneShotMethod(name, fn, params, sequential, reconstructs, title or name, summary, needs_loss)
        return fn
    return decorator


_EXPERIMENTS = Path(__file__).resolve().parents[1]      # the experiments package's folder


def available(name: str) -> bool:
    """Whether the module of catalogued method ``name`` is in this installation (its file in experiments/)."""
    module = ONESHOT_MODULES.get(name)
    return name in _METHODS or (module is not None and (_EXPERIMENTS / (module.replace(".", "/") + ".py")).is_file())


def get_oneshot(name: str) -> OneShotMethod:
    """The method ``name``; its module is imported on first use (it registers itself)."""
    if name not in ONESHOT_METHODS:
        raise ConversionError(f"--method: {name!r} is unknown; use one of: {', '.join(ONESHOT_METHODS)}")
    if name not in _METHODS:
        if not available(name):
            raise ConversionError(f"--method: {name} is not available in this installation "
                                  f"(experiments/{ONESHOT_MODULES[name]}.py is absent); use one of: "
                                  f"{', '.join(n for n in ONESHOT_METHODS if available(n))}")
        importlib.import_module(f"nmtrain.experiments.{ONESHOT_MODULES[name]}")
        if name not in _METHODS:
            raise RuntimeError(f"internal error: experiments/{ONESHOT_MODULES[name]}.py does not register one-shot "
                               f"method {name!r} (@register_oneshot)")
    return _METHODS[name]


def list_oneshot() -> dict[str, OneShotMethod]:
    """The registered methods, in the catalogue's order (an absent optional one is not listed)."""
    return {name: _METHODS[name] for name in ONESHOT_METHODS if name in _METHODS}


# -- options: a method's choices, by field name -------------------------------------------------------


def flag(name: str) -> str:
    """The CLI option of a params field: ``lr_weight`` -> ``--lr-weight``."""
    return "--" + name.replace("_", "-")


def field_names(params: type) -> set[str]:
    return {f.name for f in dataclasses.fields(params)}


def make_params(params: type, options: dict, pattern: Pattern) -> Any:
    """``params`` from the ``options`` it has a field for, checked: ``check(pattern)``, or ``check()`` where the
    check needs no pattern (one line naming the option)."""
    made = params(**{k: v for k, v in options.items() if k in field_names(params)})
    check = getattr(made, "check", None)
    if check is not None:
        check(pattern) if inspect.signature(check).parameters else check()
    return made
