"""The ``batched`` exact solver for any N:M-T: greedy warm start, then positive-cycle cancelling.

Pure tensor code, so it runs wherever the tensors are (it is ``exact``'s path on a GPU). Warm
start: the ``approx`` mask (Algorithm 1, completed to exactly N per row and column, vectorised). Then
``cycles.cancel_cycles`` applies improving exchange cycles until none is left, which proves the mask
optimal (see ``cycles.py`` for why). Tiles still improving after ``max_rounds`` rounds, or whose
cycle fails its independent check, are solved by the ``flow`` reference; ``cycles.stats['fallback']``
counts them (it has stayed 0 in every test and benchmark).
"""

from __future__ import annotations

import torch

from .registry import register_solver, trivial_keep
from .cycles import cancel_cycles, quantise, stats
from .flow import flow_solver
from .greedy import vectorised_approx


@register_solver("batched", exact=True,
                 summary="greedy warm start + positive-cycle cancelling (Floyd-Warshall), batched over tiles; any N:M")
def batched_solver(scores: torch.Tensor, n: int, max_rounds: int | None = None) -> torch.Tensor:
    t, m, _ = scores.shape
    for key in stats:
        stats[key] = 0
    trivial = trivial_keep(scores, n)
    if trivial is not None:
        return trivial
    keep = vectorised_approx(scores, n)
    failed = cancel_cycles(keep, quantise(scores), n, max_rounds or 4 * m * m)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(1)
        stats["fallback"] = idx.numel()
        keep[idx] = flow_solver(scores[idx], n)
    return keep
