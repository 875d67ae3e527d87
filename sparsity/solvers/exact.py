"""The ``exact`` solver: the fastest exact method available for the pattern.

Enumeration when the tile has few enough valid masks (2:4 has 90: one matmul, measured ~4x faster
than cycle cancelling there), otherwise the batched cycle-cancelling solver (``batched.py``), which
is exact for any N:M and falls back to the min-cost flow only for tiles it could not finish.
"""

from __future__ import annotations

import torch

from . import register_solver
from .batched import batched_solver
from .enumerate import enumerable, enumerate_solver


@register_solver("exact", exact=True,
                 summary="optimal mask, fastest exact path: enumeration for small M (2:4), else batched cycle cancelling")
def exact_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    m = scores.shape[-1]
    if enumerable(m, n):
        return enumerate_solver(scores, n)
    return batched_solver(scores, n)
