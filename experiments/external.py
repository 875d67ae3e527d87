"""Models from outside the registry: ``torchvision:NAME`` and ``package.module:function``.

    model.name: torchvision:resnet18      a classification builder of torchvision.models, random init
    model.name: my_models:small_cnn       a function (or class) of your own, in an importable module

Both become builders called as the registry's are, by keyword with the task's `ARGUMENTS`
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
importable: on PYTHONPATH or, with the `nmtrain` command, in the current directory. It is built for the
dataset's task and called by keyword with those of the task's arguments that its signature accepts (all
of them if it takes ``**kwargs``); its other parameters need defaults. An image classifier gets
``num_classes``, ``in_channels``, ``image_size`` and ``width``; a language model ``vocab_size``,
``block_size``, ``n_layer``, ``n_head``, ``n_embd``, ``dropout`` and ``bias``. A size the spec sets
away from its default that the builder does not take is refused rather than ignored. It runs after
``torch.manual_seed(seed)``, so an init drawn from torch's RNG is the same in every run of a spec.

Every model built here is checked before anything is trained (eval mode, no gradient): an image
classifier on one zero image, which must give ``num_classes`` logits; a language model on one window of
``block_size`` zero tokens, which must give logits of shape (1, block_size, vocab_size). An unknown
name, an import error, a signature nmtrain cannot call, an exception in the builder or in that forward,
a wrong output: each is a one-line `ModelError`.
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
from .spec import MODEL_SIZES

TORCHVISION = "torchvision:"
# What a builder of each task is called with (by keyword), and each argument's default in the spec (a
# builder that does not take an argument set away from its default would silently ignore it).
ARGUMENTS = {
    "classification": ("num_classes", "in_channels", "image_size", "width"),
    "language_model": ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias"),
}
SPEC_DEFAULTS = MODEL_SIZES     # the spec's sizes and their defaults (ModelSpec)
TASK_WORDS = {"classification": "image classification", "language_model": "language modelling"}
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
    """A builder from outside the registry, called like a registry builder (by keyword with the task's
    `ARGUMENTS`); subclasses say what ``fn`` is called with."""

    name: str                   # model.name
    fn: Callable[..., Any]      # what builds the model
    source: str                 # where it comes from, for summary.json
    task: str = "classification"
    fix_classes = "return one logit per class"

    @abstractmethod
    def arguments(self, dims: dict[str, Any]) -> dict:
        """The keyword arguments ``fn`` is called with for these dimensions (the task's `ARGUMENTS`)."""

    def adapt(self, model: nn.Module, dims: dict[str, Any]) -> nn.Module:
        """The built model made fit for the data (as it is, unless a subclass knows how)."""
        return model

    def __call__(self, **dims: Any) -> nn.Module:
        kwargs = self.arguments(dims)
        try:
            model = self.fn(**kwargs)
        except Exception as exc:   # the builder is someone else's code: any failure is the spec's to fix
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ModelError(f"model.name: {self.name}({shown}) raised {_first_line(exc)}{_where(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model.name: {self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        model = self.adapt(model, dims)
        if self.task == "language_model":
            check_lm_output(model, self.name, dims["vocab_size"], dims["block_size"])
        else:
            check_output(model, self.name, dims["num_classes"], dims["in_channels"], dims["image_size"],
                         self.fix_classes)
        return model

    def record(self, **dims: Any) -> dict:
        """What summary.json keeps about the builder, so that a run can be re-run exactly."""
        return {"name": self.name, "source": self.source, "arguments": self.arguments(dims)}


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

    def arguments(self, dims: dict[str, Any]) -> dict:
        if dims["width"] != 1.0:
            raise ModelError(f"model.width: {self.name} is torchvision's fixed-width model and takes only "
                             f"width 1.0, got {dims['width']}")
        image_size = dims["image_size"]
        kwargs: dict[str, Any] = {"weights": None, "num_classes": dims["num_classes"]}
        if self.model.startswith("vit_"):         # position embeddings sized for the image
            kwargs["image_size"] = image_size
        elif self.model.startswith("maxvit_"):    # attention grids sized for the image
            kwargs["input_size"] = (image_size, image_size)
        if self.model in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        return kwargs

    def adapt(self, model: nn.Module, dims: dict[str, Any]) -> nn.Module:
        channels = dims["in_channels"]
        return model if channels == 3 else first_conv_for(model, channels, self.name)

    def record(self, **dims: Any) -> dict:
        record = super().record(**dims)
        if dims["in_channels"] != 3:
            record["adapted"] = f"first Conv2d rebuilt for {dims['in_channels']} input channel(s)"
        return record


class UserBuilder(ExternalBuilder):
    """``package.module:function``: your own builder, imported from the Python path."""

    fix_classes = "give the builder a num_classes parameter"

    def __init__(self, name: str, task: str = "classification") -> None:
        self.name, self.task = name, task
        self.fn, self.source = _import(name)
        self.accepts = _accepted(self.fn, name, ARGUMENTS[task])
        if "num_classes" in self.accepts:
            self.fix_classes = "return one logit per class"

    def arguments(self, dims: dict[str, Any]) -> dict:
        for field, default in SPEC_DEFAULTS.items():
            if field in dims and dims[field] != default and field not in self.accepts:
                raise ModelError(f"model.{field}: {self.name} takes no {field} argument, so {field} {dims[field]} "
                                 f"would be ignored; leave model.{field} at {default} or give the builder the "
                                 f"parameter {field}")
        return {k: dims[k] for k in self.accepts}

    def record(self, **dims: Any) -> dict:
        record = super().record(**dims)
        if Path(self.source).is_file():     # which version of the file built the run
            record["sha256"] = hashlib.sha256(Path(self.source).read_bytes()).hexdigest()
        return record


def external_builder(name: str, task: str = "classification") -> ExternalBuilder:
    """The builder of a ``model.name`` that holds a colon, for a dataset of ``task``: ``torchvision:NAME``
    (image classification only; `models.resolve_builder` refuses it for another task) or
    ``package.module:function``."""
    return TorchvisionBuilder(name) if name.startswith(TORCHVISION) else UserBuilder(name, task)


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


def _accepted(fn: Callable[..., Any], name: str, arguments: tuple[str, ...]) -> tuple[str, ...]:
    """Which of ``arguments`` (the task's) ``fn`` takes by keyword; a parameter nmtrain cannot fill is an error."""
    listed = ", ".join(arguments[:-1]) + f" and {arguments[-1]}"
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ModelError(f"model.name: {name} has no signature nmtrain can read; wrap it in a Python function "
                         f"of {', '.join(arguments)}") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return arguments
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    needed = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
              and not (p.name in arguments and p.name in named)]
    if needed:
        raise ModelError(f"model.name: {name} requires {', '.join(needed)}, which nmtrain cannot pass: it passes "
                         f"only {listed} (by keyword, those the builder takes); give {', '.join(needed)} a default")
    return tuple(a for a in arguments if a in named)


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


def check_lm_output(model: nn.Module, name: str, vocab_size: int, block_size: int) -> None:
    """One window of ``block_size`` zero tokens through ``model`` (eval mode, no gradient) must give logits
    of shape (1, block_size, vocab_size): tokens in, a score for every next token at every position out."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(torch.zeros(1, block_size, dtype=torch.long))
    except Exception as exc:
        raise ModelError(f"model.name: {name} fails on one window of {block_size} tokens, a (1, {block_size}) "
                         f"LongTensor ({_first_line(exc)}{_where(exc)}); make it take token ids (data.block_size "
                         "sets the window)") from None
    want = (1, block_size, vocab_size)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or not out.is_floating_point():
        got = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(f"model.name: {name} returns {got} for one window of {block_size} tokens, not float "
                         f"logits of shape {want}; return one logit per vocabulary entry at every position")


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
