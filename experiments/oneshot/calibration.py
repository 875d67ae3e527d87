"""Calibration data and what a layer sees of it: the seeded sample, a layer's inputs, its GEMM-view rows,
and the per-layer reconstruction error every conversion reports.

A layer's inputs are taken with a forward pre-hook that stops the forward pass at the layer (nothing
after it runs), batch by batch, in eval mode. Methods that need only statistics of the inputs
(Wanda's norms, SparseGPT's Hessian) stream them (`stream_inputs`) and never hold all of them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ...sparsity import conv_rows, fold_mask, linear_rows
from ..evaluate import eval_mode
from ..layers import gemm
from .registry import Calibration


def calibration_set(train_ds: Dataset, n: int, seed: int, batch: int = 256) -> Calibration:
    """``n`` samples of ``train_ds`` (images without augmentation, or token windows) chosen by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_ds), generator=g)[:n].tolist()
    loader = DataLoader(Subset(train_ds, idx), batch_size=256, shuffle=False)
    xs, ys = zip(*loader)
    return Calibration(torch.cat(xs), torch.cat(ys), seed, batch)


class _Stop(Exception):
    pass


@torch.no_grad()
def stream_inputs(model: nn.Module, module: nn.Module, inputs: torch.Tensor, batch: int, device: torch.device,
                  consume: Callable[[torch.Tensor], None]) -> None:
    """Call ``consume(x)`` with the input ``module`` receives when ``model`` runs on each batch of ``inputs``."""
    seen = []

    def hook(_mod, args):
        seen.append(1)
        consume(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with eval_mode(model):
            for i in range(0, inputs.shape[0], batch):
                try:
                    model(inputs[i:i + batch].to(device))
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(seen) != -(-inputs.shape[0] // batch):
        raise RuntimeError("internal error: the layer did not see every calibration batch")


def capture_inputs(model: nn.Module, module: nn.Module, inputs: torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
    """The inputs ``module`` receives when ``model`` runs on ``inputs`` (eval mode), as one tensor."""
    captured: list[torch.Tensor] = []
    stream_inputs(model, module, inputs, batch, device, captured.append)
    return torch.cat(captured)


def gemm_rows(module: nn.Module, x: torch.Tensor, layout: str) -> torch.Tensor:
    """A Linear's or Conv2d's inputs as the rows ``(tokens, K)`` of its GEMM view under ``layout``, padded as
    the layer pads them (any padding mode, ``padding='same'`` too), so ``rows @ to_matrix(W).T`` is its output."""
    if isinstance(module, nn.Linear):
        return linear_rows(x)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return conv_rows(padded, module.kernel_size, module.stride, module.dilation, layout)


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


@torch.no_grad()
def layer_targets(original: nn.Module, name: str, calib: Calibration,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, outputs) of ``original``'s layer ``name`` on the calibration inputs: what a layer is fitted to."""
    mod = original.get_submodule(name)
    x = capture_inputs(original, mod, calib.inputs, calib.batch, device)
    y = torch.cat([gemm(mod, x[j:j + calib.batch], mod.weight, mod.bias) for j in range(0, x.shape[0], calib.batch)])
    return x, y


@torch.no_grad()
def layer_errors(original: nn.Module, model: nn.Module, names: list[str], calib: Calibration, sequential: bool,
                 device: torch.device, masks: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Each layer's relative reconstruction error ``||layer(X) - Y||^2 / ||Y||^2`` on the calibration inputs.

    ``Y`` is the original layer's output on the original model's inputs; ``X`` is what the layer is fitted
    on: ``model``'s inputs to it when ``sequential`` (upstream layers already converted), else the original
    model's. ``error`` is ``model``'s layer; with ``masks``, ``magnitude`` is the original weight with the
    mask folded in (plain magnitude projection, original bias) on the same ``X``.

    One pass of each model over the calibration batches serves every layer (hooks on all of them; only
    the current batch's ``Y`` is held), not a pass per layer: a 16-layer GPT spent 70 of its conversion's
    100 seconds here when every layer ran the model again.
    """
    sums = {name: {"error": 0.0, "magnitude": 0.0, "y": 0.0} for name in names}
    plain = {} if masks is None else {n: fold_mask(original.get_submodule(n).weight.detach(), masks[n]) for n in names}
    targets: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        mod, orig = model.get_submodule(name), original.get_submodule(name)
        row = sums[name]
        row["error"] += float((gemm(mod, x, mod.weight.detach(), mod.bias) - y).double().pow(2).sum())
        if masks is not None:
            row["magnitude"] += float((gemm(orig, x, plain[name], orig.bias) - y).double().pow(2).sum())
        row["y"] += float(y.double().pow(2).sum())

    def on_original(name):
        def hook(_mod, args, out):
            if sequential:
                targets[name] = out.detach().clone()    # this batch's Y (a copy: an in-place ReLU changes it)
            else:
                add(name, args[0].detach(), out.detach())
        return hook

    def on_model(name):
        def hook(_mod, args, _out):
            add(name, args[0].detach(), targets.pop(name))
        return hook

    handles = [original.get_submodule(n).register_forward_hook(on_original(n)) for n in names]
    if sequential:
        handles += [model.get_submodule(n).register_forward_hook(on_model(n)) for n in names]
    try:
        with eval_mode(original), eval_mode(model):
            for x, _ in calib.batches(device):
                original(x)
                if sequential:
                    model(x)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for name, row in sums.items():
        den = row["y"]
        errors[name] = {"error": row["error"] / den if den > 0 else row["error"]}
        if masks is not None:
            errors[name]["magnitude"] = row["magnitude"] / den if den > 0 else row["magnitude"]
    return errors


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: torch.Tensor, batch: int, device: torch.device) -> bool:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``inputs``; False without any."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None       # cumulative average
    with eval_mode(model, training=True):      # train mode: BatchNorm updates its running statistics
        for i in range(0, inputs.shape[0], batch):
            model(inputs[i:i + batch].to(device))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    return True
