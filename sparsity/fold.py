"""Folding a mask into its weight: the one place nmtrain turns (W, mask) into a plain pruned weight.

Training's export, AdaPrune and `prune` all call `fold_mask`, so a pruned entry is the same +0.0
everywhere: a where(), not a multiply, because W * 0 keeps -0.0 and turns NaN/Inf into NaN, and
exports must be bit-exact zeros at pruned positions.
"""

from __future__ import annotations

import torch

from .errors import SparsityError


class FoldError(SparsityError):
    """A mask that cannot be folded into its weight (wrong dtype or shape); the message names both."""


def fold_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with every entry ``mask`` prunes (False) set to +0.0; a new tensor, kept entries bit-exact."""
    if mask.dtype != torch.bool:
        raise FoldError(f"mask of dtype {mask.dtype} cannot be folded; masks are bool tensors (True = kept)")
    if tuple(mask.shape) != tuple(weight.shape):
        raise FoldError(f"mask {tuple(mask.shape)} does not match its weight {tuple(weight.shape)}")
    return torch.where(mask.to(weight.device), weight, weight.new_zeros(()))
