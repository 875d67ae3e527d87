"""Straight-through masking with SR-STE's sparse-refined decay (Zhou et al., ICLR 2021).

Forward: ``W~ = E * W``. Backward: the gradient with respect to ``W~`` passes straight through to
all of ``W`` (pruned weights keep learning, so masks can change), plus ``decay * (1 - E) * W`` on the
pruned weights, which pulls them towards zero and so stabilises the mask. With ``decay = 0`` this is
plain STE.

The methods call it with ``decay = 0`` (`Method.masked_with_decay`) and add the decay once per optimizer
step instead (`Method.add_pruned_decay`): added in the backward, it would be added once per micro-batch
under gradient accumulation, divided by AMP's loss scale, and clipped with the loss's gradient. The
``decay`` argument stays as the formula's transcription (the sparse kernels' tests compare with it).
"""

from __future__ import annotations

import torch


class _STEMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            # weight first: ``decay * (~mask)`` would be a float32 tensor, rounding decay for a float64 weight
            grad = grad + ctx.decay * (weight * ~mask)
        return grad, None, None


def ste_mask(weight: torch.Tensor, mask: torch.Tensor, decay: float = 0.0) -> torch.Tensor:
    return _STEMask.apply(weight, mask, decay)


def change_rate(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Share of mask entries that flipped between two snapshots (0.0 when there is nothing to compare)."""
    flipped = total = 0
    for name, mask in new.items():
        if name in old:
            flipped += int((old[name] != mask).sum())
            total += mask.numel()
    return flipped / total if total else 0.0
