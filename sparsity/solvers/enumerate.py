"""Exact transposable masks by enumeration, for M small enough to list every valid tile mask.

A 4x4 tile has only 90 masks with exactly 2 kept per row and column (1:4 and 3:4 have 24). Scoring
all of them is one matrix product, ``patterns (P x M*M) @ tiles (M*M x T)``, and the argmax per tile
is the optimum. The product runs in float64: in float32 a sum of up to M*M terms is off by up to about
M*M·eps of the tile's total, enough for a runner-up that close to swap places with the best (about 1
tile in 16,000–65,000 of random weights landed up to 2e-7 below the optimum when this solver scored in
float32). In float64 the kept sum of every mask of float32 magnitudes is exact (8 terms of 24-bit
significands fit 53 bits unless they span over 2^26), so what this solver returns keeps, on every tile,
the largest kept magnitude there is. (`flow` and the compiled solvers optimise |W| rounded to 2^-40 of
each tile's largest |w|: their optimum and this one differ only between masks whose kept sums lie within
about M·2^-40 of that largest |w| of each other.) Laid out
patterns-first, the product and the argmax run along contiguous tiles, which makes float64 cheaper here
than float32 was the other way round. Ties go to the first best pattern in a fixed order: deterministic.
For 4:8 there are 116,963,796,250 valid 8x8 masks, so this path stops at ``MAX_PATTERNS``.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..diversity import transposable_count
from .registry import register_solver

MAX_PATTERNS = 5000  # 2:4 (90), 2:5 (2,040) and every M <= 5 fit; 3:6 (297,200) does not
_CHUNK_ELEMENTS = 1 << 20  # P x T scores per chunk (float64, 8 MB): small enough to stay in cache for the max


def enumerable(m: int, n: int) -> bool:
    # M <= 6 keeps the count itself instant to compute (A(6, 3) = 297,200; A(7, 1) = 5,040 > limit)
    return m <= 6 and transposable_count(m, n) <= MAX_PATTERNS


@functools.lru_cache(maxsize=None)
def patterns(m: int, n: int) -> torch.Tensor:
    """Every M x M 0/1 matrix with exactly n ones per row and column, as a (P, M*M) bool tensor."""
    rows = [frozenset(c) for c in itertools.combinations(range(m), n)]
    found: list[tuple[frozenset, ...]] = []

    def extend(prefix: list[frozenset], col_counts: list[int]) -> None:
        left = m - len(prefix)
        if left == 0:
            found.append(tuple(prefix))
            return
        for row in rows:
            counts = [c + (j in row) for j, c in enumerate(col_counts)]
            # every column must still be able to reach n with the rows that remain
            if all(c <= n and n - c <= left - 1 for c in counts):
                extend(prefix + [row], counts)

    extend([], [0] * m)
    out = torch.zeros(len(found), m * m, dtype=torch.bool)
    for p, mask in enumerate(found):
        for i, row in enumerate(mask):
            for j in row:
                out[p, i * m + j] = True
    return out


@register_solver("enumerate", exact=True,
                 summary="score every valid tile mask with one matmul and take the best (M x M with few masks, e.g. 2:4)")
def enumerate_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    t, m, _ = scores.shape
    if not enumerable(m, n):
        # the count only where it is instant: A(16, 8) alone takes seconds, A(32, 16) hours
        many = f"{transposable_count(m, n):,}" if m <= 6 else f"more than {MAX_PATTERNS:,}"
        raise ValueError(f"{n}:{m}-T has {many} tile masks, too many to enumerate "
                         f"(limit {MAX_PATTERNS:,}); use the 'exact' or 'flow' solver")
    pats = patterns(m, n).to(scores.device)
    weights = pats.to(torch.float64)               # (P, M*M)
    flat = scores.reshape(t, m * m)
    best = torch.empty(t, dtype=torch.long, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // pats.shape[0])
    for start in range(0, t, step):
        # max(0) along contiguous tiles: its indices (the first best on ties) cost half of argmax(0)'s here
        best[start:start + step] = (weights @ flat[start:start + step].to(torch.float64).t()).max(0).indices
    return pats[best].reshape(t, m, m)
