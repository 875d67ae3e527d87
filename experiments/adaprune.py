"""AdaPrune (Hubara et al., 2021; docs/methods.md#adaprune): a trained model to N:M by layer-wise reconstruction.

For every sparse layer (the same rule as training: every Conv2d/Linear except the first layer, the
classifier and layers whose shape cannot hold the pattern):

1. **Mask by magnitude**: N:M along K, or N:M-T with the exact transposable solver.
2. **Add the pruned magnitude back** onto the kept weights of each group (the reference code's
   step; docs/methods.md#adaprune). nmtrain's precise rule, per group of M along K (the rows of the GEMM
   view, also for -T masks): the group's pruned ``sum |w|`` is distributed over its kept weights in
   proportion to their magnitude, with their signs, i.e. ``w_k <- w_k * (sum_group |w| / sum_kept |w|)``.
   Every group keeps its L1 norm; groups whose kept weights are all zero are left as they are.
3. **Reconstruct**: optimise the kept weights and the bias so that the layer's output on calibration
   inputs matches the original layer's, ``min ||W~ X + b~ - (W X + b)||^2`` (mean squared error),
   with Adam (lr 1e-3 weights, 1e-2 bias, 1000 steps of random batches of 50 from ~1000 calibration
   samples of the train split, seeded); the mask is re-applied after every step.

Two ways to get the inputs ``X``:

- **parallel** (the default, as in the reference code): every layer sees the inputs the *unpruned*
  model produces, and all layers are solved independently. The per-layer problems do not depend on
  each other, so errors do not compound through the optimisation and the result does not depend on
  the order of the layers.
- **sequential** (``sequential=True``): layer ``l`` sees the inputs of the network whose layers
  ``< l`` are already pruned and reconstructed, and its target is still the *original network's*
  output of that layer. Each layer then also corrects the error accumulated upstream; it is slower
  to set up (one pass of the partly pruned model per layer) and can overfit a small calibration set.

Afterwards batch-norm statistics (if the model has any) are re-estimated on the calibration set.
The task's primary metric (`tasks/`: accuracy of an image classifier, perplexity of a language model)
is reported for the original model, for plain magnitude projection (step 1 alone, original batch-norm
statistics) and after AdaPrune, all on the test (validation) split. A language model's calibration
samples are token windows of the training split.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from ..sparsity import LAYOUTS, Pattern, fold_mask, from_matrix, make_mask, nm_violation, to_matrix
from .errors import ExperimentError
from .io import CheckpointError, state_dict_mismatch
from .build import build, layer_plan, resolve_device
from .evaluate import eval_mode
from .layers import gemm
from .models import builder_record
from .rundir import CONFIG, SUMMARY, RunDir, load_weights
from .spec import Spec, SpecError, dump_spec, from_dict
from .tasks import Task, get_task
from .yamlfile import read_yaml


class AdaPruneError(ExperimentError):
    """Input AdaPrune cannot use (source, settings, output directory); one-line message."""


@dataclass
class AdaPruneSettings:
    pattern: Pattern
    calib_samples: int = 1000
    iters: int = 1000
    batch: int = 50
    sequential: bool = False
    lr_weight: float = 1e-3
    lr_bias: float = 1e-2
    solver: str = "exact"          # transposable mask solver
    add_back: bool = True          # start from the L1-preserving rescale (docs/methods.md#adaprune); False: plain projection

    def check(self) -> None:
        for name, value, low in (("--calib-samples", self.calib_samples, 1), ("--iters", self.iters, 0),
                                 ("--batch", self.batch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AdaPruneError(f"{name}: must be an integer >= {low}, got {value!r}")
        for name, value in (("lr_weight", self.lr_weight), ("lr_bias", self.lr_bias)):
            if not value > 0:
                raise AdaPruneError(f"{name}: must be positive, got {value!r}")


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    error_magnitude: float      # relative reconstruction error of plain magnitude projection
    error_init: float           # ... after adding the pruned magnitude back (the optimiser's start)
    error_adaprune: float       # ... after optimisation
    seconds: float


@dataclass
class AdaPruneResult:
    out: Path
    summary: dict
    layers: list[LayerResult] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Pieces (pure tensor code, tested on their own)


def add_back_pruned(weight: torch.Tensor, mask: torch.Tensor, m: int, layout: str = "nhwc") -> torch.Tensor:
    """Masked weight whose kept entries carry their group's pruned magnitude (see the module docstring).

    Per group of ``m`` along K: ``w_k * sum|w_group| / sum|w_kept|`` for kept entries, exact zeros
    elsewhere. Groups whose kept entries are all zero stay zero.
    """
    w = to_matrix(weight.detach(), layout).double()
    keep = to_matrix(mask, layout)
    groups = w.reshape(w.shape[0], -1, m)
    kept = groups * keep.reshape(groups.shape)
    total = groups.abs().sum(-1, keepdim=True)
    kept_sum = kept.abs().sum(-1, keepdim=True)
    scale = torch.where(kept_sum > 0, total / kept_sum.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.ones_like(total))
    return fold_mask(from_matrix((kept * scale).reshape(w.shape), weight.shape, layout).to(weight.dtype), mask)


def relative_error(module: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, chunk: int = 256) -> float:
    """``||layer(x; weight, bias) - y||^2 / ||y||^2`` over all of ``x``, in chunks."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            out = gemm(module, x[i:i + chunk], weight, bias)
            num += float((out - y[i:i + chunk]).double().pow(2).sum())
            den += float(y[i:i + chunk].double().pow(2).sum())
    return num / den if den > 0 else num


