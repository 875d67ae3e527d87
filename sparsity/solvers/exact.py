"""The ``exact`` solver: the fastest exact method available for the pattern and the device.

- Enumeration when the tile has few enough valid masks (2:4 has 90: one matmul), on any device; on a
  CPU with numba, a layer's matrix is enumerated by the compiled kernel (`enumerate.on_matrix`: the same
  masks, without the matrix product's set-up and copies).
- Otherwise on a CPU the compiled per-tile solver (``compiled.py``: greedy warm start, Bellman-Ford
  cycle cancelling, numba, one thread per chunk of tiles), several times faster than the tensor
  code there.
- Otherwise (a GPU, or no numba) the batched tensor solver (``batched.py``: the same warm start and
  cycle cancelling, Floyd-Warshall over all tiles at once).

Each falls back to the ``flow`` reference only for tiles it could not finish; all reach the same
optimum (``flow``'s objective) on every tile. Masks can differ between paths only where several
masks keep exactly the same magnitude.
"""

from __future__ import annotations

import torch

from . import compiled
from .registry import register_solver
from .batched import batched_solver
from .enumerate import enumerable, enumerate_solver
from .enumerate import on_matrix as enumerate_on_matrix


@register_solver("exact", exact=True,
                 summary="optimal mask, fastest exact path: enumeration for small M (2:4); else compiled "
                         "cycle cancelling on CPU, batched on GPU",
                 matrix=lambda matrix, n, m: (enumerate_on_matrix(matrix, n, m) if enumerable(m, n)
                                              else compiled.on_matrix(matrix, n, m, exact=True)))
def exact_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    m = scores.shape[-1]
    if enumerable(m, n):
        return enumerate_solver(scores, n)
    if scores.device.type == "cpu" and compiled.available() and m <= compiled.MAX_M:
        return compiled.compiled_solver(scores, n)
    return batched_solver(scores, n)
