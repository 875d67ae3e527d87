"""Row-wise N:M masks, unstructured magnitude masks, and the checker every mask is held to.

Masks are plain bool tensors of the weight's own shape: True = kept.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .layout import from_matrix, require_fits, to_matrix
from .errors import SparsityError
from .fused import decayed, masked, nm4_decayed, nm4_mask, nm4_masked
from .pattern import Pattern, as_pattern


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The floating type weights of ``dtype`` are ranked in: float32 for half precision and non-float types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W| in a floating type wide enough to rank (half precision is ranked in float32)."""
    w = weight.detach()
    return w.to(score_dtype(w.dtype)).abs()


@functools.lru_cache(maxsize=4096)
def _fits_once(shape: tuple[int, ...], n: int, m: int, layout: str) -> None:
    require_fits(shape, Pattern(n, m), layout)


def _require_nm_fits(shape: torch.Size, n: int, m: int, layout: str) -> None:
    """The pattern's values and the shape's fit, checked once per (shape, N, M, layout): the masks recomputed
    at every training forward would otherwise rebuild and check them on every call (an error is not cached,
    so it is raised again every time). Traced (torch.compile), the check itself: dynamo cannot trace a cache."""
    if torch.compiler.is_compiling():
        require_fits(shape, Pattern(n, m), layout)
    else:
        _fits_once(tuple(shape), n, m, layout)


# an nhwc conv of at most this many entries is masked where it lies: above it (ResNet-50's 3x3 convs past 128
# channels) the kernel's runs of kh*kw entries are too short to vectorise, and the GEMM view's copy, which
# torch makes on every thread, is faster end to end
_AS_IT_LIES = 1 << 17


def _nm4_where_it_lies(w: torch.Tensor, n: int, layout: str, kernel: Callable) -> Any:
    """``kernel`` (`fused.nm4_mask` or `fused.nm4_masked`) on the weight as it lies, its results in the weight's
    shape: no copy into the GEMM view and back (in `nm_mask_and_product`, those took about 21 µs of the 36 µs
    call on LeNet-5's 16x8x5x5 conv, 206 of 282 µs on ResNet-20's 64x64x3x3). A large nhwc conv, and one whose
    memory is not in its own order (channels-last, whose GEMM view is), on the GEMM view and back. None where
    the kernel does not serve (then topk)."""
    if w.dim() != 4 or (w.is_contiguous() and (layout != "nhwc" or w.numel() <= _AS_IT_LIES)):
        return kernel(w, n, layout)
    made = kernel(to_matrix(w, layout), n)
    if made is None:
        return None
    return from_matrix(made, w.shape, layout) if isinstance(made, torch.Tensor) else \
        tuple(from_matrix(t, w.shape, layout) for t in made)


