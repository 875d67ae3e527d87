"""Imports of masked state_dicts into nmtrain's form, for ``nmtrain convert``.

A state_dict from ``torch.nn.utils.prune`` (``X.weight_orig`` + ``X.weight_mask``) or with mask buffers
beside the weight (``X.weight`` + ``X.weight_mask``, ``X.mask``, or apex ASP's ``X.__weight_mma_mask``)
is turned into nmtrain's form: ``X.weight = W * mask`` (pruned entries +0.0) and the mask entries dropped.
"""

from __future__ import annotations

import torch

from ..sparsity import fold_mask
from .errors import ConvertError


def _mask_owner(key: str, state: dict) -> tuple[str, str, str] | None:
    """(weight key, key holding the raw weight, style) for a mask entry ``key``, or None."""
    if key.endswith("_orig"):
        return None
    if key.endswith("_mask"):
        base = key[:-len("_mask")]
        head, _, last = base.rpartition(".")
        if last.startswith("__") and last.endswith("_mma"):                # apex ASP: X.__weight_mma_mask
            name = f"{head}.{last[2:-4]}" if head else last[2:-4]
            if name in state:
                return name, name, "ASP mask buffer"
            return None
        if base + "_orig" in state:
            return base, base + "_orig", "torch.nn.utils.prune"
        if base in state:
            return base, base, "mask buffer"
    if key == "mask" or key.endswith(".mask"):
        head = key[:-len("mask")]
        if head + "weight" in state:
            return head + "weight", head + "weight", "mask buffer"
    return None


def import_masks(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fold mask entries into their weights (see the module docstring); returns (state, notes)."""
    folds: dict[str, tuple[str, str, str]] = {}
    for key in state:
        owner = _mask_owner(key, state)
        if owner is not None:
            folds[key] = owner
    if not folds:
        return dict(state), []
    drop = set(folds) | {raw for (_n, raw, _s) in folds.values() if raw.endswith("_orig")}
    new_values: dict[str, torch.Tensor] = {}
    notes = []
    for mask_key, (name, raw, style) in folds.items():
        weight, mask = state[raw], state[mask_key]
        if mask.shape != weight.shape:
            raise ConvertError(f"SOURCE: mask {mask_key} {tuple(mask.shape)} does not match {raw} {tuple(weight.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ConvertError(f"SOURCE: mask {mask_key} holds values other than 0 and 1")
        new_values[name] = fold_mask(weight, mask.bool())
        notes.append(f"{name} ({style})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in drop:
            if key.endswith("_orig") and key[:-5] in new_values:
                out[key[:-5]] = new_values[key[:-5]]      # keep the weight where its _orig was
            continue
        out[key] = new_values.get(key, value)
    return out, notes
