"""One-shot N:M of a model in memory: `nmtrain.prune` (magnitude masks, no data) and `nmtrain.oneshot` (the
conversion methods of ``nmtrain adaprune``, on a calibration iterable of the caller's).

    masks = nmtrain.prune(model, pattern="4:8", transposable=True)           # in place
    result = nmtrain.oneshot(model, calib_batches, method="sparsegpt", pattern="2:4")

Both choose the layers by training's rule (`layers.choose_layers`) and change the model in place. The
conversion is the one ``nmtrain adaprune`` runs (pipeline.py builds its `Job` with `make_job` and runs a
method with `run_method`, as `oneshot` does): the method's mask and weights, then, with ``finetune``,
AdaPrune's fit of the kept weights, then the BatchNorm statistics re-estimated on the calibration inputs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from rich.progress import Progress
from torch import nn

from ...sparsity import Pattern, fold_mask, make_mask, nm_violation
from ..evaluate import eval_mode
from ..build import check_engine_args, parse_field_pattern
from ..layers import choose_layers
from ..sparsify import SparsifyError, check_seed, unwrap
from .calibration import recalibrate_batchnorm
from .reconstruct import fit_layers
from .registry import Calibration, Job, OneShotMethod, Outcome
from .settings import ConversionSettings


MAX_CALIBRATION_BATCHES = 100_000       # a calibration iterable that never ends is refused, not read forever


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def prune(model: nn.Module, pattern: str = "2:4", *, transposable: bool = False, solver: str = "exact",
          layout: str = "nhwc", include=(), exclude=(), keep_first_dense: bool = True, keep_last_dense: bool = True,
          example_input: Any = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` to ``pattern`` in place by magnitude (N:M-T with ``transposable``, by ``solver``):
    every layer training would make sparse keeps its N largest |w| of every M (the optimal transposable
    mask per M x M tile). Returns the keep-masks by layer name; pruned weights are exactly +0.0."""
    model = unwrap(model)
    pat = parse_field_pattern(pattern, "sparsity.pattern", transposable)
    check_engine_args(layout, solver)
    plan = choose_layers(model, pat, layout=layout, include=include, exclude=exclude,
                         keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense,
                         example_input=example_input)
    masks = {}
    for name, mod in plan.sparse.items():
        masks[name] = make_mask(mod.weight.detach(), pat, layout, solver)
        mod.weight.copy_(fold_mask(mod.weight, masks[name]))
    return masks


# ------------------------------------------------------------------------------------------------
# The conversion methods


class _Loss:
    """A caller's ``loss(output, target)`` as the task interface a method asks (``loss(net, x, y)``)."""

    def __init__(self, fn):
        self.fn = fn

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(net(x), y)


def calibration_from(batches: Iterable, seed: int) -> tuple[Calibration, bool]:
    """(the caller's calibration batches, tensors ``x`` or ``(x, y)`` pairs, as one `Calibration` on the CPU, whether they had targets);
    without targets, ``targets`` holds zeros (a method that needs them is refused before it runs)."""
    xs, ys = [], []
    for i, item in enumerate(batches):
        if i >= MAX_CALIBRATION_BATCHES:
            raise SparsifyError(f"calibration: more than {MAX_CALIBRATION_BATCHES} batches; pass a finite sample")
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise SparsifyError(f"calibration: batch {i} is {type(x).__name__}, not a batched tensor (or an (x, y) pair)")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise SparsifyError(f"calibration: batch {i} has shape {tuple(x.shape)}, batch 0 {tuple(xs[0].shape)}")
        xs.append(x.detach().cpu())
        ys.append(None if y is None else torch.as_tensor(y).detach().cpu())
    if not xs:
        raise SparsifyError("calibration: no batch; pass an iterable of input batches (or (x, y) pairs)")
    has_targets = all(y is not None for y in ys)
    targets = torch.cat(ys) if has_targets else torch.zeros(sum(x.shape[0] for x in xs), dtype=torch.long)
    return Calibration(torch.cat(xs), targets, seed, batch=xs[0].shape[0]), has_targets