def nm_mask(weight: torch.Tensor, n: int, m: int, layout: str = "nhwc") -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive ones along K (row-wise): ``topk``
    over each group, ties as ``topk`` breaks them. For M = 4 on a CPU a compiled pass gives the same mask
    (`fused.nm4_mask`, from a table of topk's own choices): one pass where topk and its scatter take
    about 30 ns a group."""
    _require_nm_fits(weight.shape, n, m, layout)
    if m == 4 and not torch.compiler.is_compiling():     # traced (train.compile): topk, the same mask
        keep = _nm4_where_it_lies(weight.detach(), n, layout, nm4_mask)
        if keep is not None:
            return keep
    scores = to_matrix(magnitude(weight), layout)
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return from_matrix(keep.reshape(scores.shape), weight.shape, layout)


def nm_mask_and_product(weight: torch.Tensor, n: int, m: int,
                        layout: str = "nhwc") -> tuple[torch.Tensor, torch.Tensor]:
    """`nm_mask` of ``weight`` and ``weight * mask`` (detached), as the two calls give them, bit for bit: at M = 4
    on a CPU in one pass over the weight (`fused.nm4_masked`), what a mask recomputed at every training
    forward costs twice otherwise."""
    _require_nm_fits(weight.shape, n, m, layout)
    w = weight.detach()
    if torch.compiler.is_compiling():           # traced: the two tensor formulas
        keep = nm_mask(w, n, m, layout)
        return keep, w * keep
    if m == 4:
        both = _nm4_where_it_lies(w, n, layout, nm4_masked)
        if both is not None:
            return both
    keep = nm_mask(w, n, m, layout)
    out = masked(w, keep)
    return keep, w * keep if out is None else out


def nm_mask_and_decayed(weight: torch.Tensor, n: int, m: int, value: torch.Tensor | float,
                        layout: str = "nhwc") -> tuple[torch.Tensor, torch.Tensor]:
    """`nm_mask` of ``weight`` and ``where(E, weight, weight * value)`` (E that mask; detached): the decayed weight of
    progressive gradient flow (PGF), whose pruned weights count ``value`` times. The two formulas' results bit for
    bit; at M = 4 on a CPU, with ``value`` a 0-dim CPU tensor, made in one pass over the weight
    (`fused.nm4_decayed`), where the mask and the product took two."""
    _require_nm_fits(weight.shape, n, m, layout)
    w = weight.detach()
    if m == 4 and isinstance(value, torch.Tensor) and not torch.compiler.is_compiling():
        both = _nm4_where_it_lies(w, n, layout, lambda t, k, lay="nhwc": nm4_decayed(t, k, value, lay))
        if both is not None:
            return both
    keep = nm_mask(w, n, m, layout)
    return keep, decayed_weight(w, keep, value)


def decayed_weight(weight: torch.Tensor, kept: torch.Tensor, value: torch.Tensor | float) -> torch.Tensor:
    """PGF's ``W * (E + (1 - E) v)`` bit for bit: kept entries W * 1, pruned ones W * v. Not a fold (v is above 0
    but in SDGF and the fine-tune): the export folds through sparsity.fold_mask. On a CPU layer, with ``value`` a
    0-dim CPU tensor, one compiled pass (`fused.decayed`), the same bits; traced by torch.compile, the formula."""
    if isinstance(value, torch.Tensor) and not torch.compiler.is_compiling():
        out = decayed(weight.detach(), kept, value)
        if out is not None:
            return out
    return torch.where(kept, weight, weight * value)


def unstructured_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * numel)`` largest-magnitude weights of the tensor, anywhere."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise SparsityError(f"density: must be in (0, 1], got {density!r}")
    scores = magnitude(weight).reshape(-1)
    k = int(round(density * scores.numel()))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[scores.topk(k).indices] = True
    return keep.reshape(weight.shape)


def kept_share(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the total |W| that the mask keeps (1.0 for an all-zero weight)."""
    if mask.shape != weight.shape:
        raise SparsityError(f"mask: shape {tuple(mask.shape)} is not the weight's {tuple(weight.shape)}")
    scores = magnitude(weight).double()
    total = scores.sum().item()
    return 1.0 if total == 0 else (scores * mask).sum().item() / total


def _first_bad_group(counts: torch.Tensor, n: int, exact: bool) -> tuple[int, int, int] | None:
    bad = (counts != n) if exact else (counts > n)
    if not bool(bad.any()):
        return None
    row, group = (int(i) for i in bad.nonzero()[0])
    return row, group, int(counts[row, group])


def nm_violation(tensor: torch.Tensor, pattern: Pattern, layout: str = "nhwc",
                 exact: bool = False) -> str | None:
    """Why ``tensor`` (a bool mask, or weights whose zeros are the pruned entries) breaks ``pattern``.

    Hardware needs at most N non-zeros per group; ``exact=True`` asks for exactly N (what nmtrain's
    mask functions promise). Transposable patterns are checked along K and along C_out. Returns None
    when the tensor is valid, else a one-line description of the first violated group.
    """
    pattern = as_pattern(pattern)
    require_fits(tensor.shape, pattern, layout)
    nz = to_matrix(tensor != 0, layout).to(torch.int32)
    n, m = pattern.n, pattern.m
    want = "exactly" if exact else "at most"
    hit = _first_bad_group(nz.reshape(nz.shape[0], -1, m).sum(-1), n, exact)
    if hit is not None:
        row, group, count = hit
        return (f"row {row}, columns {group * m}..{group * m + m - 1} of the {layout} matrix keep "
                f"{count}, want {want} {n} of {m}")
    if pattern.transposable:
        cols = nz.t().contiguous()
        hit = _first_bad_group(cols.reshape(cols.shape[0], -1, m).sum(-1), n, exact)
        if hit is not None:
            col, group, count = hit
            return (f"column {col}, rows {group * m}..{group * m + m - 1} of the {layout} matrix keep "
                    f"{count}, want {want} {n} of {m} (transposable)")
    return None


def is_valid(tensor: torch.Tensor, pattern: Pattern, layout: str = "nhwc", exact: bool = False) -> bool:
    """Whether ``tensor`` (a bool mask, or weights whose zeros are the pruned entries) satisfies ``pattern``
    (`nm_violation` says why not)."""
    return nm_violation(tensor, pattern, layout, exact) is None
