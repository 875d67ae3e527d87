"""The ``exact`` solver: the fastest exact method available for the pattern.

Enumeration when the tile has few enough valid masks (2:4 has 90), otherwise the min-cost flow.
"""

from __future__ import annotations

import torch

from . import register_solver
from .enumerate import enumerable, enumerate_solver
from .flow import flow_solver


@register_solver("exact", exact=True,
                 summary="optimal mask, fastest exact path: enumeration for small M (2:4), else min-cost flow")
def exact_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    m = scores.shape[-1]
    if enumerable(m, n):
        return enumerate_solver(scores, n)
    return flow_solver(scores, n)
