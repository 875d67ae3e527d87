"""What a spec describes, checked and built: the device, datasets, loaders, the model, and its layer plan.

Training, AdaPrune and compare all start here, so a spec means the same device, model, data and
sparse layers to each. Seeding is the caller's (training also seeds Python's `random`), and so is loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DatasetInfo, build_datasets, build_loaders, check_global_batch, check_options, dataset_task
from ..sparsity import LAYOUTS, Pattern, PatternError, get_solver, parse_pattern
from . import accel as accel_mod
from . import denormals
from .layers import LayerPlan, choose_layers
from .methods import MethodError, build_params, get_method
from .models import build_model, check_model_sizes, resolve_builder
from .spec import Spec, SpecError, check_values
from .tasks import get_task


def parse_field_pattern(text: str, field: str, transposable: bool = False) -> Pattern:
    """`parse_pattern` with the field or option at fault in front of its message (``sparsity.pattern: ...``)."""
    try:
        return parse_pattern(text, transposable=transposable)
    except PatternError as exc:
        raise PatternError(f"{field}: {exc}") from None


@dataclass(frozen=True)
class Preflight:
    """What `validate` found in a spec: the one pre-flight, made before any data is read or directory made,
    and carried from there (compare's cells into the runner) instead of redone. The ``--nproc`` launcher
    checks with the processes' world before it starts them; each process, a fresh interpreter, checks again
    for the world it runs in."""
    asked: Pattern              # the pattern as the spec asks it (sparsity.pattern, sparsity.transposable)
    pattern: Pattern            # the pattern the method's masks satisfy (N:M-T where the method needs it)
    layer_pattern: Pattern      # what a layer must fit to be sparse (the layer plan's pattern)
    method: type                # the method's class (experiments/methods)
    params: Any                 # the method's parameters, parsed and checked
    world: int                  # the processes it was checked for (the global batch splits this many ways)


def check_engine_args(layout: str, solver: str) -> None:
    """``sparsity.layout`` and ``sparsity.solver``: names the engine knows (a spec's, or `nmtrain.sparsify`'s)."""
    if layout not in LAYOUTS:
        raise SpecError(f"sparsity.layout: {layout!r} is unknown; use one of: {', '.join(LAYOUTS)}")
    try:
        get_solver(solver)
    except ValueError as exc:
        raise SpecError(f"sparsity.solver: {exc}") from None


def check_method_fits(cls: type, transposable: bool, optimizer: str) -> None:
    """Whether method ``cls`` takes transposable masks when asked, and the optimizer ``optimizer`` (its
    ``optim.name``: ``sgd``, ``adamw``; `nmtrain.sparsify` gives its optimizer's class name, lower case)."""
    if transposable and not cls.caps.accepts_transposable:
        raise MethodError(f"sparsity.transposable: method {cls.name} does not use transposable masks; "
                          "use method transposable (or fixed)")
    if cls.caps.optimizers and optimizer not in cls.caps.optimizers:
        raise MethodError(f"optim.name: method {cls.name} needs optim.name {' or '.join(cls.caps.optimizers)}, "
                          f"not {optimizer!r}")


def _check_compile(spec: Spec, cls: type, params) -> None:
    """``train.compile: true`` where the run cannot be compiled: the method's reason (`Method.compile_problem`),
    or accel kernels (semi-structured tensors under dynamo are not tested here: no GPU in CI)."""
    if not spec.train.compile:
        return
    problem = cls.compile_problem(params)
    if problem is not None:
        raise MethodError(f"train.compile: {problem}")
    if spec.accel != "none":
        raise MethodError(f"train.compile: accel: {spec.accel} does not run compiled (its sparse-tensor kernels are "
                          "untested under torch.compile); use accel=none, or train.compile=false")


def validate(spec: Spec, world: int = 1) -> Preflight:
    """Everything about the spec that can be checked before touching data, for ``world`` processes (the
    launcher of `--nproc N` checks with world=N before it starts them): the pattern, layout and solver;
    the method, its parameters (each by its field's rule, then its Params' ``check()``) and whether it
    takes the pattern and ``accel``; every number and word of the spec by its rule (optim.name,
    schedule.name); the global batch; the model's builder, that it serves the dataset's task (known from
    the dataset's registry entry) and takes the spec's model sizes; the dataset's options."""
    asked = parse_field_pattern(spec.sparsity.pattern, "sparsity.pattern", spec.sparsity.transposable)
    check_engine_args(spec.sparsity.layout, spec.sparsity.solver)
    cls = get_method(spec.method.name)
    params = build_params(cls, spec.method.params)
    check_method_fits(cls, spec.sparsity.transposable, spec.optim.name)
    pattern = cls.caps.mask_pattern(asked)
    accel_mod.check_spec(spec.accel, cls, pattern)
    if spec.accel != "none" and getattr(params, "mvue_dw", False):
        raise MethodError(f"method.params.mvue_dw: the accel: {spec.accel} kernels compute the weight gradient "
                          "dense; use mvue_dw=false, or accel=none")
    _check_compile(spec, cls, params)
    if spec.train.flush_denormals and (why := denormals.unsupported()) is not None:
        raise SpecError(f"train.flush_denormals: {why}; set train.flush_denormals=false")
    check_values(spec)      # again, for a spec edited in code (compare's cells) rather than loaded
    if spec.schedule.min_lr > spec.optim.lr:
        raise SpecError(f"schedule.min_lr: {spec.schedule.min_lr:g} is above optim.lr {spec.optim.lr:g}; the cosine "
                        "decays from optim.lr down to min_lr")
    check_global_batch(spec.data.batch_size, world)
    task = dataset_task(spec.data.dataset)
    resolve_builder(spec.model.name, task)     # imports a user's module, checks the builder's signature and task
    check_model_sizes(spec.model.name, task, spec.model)
    check_options(spec.data.dataset, spec.data.options())
    return Preflight(asked, pattern, cls.caps.layer_pattern(asked), cls, params, world)


def resolve_device(name: str) -> torch.device:
    """The spec's ``device``: ``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device: {name!r} asked for but CUDA is not available; use device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SpecError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


@dataclass
class Built:
    train_ds: Dataset
    test_ds: Dataset
    info: DatasetInfo           # the task, and its sizes (classes and image, or vocabulary and context)
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module            # freshly initialised, on the CPU


def build(spec: Spec, augment: bool, holdout: int | None, rank: int = 0, world: int = 1) -> Built:
    """The spec's datasets (``augment``: training's augmentation; ``holdout``: train samples held out
    for evaluation), their loaders (rank ``rank`` of ``world``) and a new model for their data."""
    train_ds, test_ds, info = build_datasets(spec.data.dataset, root=spec.data.root, augment=augment,
                                             train_subset=spec.data.train_subset, test_subset=spec.data.test_subset,
                                             download=spec.data.download, seed=spec.seed, holdout=holdout,
                                             **spec.data.options())
    train_loader, test_loader = build_loaders(train_ds, test_ds, batch_size=spec.data.batch_size, seed=spec.seed,
                                              num_workers=spec.data.num_workers,
                                              eval_batch_size=spec.data.eval_batch_size, rank=rank, world=world)
    model = build_model(spec.model.name, info, spec.model)
    return Built(train_ds, test_ds, info, train_loader, test_loader, model)


def layer_plan(spec: Spec, built: Built, pattern: Pattern, device: torch.device) -> LayerPlan:
    """The sparse layers of ``built.model`` (already on ``device``) for ``pattern`` by the spec's sparsity
    section; a layer whose forward does not run on one image is never sparse (see `called_layers`)."""
    s = spec.sparsity
    return choose_layers(built.model, pattern, layout=s.layout, include=s.include, exclude=s.exclude,
                         keep_first_dense=s.keep_first_dense, keep_last_dense=s.keep_last_dense,
                         example_input=get_task(built.info.task).example_input(built.info, device))
