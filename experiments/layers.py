"""Which layers of a model are sparse, and how their forward pass is routed through a method.

Default rule (docs/methods.md#layer-selection; the rule itself is the engine's `sparsity.select_layers`,
which `nmtrain prune` applies to state_dicts too): every Conv2d and Linear except the first layer and the classifier, and
except layers whose grouped dimension is not a multiple of M; those are reported as skipped with the
reason, never padded. Grouped and depthwise convolutions are skipped too, and so are layers whose own
forward never runs (`called_layers`): a parent that reads ``.weight`` itself, as nn.MultiheadAttention
does with ``out_proj`` and torchvision's Swin attention with ``qkv``/``proj``, would bypass the method's
routed forward, so such a layer could not be trained sparse. ``sparsity.include`` / ``sparsity.exclude``
are fnmatch globs on module names; a layer an include glob names that cannot hold the pattern is an error.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..sparsity import LayerInfo, Pattern, SelectOptions, select_layers
from .errors import ExperimentError
from .evaluate import eval_mode


class LayerSelectionError(ExperimentError):
    """The sparsity section selects layers that cannot hold the pattern; one-line message."""


@dataclass
class LayerPlan:
    sparse: dict[str, nn.Module]       # name -> Linear/Conv2d, in model order
    skipped: dict[str, str]            # name -> reason left dense


def gemm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def called_layers(model: nn.Module, sample: torch.Tensor) -> set[str]:
    """Names of the Conv2d/Linear layers whose forward runs when ``model`` sees ``sample`` (eval mode)."""
    called: set[str] = set()
    hooks = [mod.register_forward_pre_hook(lambda module, args, _name=name: called.add(_name))
             for name, mod in gemm_layers(model).items()]
    try:
        with eval_mode(model):
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return called


def describe_layers(model: nn.Module, called: set[str] | None = None) -> list[LayerInfo]:
    """The engine's description of every Conv2d/Linear, in model order (``called``: None means all run),
    and of every nn.Embedding as a lookup: a language model's token embedding is its first layer, so the
    first/last rule keeps it (not the first block's qkv) dense, as `nmtrain prune` does on its state_dict,
    where the embedding's weight is the first 2-D tensor. Image models have no embedding: unchanged."""
    described = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            described.append(LayerInfo(name, tuple(mod.weight.shape), lookup=True))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            described.append(LayerInfo(name, tuple(mod.weight.shape), groups=getattr(mod, "groups", None),
                                       called=None if called is None else name in called))
    return described


def plan_layers(model: nn.Module, pattern: Pattern, layout: str, include: list[str] = (),
                exclude: list[str] = (), keep_first_dense: bool = True, keep_last_dense: bool = True,
                called: set[str] | None = None) -> LayerPlan:
    """Which layers are sparse. ``called`` (from `called_layers`; None: all) are the layers whose forward runs."""
    layers = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding))}
    names = list(layers)
    for glob in include:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise LayerSelectionError(f"sparsity.include: {glob!r} matches no Conv2d/Linear layer; "
                                      f"layers are named like {', '.join(names[:4])}")
    options = SelectOptions(pattern, layout, tuple(include), tuple(exclude), keep_first_dense, keep_last_dense)
    sel = select_layers(describe_layers(model, called), options)
    for name, (constraint, problem) in sel.refused.items():
        if constraint in ("called", "lookup"):
            raise LayerSelectionError(f"sparsity.include: layer {name} cannot be trained sparse: {problem}")
        raise LayerSelectionError(f"sparsity.include: layer {name} {tuple(layers[name].weight.shape)} cannot hold "
                                  f"{pattern.describe()}: {problem}")
    if not sel.selected:
        raise LayerSelectionError(f"sparsity: no layer of the model can hold {pattern.describe()} "
                                  f"({'; '.join(f'{k}: {v}' for k, v in list(sel.skipped.items())[:3])})")
    return LayerPlan({name: layers[name] for name in sel.selected}, sel.skipped)


def static_called(model: nn.Module) -> set[str]:
    """Without an example input: every Conv2d/Linear but those whose parent multiplies by their ``.weight``
    itself (nn.MultiheadAttention's ``out_proj``), which a routed forward would never see."""
    bypassed = {f"{name}.out_proj" if name else "out_proj" for name, mod in model.named_modules()
                if isinstance(mod, nn.MultiheadAttention)}
    return set(gemm_layers(model)) - bypassed


def _globs(value, field: str) -> list[str]:
    """``include``/``exclude``: a sequence of fnmatch globs; one string is one glob (not its characters)."""
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise LayerSelectionError(f"{field}: expected a list of glob strings, got {type(value).__name__}") from None
    if not all(isinstance(item, str) for item in items):
        raise LayerSelectionError(f"{field}: expected a list of glob strings, got {items!r}"[:200])
    return items


def choose_layers(model: nn.Module, pattern: Pattern, *, layout: str = "nhwc", include=(), exclude=(),
                  keep_first_dense: bool = True, keep_last_dense: bool = True, example_input=None) -> LayerPlan:
    """The layers training makes sparse for ``pattern`` (the layer pattern: M x M tiles where the method needs
    them): `plan_layers` on the layers whose forward runs, by `called_layers` on ``example_input`` when
    there is one, else by `static_called`. The runner (the task's probe input), `nmtrain.sparsify`,
    `nmtrain.prune` and `nmtrain.oneshot` all choose here."""
    called = called_layers(model, example_input) if example_input is not None else static_called(model)
    return plan_layers(model, pattern, layout, _globs(include, "sparsity.include"), _globs(exclude, "sparsity.exclude"),
                       keep_first_dense, keep_last_dense, called)


_OWN_BIAS = object()


def gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias=_OWN_BIAS) -> torch.Tensor:
    """The layer's own operation with ``weight`` (and ``bias``, if given) in place of its parameters."""
    if bias is _OWN_BIAS:
        bias = module.bias
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


def route_forward(layers: dict[str, nn.Module], method) -> None:
    """Send each sparse layer's forward through ``method.layer_forward(name, module, x)``.

    An instance attribute shadows the class's forward; parameters and state_dict keys stay as they
    are, so checkpoints keep plain names.
    """
    for name, mod in layers.items():
        mod.forward = (lambda x, _name=name, _mod=mod: method.layer_forward(_name, _mod, x))


def unroute_forward(layers: dict[str, nn.Module]) -> None:
    for mod in layers.values():
        mod.__dict__.pop("forward", None)
