"""One-shot N:M masks from calibration statistics: Wanda and SparseGPT, row-wise and transposable.

Both work on a layer's GEMM view ``W`` (``C_out x K``, `to_matrix` under the layout) and on statistics
of the inputs the layer sees, as rows ``X`` of shape ``tokens x K`` in the same K order (`linear_rows`,
`conv_rows`): ``W X^T`` is the layer's output without its bias.

- **Wanda** (Sun et al., ICLR 2024; locuslab/wanda ``lib/prune.py`` `prune_wanda`): the saliency of
  ``W_ij`` is ``|W_ij| * ||X_j||_2``, the input feature's L2 norm over the calibration tokens; keep the N
  most salient of every M along K per output row. No weight update. The reference keeps a running mean
  of ``||x_j||^2`` over samples; its square root differs from the sum's by one constant factor, which
  no mask depends on.
- **SparseGPT** (Frantar and Alistarh, ICML 2023; IST-DASLab/sparsegpt ``sparsegpt.py``
  `SparseGPT.fasterprune`), followed step by step: dead inputs (zero Hessian diagonal) get a unit
  diagonal and zero weights; the Hessian is dampened by ``percdamp`` times its mean diagonal; ``Hinv``
  is the upper Cholesky factor of its inverse. Columns are walked in blocks of ``blocksize``; at every
  M-th column of a block the N:M mask of the next M columns is chosen by the saliency
  ``w^2 / Hinv_jj^2``, and for each column the error ``(w - q) / Hinv_jj`` is propagated to the
  columns on its right through row j of ``Hinv``: inside the block at once, beyond it lazily, once per
  block.

For N:M-T, each method chooses its mask with the transposable solvers (`transposable_mask`, which keeps
the entries of largest total score) on its own saliency: Wanda on the whole ``|W| * ||X||`` matrix,
SparseGPT on the M columns' ``w^2 / Hinv_jj^2``, cut into M x M tiles of M consecutive rows, so the
mask is N:M along K *and* along C_out. None of the published tools does this.

Masks are bool, True = kept (the reference's ``mask1`` marks the pruned entries instead).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import SparsityError
from .fold import fold_mask
from .layout import check_layout, require_fits
from .nm import nm_mask
from .pattern import Pattern
from .transposable import transposable_mask


class OneShotError(SparsityError):
    """Input a one-shot method cannot use (a block size, a dampening, a Hessian); one-line message."""


# ------------------------------------------------------------------------------------------------
# Input rows in the GEMM view


def linear_rows(x: torch.Tensor) -> torch.Tensor:
    """A Linear's inputs ``(..., K)`` as rows ``(tokens, K)``: every position of every sample is a token."""
    return x.reshape(-1, x.shape[-1])


