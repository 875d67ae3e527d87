"""One training step in the order the method contract promises (see the package docstring), kept by one
object, `Stepper`, whichever way it is driven.

A method's per-step work is three calls around the user's own (forward, backward, optimizer step)::

    before_step; forward and loss; zero_grad; backward; [clip]; after_backward; optimizer.step; after_step; [scheduler.step]

`Stepper` holds the step counter and makes those calls in that order, each once per optimizer step:
``begin`` (``before_step``, at the first training forward of the step), ``before_update``
(``after_backward``, just before the weights change) and ``after_update`` (``after_step``, then the
counter moves on). Two things drive it:

- `nmtrain.sparsify` (experiments/sparsify.py), for the runner and for anyone's own loop: hooks on the
  sparse layers' forward and on ``optimizer.step()`` call it, so a loop needs no other call;
- `train_step` below, for tests and benchmarks that drive a bare method (`attach`) step by step.

Gradient clipping, when asked, comes right after the backward: a method's own gradient terms
(SR-STE's decay on pruned weights, a masked decay) are added after it, as Hu et al. add theirs "after
clipping", so the clip bounds the loss's gradient alone. With hooks that holds by itself: the user clips
before calling ``optimizer.step()``, and ``after_backward`` runs inside it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Method


class Stepper:
    """The step counter of a method and its three per-step calls, each made once per optimizer step.

    ``on_mask_error``: called with a ValueError from ``before_step`` (a mask solver refusing weights it
    cannot rank, NaN say); it may raise what that means to its caller, else the ValueError stands."""

    def __init__(self, method: Method, step: int = 0,
                 on_mask_error: Callable[[ValueError], None] | None = None):
        self.method = method
        self.step = step
        self.begun = False              # before_step has run for ``step``
        self.on_mask_error = on_mask_error

    def begin(self) -> None:
        """``before_step(step)``, once per step: at the step's first training forward (or its update)."""
        if self.begun:
            return
        try:
            self.method.before_step(self.step)
        except ValueError as exc:
            if self.on_mask_error is not None:
                self.on_mask_error(exc)
            raise
        self.begun = True

    def before_update(self) -> None:
        """SR-STE's decay on pruned weights (``add_pruned_decay``), then ``after_backward(step)``: the loss's
        gradients are final (accumulated, clipped, unscaled), the weights not yet changed."""
        self.begin()
        self.method.add_pruned_decay()
        self.method.after_backward(self.step)

    def after_update(self) -> None:
        """``after_step(step)``, then the next step."""
        self.method.after_step(self.step)
        self.step += 1
        self.begun = False


def train_step(method: Method, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor],
               scheduler=None, on_mask_error: Callable[[ValueError], None] | None = None,
               clip: float | None = None) -> torch.Tensor:
    """Step ``step`` of a bare method: its hooks around ``loss_of()`` (the forward and the loss to
    backpropagate), the backward and the optimizer step, in `Stepper`'s order; returns that loss.

    ``clip``: the gradients' total norm is clipped to it after the backward (None: no clipping)."""
    stepper = Stepper(method, step, on_mask_error)
    stepper.begin()
    loss = loss_of()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    stepper.before_update()
    optimizer.step()
    stepper.after_update()
    if scheduler is not None:
        scheduler.step()
    return loss
