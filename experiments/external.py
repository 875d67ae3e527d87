"""Models from outside the registry: ``torchvision:NAME`` and ``package.module:function``.

    model.name: torchvision:resnet18      a classification builder of torchvision.models, random init
    model.name: my_models:small_cnn       a function (or class) of your own, in an importable module

Both become builders with the registry's signature ``(num_classes, in_channels, image_size, width)``
(`models.resolve_builder` turns ``model.name`` into one), so training, resume, AdaPrune and the layer
plan treat them as registry models, rebuilt from ``model.name`` in config.yaml alone.

**torchvision.** Any name of ``torchvision.models.list_models(module=torchvision.models)`` (the
classification models), built with ``weights=None`` and ``num_classes``: nothing is ever downloaded;
pretrained weights come from a local file through ``model.init``. Families whose layers depend on the
input size get it (ViT ``image_size``, MaxViT ``input_size``); GoogLeNet and Inception-v3 are built
without their auxiliary heads, whose training output is a tuple, not logits. The networks are
torchvision's as they are: no small-image stem (the registry's ``resnet18``/``resnet50`` have one). For
images that are not RGB the first convolution is rebuilt for ``in_channels``: channel ``c`` takes the
builder's own weights of RGB channel ``c mod 3``, scaled by sqrt(3 / in_channels) so that the layer's
output variance at init is that of the 3-channel layer. A ``model.init`` file then has to match the
rebuilt layer.

**Your own builder.** ``package.module:function`` is imported with importlib, so the module must be
importable: on PYTHONPATH or, with the `nmtrain` command, in the current directory. It is called by
keyword with those of ``num_classes``, ``in_channels``, ``image_size`` and ``width`` that its signature
accepts (all four if it takes ``**kwargs``); its other parameters need defaults. It runs after
``torch.manual_seed(seed)``, so an init drawn from torch's RNG is the same in every run of a spec.

Every model built here is checked on one zero image (eval mode, no gradient): it must return a tensor
of ``num_classes`` logits. An unknown name, an import error, a signature nmtrain cannot call, an
exception in the builder or in that forward, a wrong output: each is a one-line `ModelError`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import math
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from .errors import ModelError
from .evaluate import eval_mode

TORCHVISION = "torchvision:"
ARGUMENTS = ("num_classes", "in_channels", "image_size", "width")
_LIBRARIES = tuple(str(Path(m.__file__).parent) for m in (torch, torchvision))


def _first_line(exc: BaseException) -> str:
    lines = str(exc.msg if isinstance(exc, SyntaxError) else exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE``: the innermost frame of the user's code (not torch's, not this file's)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_LIBRARIES) and f.filename != __file__]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


class ExternalBuilder(ABC):
    """A builder from outside the registry, called like a registry builder; subclasses say with what."""

    name: str                   # model.name
    fn: Callable[..., Any]      # what builds the model
    source: str                 # where it comes from, for summary.json
    fix_classes = "return one logit per class"

    @abstractmethod
    def arguments(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        """The keyword arguments ``fn`` is called with for these dimensions."""

    def adapt(self, model: nn.Module, in_channels: int) -> nn.Module:
        """The built model made fit for ``in_channels``-channel images (as it is, unless a subclass knows how)."""
        return model

    def __call__(self, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
        kwargs = self.arguments(num_classes, in_channels, image_size, width)
        try:
            model = self.fn(**kwargs)
        except Exception as exc:   # the builder is someone else's code: any failure is the spec's to fix
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ModelError(f"model.name: {self.name}({shown}) raised {_first_line(exc)}{_where(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model.name: {self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        model = self.adapt(model, in_channels)
        check_output(model, self.name, num_classes, in_channels, image_size, self.fix_classes)
        return model

    def record(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        """What summary.json keeps about the builder, so that a run can be re-run exactly."""
        return {"name": self.name, "source": self.source,
                "arguments": self.arguments(num_classes, in_channels, image_size, width)}


class TorchvisionBuilder(ExternalBuilder):
    """``torchvision:NAME``: a classification builder of torchvision.models, random init."""

    def __init__(self, name: str) -> None:
        model = name[len(TORCHVISION):]
        names = torchvision.models.list_models(module=torchvision.models)
        if model not in names:
            close = difflib.get_close_matches(model, names, n=3)
            hint = f"did you mean {' or '.join(TORCHVISION + c for c in close)}? " if close else ""
            raise ModelError(f"model.name: {name!r} is not a torchvision classification model; {hint}the names "
                             "are those of torchvision.models.list_models(module=torchvision.models)")
        self.name, self.model = name, model
        self.fn = torchvision.models.get_model_builder(model)
        self.source = f"torchvision {torchvision.__version__}: torchvision.models.{model}"

    def arguments(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        if width != 1.0:
            raise ModelError(f"model.width: {self.name} is torchvision's fixed-width model and takes only "
                             f"width 1.0, got {width}")
        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if self.model.startswith("vit_"):         # position embeddings sized for the image
            kwargs["image_size"] = image_size
        elif self.model.startswith("maxvit_"):    # attention grids sized for the image
            kwargs["input_size"] = (image_size, image_size)
        if self.model in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        return kwargs

    def adapt(self, model: nn.Module, in_channels: int) -> nn.Module:
        return model if in_channels == 3 else first_conv_for(model, in_channels, self.name)

    def record(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        record = super().record(num_classes, in_channels, image_size, width)
        if in_channels != 3:
            record["adapted"] = f"first Conv2d rebuilt for {in_channels} input channel(s)"
        return record


class UserBuilder(ExternalBuilder):
    """``package.module:function``: your own builder, imported from the Python path."""

    fix_classes = "give the builder a num_classes parameter"

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn, self.source = _import(name)
        self.accepts = _accepted(self.fn, name)
        if "num_classes" in self.accepts:
            self.fix_classes = "return one logit per class"

    def arguments(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        if width != 1.0 and "width" not in self.accepts:
            raise ModelError(f"model.width: {self.name} takes no width argument, so width {width} would be "
                             "ignored; leave model.width at 1.0 or give the builder a width parameter")
        given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "width": width}
        return {k: given[k] for k in self.accepts}

    def record(self, num_classes: int, in_channels: int, image_size: int, width: float) -> dict:
        record = super().record(num_classes, in_channels, image_size, width)
        if Path(self.source).is_file():     # which version of the file built the run
            record["sha256"] = hashlib.sha256(Path(self.source).read_bytes()).hexdigest()
        return record


def external_builder(name: str) -> ExternalBuilder:
    """The builder of a ``model.name`` that holds a colon: ``torchvision:NAME`` or ``package.module:function``."""
    return TorchvisionBuilder(name) if name.startswith(TORCHVISION) else UserBuilder(name)


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _import(name: str) -> tuple[Callable[..., Any], str]:
    """(the callable ``package.module:function`` names, the file it comes from)."""
    module_name, _, attr = name.partition(":")
    if not (_dotted(module_name) and _dotted(attr)):
        raise ModelError(f"model.name: {name!r} is neither a registry model, torchvision:NAME nor "
                         "package.module:function")
    importlib.invalidate_caches()       # find a module written since the last import (tests, notebooks)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelError(f"model.name: no module named {exc.name!r} to import {name} from; put the folder "
                             f"that holds {module_name.replace('.', '/')}.py on PYTHONPATH (or run nmtrain "
                             "in that folder)") from None
        raise ModelError(f"model.name: importing {module_name} failed ({_first_line(exc)}{_where(exc)}); "
                         "install what it imports") from None
    except Exception as exc:     # a SyntaxError or any error the module raises at import time
        raise ModelError(f"model.name: importing {module_name} failed ({_first_line(exc)}{_where(exc)}); "
                         "fix the module") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ModelError(f"model.name: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                             f"{attr}; name a function it defines")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelError(f"model.name: {name} is not callable (type {type(fn).__name__}); name the function that "
                         "builds the model")
    return fn, getattr(module, "__file__", None) or module_name


def _accepted(fn: Callable[..., Any], name: str) -> tuple[str, ...]:
    """Which of ARGUMENTS ``fn`` takes by keyword; a parameter nmtrain cannot fill is an error."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ModelError(f"model.name: {name} has no signature nmtrain can read; wrap it in a Python function "
                         "of num_classes, in_channels, image_size, width") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ARGUMENTS
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    needed = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
              and not (p.name in ARGUMENTS and p.name in named)]
    if needed:
        raise ModelError(f"model.name: {name} requires {', '.join(needed)}, which nmtrain cannot pass: it passes "
                         "only num_classes, in_channels, image_size and width (by keyword, those the builder "
                         f"takes); give {', '.join(needed)} a default")
    return tuple(a for a in ARGUMENTS if a in named)


def check_output(model: nn.Module, name: str, num_classes: int, in_channels: int, image_size: int,
                 fix: str) -> None:
    """One zero image through ``model`` (eval mode, no gradient) must give ``num_classes`` logits."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as exc:
        raise ModelError(f"model.name: {name} fails on one {in_channels}x{image_size}x{image_size} image "
                         f"({_first_line(exc)}{_where(exc)}); make it take the dataset's images or change "
                         "data.image_size") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(f"model.name: {name} returns {got} for one image, not (1, {num_classes}) logits for "
                         f"the dataset's {num_classes} classes; {fix}")


def first_conv_for(model: nn.Module, in_channels: int, name: str) -> nn.Module:
    """``model`` with its first Conv2d rebuilt for ``in_channels`` (the module docstring says how)."""
    path, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise ModelError(f"model.name: {name} has no first RGB convolution to rebuild for {in_channels}-channel "
                         "images; use a 3-channel dataset (imagefolder loads images as RGB)")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, [c % 3 for c in range(in_channels)]] * math.sqrt(3 / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model
