"""AdaPrune's layer-wise reconstruction (Hubara et al., 2021; docs/methods.md#adaprune): the kept weights
and the bias of each layer fitted so that its output on the calibration inputs matches the original's.

``min ||W~ X + b~ - (W X + b)||^2`` (mean squared error) with Adam (lr 1e-3 weights, 1e-2 bias, 1000
steps of random batches of 50 calibration samples, seeded), the mask re-applied after every step. The
target is always the original layer's output on the original model's inputs; ``X`` is the original
model's inputs (parallel, the default and the reference code's choice: the fits are independent and errors
do not compound) or, with ``sequential``, the inputs of the model whose earlier layers are already
converted, so a layer also corrects the error accumulated upstream.

`fit_layers` is both the `adaprune` method's second half (after the magnitude mask and the add-back of
`add_back_pruned`) and ``--finetune``: the same fit, started from another method's weights and mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...sparsity import Pattern, fold_mask, from_matrix, to_matrix
from ..layers import gemm
from .calibration import capture_inputs, layer_targets, relative_error
from .registry import ConversionError, Job


@dataclass
class ReconstructParams:
    """AdaPrune's reconstruction; the reference's numbers (docs/methods.md#adaprune)."""
    iters: int = 1000           # Adam steps per layer
    batch: int = 50             # calibration samples per step
    lr_weight: float = 1e-3
    lr_bias: float = 1e-2
    sequential: bool = False    # inputs from the already-converted model (default: the original's)

    def check(self, pattern: Pattern) -> None:
        for name, low in (("iters", 0), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConversionError(f"--{name}: must be an integer >= {low}, got {value!r}")
        for name in ("lr_weight", "lr_bias"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConversionError(f"--{name.replace('_', '-')}: must be positive, got {value!r}")
        if not isinstance(self.sequential, bool):
            raise ConversionError(f"--sequential: must be true or false, got {self.sequential!r}")


@dataclass
class AdaPruneParams(ReconstructParams):
    add_back: bool = True       # start from the L1-preserving rescale of the kept weights; False: plain projection

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if not isinstance(self.add_back, bool):
            raise ConversionError(f"--add-back: must be true or false, got {self.add_back!r}")


def add_back_pruned(weight: torch.Tensor, mask: torch.Tensor, m: int, layout: str = "nhwc") -> torch.Tensor:
    """Masked weight whose kept entries carry their group's pruned magnitude (docs/methods.md#adaprune).

    Per group of ``m`` along K (the rows of the GEMM view, also for -T masks): ``w_k * sum|w_group| /
    sum|w_kept|`` for kept entries, exact zeros elsewhere; every group keeps its L1 norm and the signs.
    Groups whose kept entries are all zero stay zero.
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


def reconstruct(module: nn.Module, mask: torch.Tensor, init: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                iters: int, batch: int, lr_weight: float, lr_bias: float, generator: torch.Generator,
                on_step: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adam on the kept weights (from ``init``) and the bias (from ``module``'s): ``min mse(layer(x), y)``,
    mask after every step."""
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


def fit_layers(job: Job, masks: dict[str, torch.Tensor], params: ReconstructParams, label: str) -> dict[str, dict]:
    """Fit every layer of ``job.layers`` in order under its mask, from its current weight and bias (in place);
    one progress bar per layer. Returns, per layer, the relative error of its starting weights and the seconds."""
    results = {}
    bar, total = job.progress, len(job.layers)
    for i, name in enumerate(job.layers):
        task = bar.add_task(f"{label} {name} ({i + 1}/{total})", total=params.iters, info="")
        every = max(params.iters // 100, 1)

        def on_step(step: int, loss: float, _task=task, _every=every) -> None:
            if (step + 1) % _every == 0 or step + 1 == params.iters:
                bar.update(_task, completed=step + 1, info=f"mse {loss:.3e}")

        results[name] = _fit_layer(job, name, masks[name], params, on_step)
    return results


def _fit_layer(job: Job, name: str, mask: torch.Tensor, params: ReconstructParams,
               on_step: Callable[[int, float], None]) -> dict:
    t0 = time.perf_counter()
    mod = job.model.get_submodule(name)
    x_orig, y = layer_targets(job.original, name, job.calib, job.device)
    x = capture_inputs(job.model, mod, job.calib.inputs, job.calib.batch, job.device) if params.sequential else x_orig
    if params.sequential:
        del x_orig
    init = mod.weight.detach().clone()
    error_init = relative_error(mod, x, y, init, mod.bias, job.calib.batch)
    small = job.device.type == "cpu" and 3 * step_macs(mod, x, params.batch) < _SMALL_STEP_MACS
    with torch.enable_grad(), _cpu_threads(1 if small else None):
        w_new, b_new = reconstruct(mod, mask, init, x, y, params.iters, params.batch, params.lr_weight,
                                   params.lr_bias, job.generator, on_step)
    with torch.no_grad():
        mod.weight.copy_(w_new)
        if b_new is not None:
            mod.bias.copy_(b_new)
    return {"error_init": error_init, "seconds": time.perf_counter() - t0}
