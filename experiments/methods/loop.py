"""One training step in the order the method contract promises (see the package docstring).

The runner, the tests and the benchmarks all step through `train_step`, so none of them can drift from
the order a method's hooks are written for (a benchmark that skipped ``after_step`` measured a method
that never ran)::

    before_step; forward and loss; zero_grad; backward; [clip]; after_backward; optimizer.step; scheduler.step; after_step

Gradient clipping, when asked, comes right after the backward: a method's own gradient terms
(SR-STE's decay on pruned weights, a masked decay) are added after it, as Hu et al. add theirs "after
clipping", so the clip bounds the loss's gradient alone.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Method


def train_step(method: Method, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor],
               scheduler=None, on_mask_error: Callable[[ValueError], None] | None = None,
               clip: float | None = None) -> torch.Tensor:
    """Step ``step``: the method's hooks around ``loss_of()`` (the forward and the loss to backpropagate,
    where a caller also checks it), the backward and the optimizer step; returns that loss.

    ``on_mask_error``: called with a ValueError from ``before_step`` (a mask solver refusing weights it
    cannot rank, NaN say); it may raise what that means to its caller, else the ValueError stands.
    ``clip``: the gradients' total norm is clipped to it after the backward (None: no clipping)."""
    try:
        method.before_step(step)
    except ValueError as exc:
        if on_mask_error is not None:
            on_mask_error(exc)
        raise
    loss = loss_of()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    method.after_backward(step)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    method.after_step(step)
    return loss