class _Stop(Exception):
    pass


# Below this many multiply-adds per Adam step, CPU intra-op threads cost far more than they bring:
# on a busy 2-core machine a 400x120 layer ran 100x slower with 2 OpenMP threads than with one.
_SMALL_STEP_MACS = 50_000_000


class _cpu_threads:
    """Run with ``n`` intra-op threads (CPU only), restoring the previous setting afterwards."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def step_macs(module: nn.Module, x: torch.Tensor, batch: int) -> int:
    """Multiply-adds of one forward of ``module`` on ``batch`` of the inputs ``x``."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return batch * w.numel() * (x[0].numel() // w.shape[1])
    with torch.no_grad():
        out_pixels = module(x[:1]).shape[-2:].numel()
    return batch * w.numel() * out_pixels


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, images: torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
    """The inputs ``module`` receives when ``model`` runs on ``images`` (eval mode; stops at the layer)."""
    captured: list[torch.Tensor] = []

    def hook(_mod, args):
        captured.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            for i in range(0, images.shape[0], batch):
                try:
                    model(images[i:i + batch].to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(captured) != -(-images.shape[0] // batch):
        raise RuntimeError("internal error: the layer did not see every calibration batch")
    return torch.cat(captured)


def reconstruct(module: nn.Module, mask: torch.Tensor, init: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                iters: int, batch: int, lr_weight: float, lr_bias: float, generator: torch.Generator,
                on_step: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adam on the kept weights (from ``init``) and the bias: ``min mse(layer(x), y)``, mask after every step."""
    keep = mask.to(init.dtype)
    weight = nn.Parameter(fold_mask(init.detach(), mask))
    bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
    groups = [{"params": [weight], "lr": lr_weight}]
    if bias is not None:
        groups.append({"params": [bias], "lr": lr_bias})
    opt = torch.optim.Adam(groups)
    n = x.shape[0]
    for step in range(iters):
        idx = torch.randint(0, n, (min(batch, n),), generator=generator).to(x.device)
        loss = F.mse_loss(gemm(module, x[idx], weight, bias), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        weight.grad.mul_(keep)
        opt.step()
        with torch.no_grad():
            weight.copy_(fold_mask(weight, mask))     # back onto the pattern after each step
        if on_step is not None:
            on_step(step, float(loss.detach()))
    out = fold_mask(weight.detach(), mask)   # exact +0.0 at pruned positions
    return out, None if bias is None else bias.detach().clone()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device) -> bool:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``images``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None       # cumulative average
    with eval_mode(model, training=True):      # train mode: BatchNorm updates its running statistics
        for i in range(0, images.shape[0], batch):
            model(images[i:i + batch].to(device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return True


# ------------------------------------------------------------------------------------------------
# Source, data and output directory


def load_source(source: str | Path, spec_path: str | Path | None = None) -> tuple[Spec, dict[str, torch.Tensor]]:
    """(spec, state_dict) from a run directory (its config.yaml) or a state_dict file plus ``spec_path``."""
    source = Path(source)
    if not source.exists():
        raise AdaPruneError(f"SOURCE: {source} does not exist")
    if spec_path is None:
        if not source.is_dir():
            raise AdaPruneError(f"SOURCE: {source} is a state_dict file; pass --spec SPEC.yaml naming its model "
                                "and data (or pass a run directory of `nmtrain train`)")
        spec_path = RunDir(source).config
        if not spec_path.is_file():
            raise AdaPruneError(f"SOURCE: {source} has no {CONFIG}; pass --spec SPEC.yaml naming its model and data")
    spec = from_dict(Spec, read_yaml(spec_path))
    if spec.sparsity.layout not in LAYOUTS:
        raise SpecError(f"sparsity.layout: {spec.sparsity.layout!r} is unknown; use one of: {', '.join(LAYOUTS)}")
    state = load_weights(source, field="SOURCE")
    return spec, state


def default_out(source: str | Path, pattern: Pattern) -> Path:
    source = Path(source)
    base = source if source.is_dir() else source.with_suffix("")
    return base.parent / f"{base.name}-adaprune-{pattern.slug}"


def calibration_images(train_ds, n: int, seed: int) -> torch.Tensor:
    """``n`` train inputs (images without augmentation, or token windows) chosen by ``seed``, as one tensor."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_ds), generator=g)[:n].tolist()
    loader = DataLoader(Subset(train_ds, idx), batch_size=256, shuffle=False)
    return torch.cat([x for x, _ in loader])


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], spec: Spec) -> None:
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"SOURCE: weights do not match model {spec.model.name}: {problem}")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# The whole run