def conv_rows(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1),
              dilation: Sequence[int] = (1, 1), layout: str = "nhwc") -> torch.Tensor:
    """A Conv2d's (already padded) inputs ``(B, C_in, H, W)`` as rows ``(B * L, K)``, one per output pixel.

    Row ``r`` holds the patch that output pixel ``r`` reads, in `to_matrix`'s K order for ``layout``:
    ``(kh, kw, C_in)`` for ``nhwc``, ``(C_in, kh, kw)`` for ``flatten`` (unfold's own order). So
    ``conv_rows(x) @ to_matrix(weight, layout).T`` is the convolution, pixel by pixel.
    """
    check_layout(layout)
    patches = torch.nn.functional.unfold(x, tuple(kernel_size), dilation=tuple(dilation), padding=0,
                                         stride=tuple(stride))                     # (B, C_in*kh*kw, L)
    b, k, pixels = patches.shape
    if layout == "nhwc":
        c_in = x.shape[1]
        patches = patches.reshape(b, c_in, k // c_in, pixels).transpose(1, 2).reshape(b, k, pixels)
    return patches.transpose(1, 2).reshape(b * pixels, k)


class Hessian:
    """``H = 2/n * sum X X^T`` over the calibration inputs, ``n`` the samples seen (SparseGPT's ``add_batch``).

    As the reference, a running average: each batch rescales ``H`` by ``n / (n + batch)`` and adds its rows
    scaled by ``sqrt(2 / n)``. ``samples`` counts the batch's samples (sequences, images), not its rows.
    """

    def __init__(self, columns: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.samples = 0

    def add_batch(self, rows: torch.Tensor, samples: int) -> None:
        if rows.shape[-1] != self.matrix.shape[0]:
            raise OneShotError(f"Hessian: rows of width {rows.shape[-1]} for a layer of K={self.matrix.shape[0]}")
        self.matrix *= self.samples / (self.samples + samples)
        self.samples += samples
        x = math.sqrt(2 / self.samples) * rows.to(self.matrix.dtype)
        self.matrix += x.t() @ x


def sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """``sum_tokens x_j^2`` per input feature ``j`` (float32 at least): add batches' to get Wanda's statistic."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return rows.to(dtype).pow(2).sum(0)


# ------------------------------------------------------------------------------------------------
# Wanda


def wanda_saliency(weight2d: torch.Tensor, x_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2``, with ``x_sq_norm`` the per-feature sum of squares of the inputs (`sq_norms`)."""
    if weight2d.dim() != 2 or x_sq_norm.shape != (weight2d.shape[1],):
        raise OneShotError(f"wanda: a {tuple(weight2d.shape)} weight needs one input norm per column, "
                           f"got {tuple(x_sq_norm.shape)}")
    dtype = torch.promote_types(weight2d.dtype, torch.float32)
    return weight2d.detach().to(dtype).abs() * x_sq_norm.to(dtype).clamp_min(0).sqrt().reshape(1, -1)


def choose_by_score(scores: torch.Tensor, pattern: Pattern, solver: str = "exact") -> torch.Tensor:
    """Keep mask of a ``rows x K`` score matrix: the ``n`` top scores of every ``m`` along K per row, or for
    N:M-T the solver's M x M tile masks of largest total score. Scores must be non-negative and finite."""
    if pattern.transposable:
        return transposable_mask(scores, pattern.n, pattern.m, solver=solver)
    return nm_mask(scores, pattern.n, pattern.m)


def wanda_mask(weight2d: torch.Tensor, x_sq_norm: torch.Tensor, n: int, m: int, transposable: bool = False,
               solver: str = "exact") -> torch.Tensor:
    """Wanda's N:M (or N:M-T) keep mask of a GEMM-view weight: `choose_by_score` on `wanda_saliency`."""
    return choose_by_score(wanda_saliency(weight2d, x_sq_norm), Pattern(n, m, transposable), solver)


# ------------------------------------------------------------------------------------------------
# SparseGPT


def check_sparsegpt(pattern: Pattern, blocksize: int, percdamp: float) -> None:
    """The reference's choices as SparseGPT can use them: a block holds whole groups of M, damping >= 0."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 or blocksize % pattern.m:
        raise OneShotError(f"blocksize: must be a positive multiple of M={pattern.m} (the mask is chosen every "
                           f"M columns inside a block), got {blocksize!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise OneShotError(f"percdamp: must be a finite number >= 0 (the share of the mean Hessian diagonal "
                           f"added to it; the reference's default is 0.01), got {percdamp!r}")


def inverse_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the dampened ``H^-1``, the dead columns); ``hessian`` is not changed."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp
    try:
        h = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(h)
        return torch.linalg.cholesky(h, upper=True), dead
    except torch.linalg.LinAlgError:
        raise OneShotError(f"percdamp: the Hessian dampened by {percdamp:g} of its mean diagonal is not positive "
                           "definite; raise --percdamp (e.g. 0.1) or give more calibration samples") from None


def sparsegpt(weight2d: torch.Tensor, hessian: torch.Tensor, n: int, m: int, transposable: bool = False,
              blocksize: int = 128, percdamp: float = 0.01, solver: str = "exact",
              on_progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's pruned and updated weight and its keep mask, for a GEMM-view weight and its Hessian.

    Computes in the weight's dtype (float32 for half precision); returns the weight in its own dtype,
    pruned entries +0.0. ``on_progress(done, total)`` is called after each block of columns.
    """
    pattern = Pattern(n, m, transposable)
    check_sparsegpt(pattern, blocksize, percdamp)
    require_fits(weight2d.shape, pattern)
    rows, columns = weight2d.shape
    if hessian.shape != (columns, columns):
        raise OneShotError(f"sparsegpt: a {tuple(weight2d.shape)} weight needs a {columns}x{columns} Hessian, "
                           f"got {tuple(hessian.shape)}")
    dtype = torch.promote_types(weight2d.dtype, torch.float32)
    w = weight2d.detach().to(dtype).clone()
    hinv, dead = inverse_factor(hessian.detach().to(dtype), percdamp)
    w[:, dead] = 0
    keep = torch.ones(rows, columns, dtype=torch.bool, device=w.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        q1, err1, keep1 = _block(w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], pattern, solver)
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])          # the lazy update of the columns past the block
        if on_progress is not None:
            on_progress(i2, columns)
    return fold_mask(w, keep).to(weight2d.dtype), keep


def _block(w1: torch.Tensor, hinv1: torch.Tensor, pattern: Pattern,
           solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of `sparsegpt`: (its pruned weights Q1, its scaled errors Err1, its keep mask)."""
    m = pattern.m
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    keep1 = torch.ones(w1.shape, dtype=torch.bool, device=w1.device)
    d_all = torch.diag(hinv1)
    for i in range(w1.shape[1]):
        w = w1[:, i]
        d = hinv1[i, i]
        if i % m == 0:
            scores = w1[:, i:i + m] ** 2 / d_all[i:i + m].reshape(1, -1) ** 2
            keep1[:, i:i + m] = choose_by_score(scores, pattern, solver)
        q = w.clone()
        q[~keep1[:, i]] = 0
        q1[:, i] = q
        e = (w - q) / d
        w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
        err1[:, i] = e
    return q1, err1, keep1


def reconstruction_error(weight2d: torch.Tensor, new2d: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - W~) H (W - W~)^T)``: ``||(W - W~) X^T||^2`` up to H's scale (float64)."""
    delta = (weight2d.double() - new2d.double())
    return float(((delta @ hessian.double()) * delta).sum())
