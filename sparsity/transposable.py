"""Transposable N:M masks (Hubara et al., NeurIPS 2021).

A transposable mask is N:M along K (rows of the GEMM operand, for the forward product ``X W~^T``)
*and* along C_out (columns, for the backward-data product ``dY W~``), so both GEMMs can use sparse
tensor cores. nmtrain tiles the operand into M consecutive rows x M consecutive columns and asks a
solver for a mask per tile with exactly N kept per row and per column. (The public reference code
built its "tiles" from M*M consecutive weights of one output channel, which constrains only the
input direction; that mask does not accelerate ``dY W~``.) For a conv under the ``nhwc`` layout the
tiles are exactly the M x M blocks of every kernel tap's ``C_out x C_in`` slice.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layout import from_matrix, from_tiles, require_fits, to_matrix, to_tiles
from .nm import magnitude
from .pattern import Pattern
from .solvers import get_solver
from .solvers.registry import NOT_FINITE


def transposable_mask(weight: torch.Tensor, n: int, m: int, solver: str = "exact", layout: str = "nhwc",
                      chunk_tiles: int | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Bool mask of ``weight``'s shape, N:M along K and along C_out, chosen by ``solver``.

    ``chunk_tiles`` splits the work (for progress reports through ``on_progress(done, total)``);
    results do not depend on it.
    """
    pattern = Pattern(n, m, transposable=True)
    require_fits(weight.shape, pattern, layout)
    info = get_solver(solver)
    matrix = to_matrix(weight.detach(), layout)
    # a solver that reads its tiles from the matrix itself, or the (T, M, M) batch of |W| tiles
    job = (info.matrix(matrix, n, m) if info.matrix is not None else None) or _Tiles(info.fn, matrix, n, m)
    total = job.total
    step = chunk_tiles or total or 1
    for start in range(0, total, step):
        job.run(start, min(start + step, total))
        if on_progress is not None:
            on_progress(min(start + step, total), total)
    if not total and on_progress is not None:
        on_progress(0, 0)
    return from_matrix(job.keep(), weight.shape, layout)


class _Tiles:
    """The generic path (a `TileJob`): |W| of the matrix as a (T, M, M) batch, each range of tiles given to
    the solver's function."""

    def __init__(self, solve, matrix: torch.Tensor, n: int, m: int):
        scores = magnitude(matrix)
        # the largest |w| is NaN or Inf when any is: one reduction, where isfinite().all() writes a mask first
        if scores.numel() and not bool(torch.isfinite(scores.max())):
            raise ValueError(f"transposable_mask: {NOT_FINITE}")
        self.solve, self.n, self.shape = solve, n, matrix.shape
        self.tiles = to_tiles(scores, m)
        self.total = self.tiles.shape[0]
        self.parts: list[torch.Tensor] = []

    def run(self, first: int, last: int) -> None:
        self.parts.append(self.solve(self.tiles[first:last], self.n))

    def keep(self) -> torch.Tensor:
        if not self.parts:                      # no tiles
            return torch.zeros(self.shape, dtype=torch.bool, device=self.tiles.device)
        # one piece: the solver's own result, not a copy of it
        keep = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        return from_tiles(keep, *self.shape)


def tile_scores(weight: torch.Tensor, m: int, layout: str = "nhwc") -> torch.Tensor:
    """|W| as the ``(T, M, M)`` batch of tiles the solvers work on (for tests and benchmarks)."""
    return to_tiles(to_matrix(magnitude(weight), layout), m)


def pruned_magnitude(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-tile magnitude a mask prunes (the quantity the min-cost flow minimises), in float64."""
    return (scores.double() * (~keep)).sum((-2, -1))