def adaprune(source: str | Path, settings: AdaPruneSettings, spec_path: str | Path | None = None,
             out: str | Path | None = None, overwrite: bool = False, console=None,
             progress: bool = True) -> AdaPruneResult:
    """Run AdaPrune on ``source`` and write a run directory (model.pt, config.yaml, summary.json)."""
    start = time.perf_counter()
    settings.check()
    pattern = settings.pattern
    spec, state = load_source(source, spec_path)
    out = Path(out) if out is not None else default_out(source, pattern)
    RunDir(out).check_target(overwrite)
    layout = spec.sparsity.layout
    device = resolve_device(spec.device)

    torch.manual_seed(spec.seed)
    # no augmentation (calibration images are plain) and no holdout (AdaPrune reports test accuracy)
    built = build(spec, augment=False, holdout=None)
    original = built.model
    _load_into(original, state, spec)
    original.to(device).eval()
    plan = layer_plan(spec, built, pattern, device)
    names = list(plan.sparse)
    n_calib = min(settings.calib_samples, len(built.train_ds))
    calib = calibration_images(built.train_ds, n_calib, spec.seed)
    task = get_task(built.info.task)

    measured = {"original": task.evaluate(original, built.test_loader, device)}
    # Masks by magnitude, once, from the original weights (the same in both modes).
    orig_mods = dict(original.named_modules())
    masks = {name: make_mask(orig_mods[name].weight.detach(), pattern, layout, settings.solver) for name in names}
    measured["magnitude"] = _masked_metrics(task, original, masks, built.test_loader, device)

    pruned = copy.deepcopy(original)
    results = _reconstruct_layers(original, pruned, masks, calib, settings, layout, spec.seed, device,
                                  console, progress)
    bn = recalibrate_batchnorm(pruned, calib, spec.data.batch_size, device)
    pruned.eval()
    measured["adaprune"] = task.evaluate(pruned, built.test_loader, device)
    sparse_layers = _check_sparse(pruned, masks, pattern, layout)
    summary = _summary(spec, source, settings, built.info, device, n_calib, bn, task, measured, results,
                       sparse_layers, plan.skipped, time.perf_counter() - start)
    _write(out, pruned, spec, source, pattern, summary, built.info.tokenizer)
    return AdaPruneResult(out, summary, results)