def make_job(original: nn.Module, model: nn.Module, names: list[str], pattern: Pattern, layout: str, solver: str,
             calib: Calibration, task, device: torch.device, seed: int, progress) -> Job:
    """The `Job` a method converts: ``model``'s layers ``names`` (in place), ``original`` read only, the
    magnitude prior of each layer, a generator seeded by ``seed``."""
    prior = {name: make_mask(original.get_submodule(name).weight.detach(), pattern, layout, solver) for name in names}
    return Job(original=original, model=model, layers={name: model.get_submodule(name) for name in names},
               pattern=pattern, layout=layout, solver=solver, calib=calib, task=task, prior=prior, device=device,
               generator=torch.Generator().manual_seed(seed), progress=progress)


def run_method(job: Job, method: OneShotMethod, params: Any) -> Outcome:
    """The method on the job, its result checked: one mask per planned layer, each exactly N:M (N:M-T)."""
    outcome = method.fn(job, params)
    if set(outcome.masks) != set(job.layers):
        raise RuntimeError(f"internal error: method {method.name} returned masks for {sorted(outcome.masks)}, "
                           f"not for the planned layers {list(job.layers)}")
    for name, mask in outcome.masks.items():
        problem = nm_violation(mask, job.pattern, job.layout, exact=True)
        if problem is not None or mask.shape != job.layers[name].weight.shape:
            raise RuntimeError(f"internal error: method {method.name}'s mask of {name} is not {job.pattern}: {problem}")
    return outcome


@dataclass
class OneShotResult:
    """What `oneshot` did: the keep-masks by layer, the layers left dense and why, the method's own fields
    (its cost) and per-layer fields (a fit's error), the seconds it took, and whether BatchNorm was re-estimated."""
    masks: dict[str, torch.Tensor]
    skipped: dict[str, str]
    fields: dict = field(default_factory=dict)
    layer_fields: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    batchnorm_recalibrated: bool = False


def oneshot(model: nn.Module, calibration: Iterable, *, method: str = "adaprune", pattern: str = "2:4",
            transposable: bool = False, solver: str = "exact", finetune: bool = False, loss=None, seed: int = 0,
            layout: str = "nhwc", include=(), exclude=(), keep_first_dense: bool = True, keep_last_dense: bool = True,
            example_input: Any = None, recalibrate_bn: bool = True, **options) -> OneShotResult:
    """Convert ``model`` to ``pattern`` in place with a one-shot ``method`` of ``nmtrain adaprune``
    (magnitude, adaprune, wanda, sparsegpt, learned), on ``calibration``: an iterable of input batches,
    or of ``(inputs, targets)`` pairs. ``options`` are the method's (and ``finetune``'s) options by field
    name, as ``nmtrain adaprune`` takes them (``iters=200``, ``blocksize=64``, ``learn_steps=100``);
    ``loss(output, target)`` is the loss the ``learned`` method trains its masks on; ``seed`` seeds every
    random draw of the method. BatchNorm statistics are re-estimated on the calibration inputs afterwards
    (``recalibrate_bn``). Bad arguments raise `nmtrain.ExperimentError` with ``nmtrain adaprune``'s messages."""
    model = unwrap(model)
    pat = parse_field_pattern(pattern, "--pattern", transposable)
    check_engine_args(layout, solver)
    check_seed(seed)
    settings = ConversionSettings(pat, method, calib_samples=1, calib_seed=seed, finetune=finetune, solver=solver,
                                  options=dict(options))
    chosen, params, ft_params = settings.resolve()
    calib, has_targets = calibration_from(calibration, seed)
    if chosen.needs_loss and (loss is None or not has_targets):
        raise SparsifyError(f"loss: method {chosen.name} learns its masks on the task's loss; pass loss=fn(output, "
                            "target) and (inputs, targets) calibration batches")
    plan = choose_layers(model, pat, layout=layout, include=include, exclude=exclude,
                         keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense, example_input=example_input)
    device, start = _model_device(model), time.perf_counter()
    with eval_mode(model):
        original = copy.deepcopy(model)
        job = make_job(original, model, list(plan.sparse), pat, layout, solver, calib, _Loss(loss), device, seed,
                       Progress(disable=True))
        outcome = run_method(job, chosen, params)
        if ft_params is not None:
            for name, fields in fit_layers(job, outcome.masks, ft_params, "fine-tune").items():
                outcome.layer_fields[name] = {**outcome.layer_fields.get(name, {}), **fields}
        bn = recalibrate_bn and recalibrate_batchnorm(model, calib.inputs, calib.batch, device)
    return OneShotResult(outcome.masks, dict(plan.skipped), outcome.fields, outcome.layer_fields,
                         time.perf_counter() - start, bn)
