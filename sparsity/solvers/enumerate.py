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

On a CPU with numba, a layer's matrix takes the compiled enumeration (`on_matrix`): the same patterns in
the same order, each scored as the sum of its rows' kept sums (per row, the C(M, N) sums of N entries
first, then M of those per pattern: 6 and 90 x 4 additions for 2:4, where the product takes 90 x 16),
the first best kept, read from the matrix itself, a task's tiles along the vector lanes. Where a tile's
kept sums are exact (above), they are the product's sums whatever the order of the additions, so the
masks are the product's, ties included (tests/test_enumerate_exact.py). Where they round (magnitudes
spanning over 2^26 in one tile, or float64 weights), the two add in other orders: both keep the
optimum to within that rounding, and a tie or a near-tie inside it can go either way.
"""

from __future__ import annotations

import functools
import itertools

import torch

import numpy as np

from ..diversity import transposable_count
from . import compiled
from .registry import register_solver

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; without it the tensor path serves
    njit = None

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
                 summary="score every valid tile mask and take the best (M x M with few masks, e.g. 2:4): "
                         "numba-compiled per tile on a CPU, one matmul elsewhere",
                 matrix=lambda matrix, n, m: on_matrix(matrix, n, m))
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


# ------------------------------------------------------------------------------------------------
# The compiled enumeration (CPU): the same patterns, scored row by row


@functools.lru_cache(maxsize=None)
def row_choices(m: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(combos, rows_of, bits): every row's possible kept set as a (C, N) array of columns (C = C(M, N), in
    ``itertools.combinations`` order); per pattern of `patterns`, in its order, the combo each of its M rows
    keeps, (P, M); and the patterns themselves as (P, M*M) bools."""
    combos = list(itertools.combinations(range(m), n))
    index = {frozenset(c): k for k, c in enumerate(combos)}
    bits = patterns(m, n).numpy()
    rows_of = np.array([[index[frozenset(np.flatnonzero(p.reshape(m, m)[i]).tolist())] for i in range(m)]
                        for p in bits], dtype=np.int64).reshape(-1, m)
    return np.array(combos, dtype=np.int64).reshape(-1, n), rows_of, bits


_LARGEST = float(np.finfo(np.float64).max)

if njit is not None:

    @njit(parallel=True, cache=True)
    def _enumerate_tiles(w, m, combos, rows_of, bits, not_finite, keep, outcome, first, last, chunk):
        """Tiles ``first..last-1`` of the matrix ``w`` (row-major, as `compiled._solve`): each tile's best
        pattern (the first of the highest kept sum) written into ``keep``; a tile holding a NaN or Inf gets
        the outcome code ``not_finite`` (an argument, not a global of another module: numba's cache would
        keep a stale copy). A task's tiles are laid out along the last axis, so that the per-pattern sums
        and the running best run as vector code across tiles."""
        per_band = w.shape[1] // m
        n_combos, n = combos.shape
        for task in prange((last - first + chunk - 1) // chunk):
            lo = first + task * chunk
            size = min(last, lo + chunk) - lo
            a = np.empty((m * m, size), np.float64)                 # |w|, entry by entry, tiles along
            row_sum = np.empty((m, n_combos, size), np.float64)
            score = np.empty(size, np.float64)
            best = np.full(size, -1.0)
            arg = np.zeros(size, np.int64)
            finite = np.ones(size, np.bool_)
            for k in range(size):
                r0 = ((lo + k) // per_band) * m
                c0 = ((lo + k) % per_band) * m
                for i in range(m):
                    for j in range(m):
                        v = abs(np.float64(w[r0 + i, c0 + j]))
                        finite[k] &= v <= _LARGEST      # False for Inf and for NaN
                        a[i * m + j, k] = v
            for i in range(m):
                for c in range(n_combos):
                    row_sum[i, c, :] = a[i * m + combos[c, 0], :]
                    for e in range(1, n):
                        row_sum[i, c, :] += a[i * m + combos[c, e], :]
            for p in range(rows_of.shape[0]):
                score[:] = row_sum[0, rows_of[p, 0], :]
                for i in range(1, m):
                    score += row_sum[i, rows_of[p, i], :]
                for k in range(size):
                    better = score[k] > best[k]       # strictly: the first best pattern, as the product's max(0)
                    best[k] = score[k] if better else best[k]
                    arg[k] = p if better else arg[k]
            for k in range(size):
                r0 = ((lo + k) // per_band) * m
                c0 = ((lo + k) % per_band) * m
                if not finite[k]:
                    outcome[lo + k] = not_finite
                    continue
                for i in range(m):
                    for j in range(m):
                        keep[r0 + i, c0 + j] = bits[arg[k], i * m + j]


def _enumerate_range(w, n: int, m: int, keep, outcome, first: int, last: int) -> None:
    combos, rows_of, bits = row_choices(m, n)
    compiled.parallel_tiles(_enumerate_tiles, first, last, w, m, combos, rows_of, bits, compiled._NOT_FINITE,
                            keep, outcome)


def on_matrix(matrix: torch.Tensor, n: int, m: int) -> "compiled.MatrixJob | None":
    """The compiled enumeration of a CPU matrix (numba present, the pattern enumerable), else None (the
    tensor path then serves)."""
    if matrix.device.type != "cpu" or njit is None or not enumerable(m, n):
        return None
    return compiled.MatrixJob(matrix, n, m, solve=_enumerate_range)