def _masked_metrics(task: Task, original: nn.Module, masks: dict[str, torch.Tensor], loader,
                    device: torch.device) -> dict[str, float]:
    """The task's metrics of plain magnitude projection: ``original``'s weights with ``masks`` folded in."""
    magnitude_model = copy.deepcopy(original)
    mods = dict(magnitude_model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            w = mods[name].weight
            w.copy_(fold_mask(w, mask))
    return task.evaluate(magnitude_model, loader, device)


def _reconstruct_layers(original: nn.Module, pruned: nn.Module, masks: dict[str, torch.Tensor], calib: torch.Tensor,
                        settings: AdaPruneSettings, layout: str, seed: int, device: torch.device, console,
                        progress: bool) -> list[LayerResult]:
    """Reconstruct every masked layer of ``pruned`` in place, one progress bar per layer."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    generator = torch.Generator().manual_seed(seed)
    results: list[LayerResult] = []
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("mse {task.fields[loss]:.3e}"), TimeElapsedColumn(), console=console,
                   disable=not progress)
    with bar:
        for i, name in enumerate(masks):
            task = bar.add_task(f"{name} ({i + 1}/{len(masks)})", total=settings.iters, loss=float("nan"))
            every = max(settings.iters // 100, 1)

            def on_step(step: int, loss: float, _task=task, _every=every) -> None:
                if (step + 1) % _every == 0 or step + 1 == settings.iters:
                    bar.update(_task, completed=step + 1, loss=loss)

            results.append(_reconstruct_layer(original, pruned, name, masks[name], calib, settings, layout,
                                              generator, device, on_step))
    return results


def _reconstruct_layer(original: nn.Module, pruned: nn.Module, name: str, mask: torch.Tensor, calib: torch.Tensor,
                       settings: AdaPruneSettings, layout: str, generator: torch.Generator, device: torch.device,
                       on_step: Callable[[int, float], None]) -> LayerResult:
    """Fit layer ``name`` of ``pruned`` under ``mask`` to the original layer's outputs on the calibration set
    (its inputs taken from ``pruned`` in sequential mode, else from ``original``)."""
    t0 = time.perf_counter()
    chunk = max(settings.batch, 256)
    mod, target = dict(original.named_modules())[name], dict(pruned.named_modules())[name]
    w_orig = mod.weight.detach()
    b_orig = None if mod.bias is None else mod.bias.detach()
    x_orig = capture_inputs(original, mod, calib, chunk, device)
    with torch.no_grad():
        y = torch.cat([gemm(mod, x_orig[j:j + chunk], w_orig, b_orig) for j in range(0, x_orig.shape[0], chunk)])
    x = capture_inputs(pruned, target, calib, chunk, device) if settings.sequential else x_orig
    if settings.sequential:
        del x_orig
    plain = fold_mask(w_orig, mask)
    init = add_back_pruned(w_orig, mask, settings.pattern.m, layout) if settings.add_back else plain
    small = device.type == "cpu" and 3 * step_macs(mod, x, settings.batch) < _SMALL_STEP_MACS
    with torch.enable_grad(), _cpu_threads(1 if small else None):
        w_new, b_new = reconstruct(mod, mask, init, x, y, settings.iters, settings.batch,
                                   settings.lr_weight, settings.lr_bias, generator, on_step)
    result = LayerResult(
        name=f"{name}.weight", shape=tuple(w_orig.shape),
        error_magnitude=relative_error(mod, x, y, plain, b_orig, chunk),
        error_init=relative_error(mod, x, y, init, b_orig, chunk),
        error_adaprune=relative_error(mod, x, y, w_new, b_new, chunk),
        seconds=time.perf_counter() - t0)
    with torch.no_grad():
        target.weight.copy_(w_new)
        if b_new is not None:
            target.bias.copy_(b_new)
    return result


def _check_sparse(pruned: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern, layout: str) -> dict:
    """summary.json's ``sparse_layers``, after checking that every reconstructed weight keeps its mask."""
    mods = dict(pruned.named_modules())
    sparse_layers = {}
    for name, mask in masks.items():
        w = mods[name].weight.detach()
        problem = nm_violation(w, pattern, layout)
        if problem is not None or bool((w[~mask] != 0).any()):
            raise RuntimeError(f"internal error: {name}.weight breaks {pattern} after AdaPrune: {problem}")
        sparse_layers[f"{name}.weight"] = {"pattern": str(pattern), "density": float(mask.float().mean()),
                                           "transposable": pattern.transposable, "layout": layout}
    return sparse_layers


def _summary(spec: Spec, source, settings: AdaPruneSettings, info, device: torch.device, n_calib: int, bn: bool,
             task: Task, measured: dict[str, dict], results: list[LayerResult], sparse_layers: dict, skipped: dict,
             wall: float) -> dict:
    """summary.json of an AdaPrune run: the source, the settings, the task's primary metric of the original,
    the magnitude-pruned and the AdaPruned model (``accuracy_original``, ...; ``perplexity_original``, ...),
    the final model's keys, the share of the loss to magnitude pruning recovered, per-layer errors."""
    pattern, layout = settings.pattern, spec.sparsity.layout
    value = {stage: metrics[task.primary] for stage, metrics in measured.items()}
    lost = task.gain(value["original"], value["magnitude"])
    return {
        "name": f"{spec.name}-adaprune", "method": "adaprune", "source": str(source),
        "pattern": str(pattern), "density": pattern.density, "transposable": pattern.transposable,
        "layout": layout, "model": spec.model.name, "dataset": spec.data.dataset, "seed": spec.seed,
        "builder": builder_record(spec.model.name, info, spec.model),
        "device": str(device), "calib_samples": n_calib, "iters": settings.iters, "batch": settings.batch,
        "lr_weight": settings.lr_weight, "lr_bias": settings.lr_bias, "sequential": settings.sequential,
        "mode": "sequential" if settings.sequential else "parallel", "add_back": "group L1-preserving rescale" if settings.add_back else "none",
        "batchnorm_recalibrated": bn,
        **{f"{task.primary}_{stage}": v for stage, v in value.items()},
        **task.final_fields(measured["adaprune"]),
        "recovered": task.gain(value["adaprune"], value["magnitude"]) / lost if lost > 0 else None,
        "wall_seconds": wall,
        "layers": {r.name: {"shape": list(r.shape), "error_magnitude": r.error_magnitude,
                            "error_init": r.error_init, "error_adaprune": r.error_adaprune, "seconds": r.seconds}
                   for r in results},
        "sparse_layers": sparse_layers, "skipped_layers": skipped, "task": task.name,
    }


def _write(out: Path, pruned: nn.Module, spec: Spec, source, pattern: Pattern, summary: dict,
           tokenizer: dict | None) -> None:
    # Held while written, and all or nothing: a failed write (a full disk) removes the files before it.
    with RunDir(out).writing() as rd:
        rd.write_model({k: v.detach().cpu() for k, v in pruned.state_dict().items()})
        if tokenizer is not None:       # a language model's vocabulary: `nmtrain sample` reads it from the run
            rd.write_tokenizer(tokenizer)
        # The source's spec names model and data; AdaPrune's own settings are in summary.json.
        rd.write_config(f"# spec of the source model ({source}); AdaPrune {pattern.describe()} settings: {SUMMARY}\n"
                        + dump_spec(spec))
        rd.write_summary(summary)
