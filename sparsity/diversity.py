"""Mask diversity (Hubara et al., 2021): how many distinct masks a sparsity structure allows.

For a block of R x C weights kept at density D (the paper tabulates an 8x8 block, T = 64):

- unstructured: ``C(T, D*T)``: any D*T of the T weights;
- N:M row-wise: ``C(M, N) ** (T/M)``: every group of M consecutive weights of a row keeps N;
- N:M transposable: ``A(M, N) ** (T/M**2)``: every M x M tile keeps N per row and per column, where
  ``A(M, N)`` counts M x M 0/1 matrices with exactly N ones in every row and column. It has no simple
  closed form; :func:`transposable_count` counts it exactly by dynamic programming over rows, with
  the multiset of column sums so far as the state. Beyond M = 16 that count is out of reach and
  the asymptotic estimate e^(-1/2) C(M,N)^(2M) / C(M^2, MN) is shown instead, labelled as such.

All counts are exact Python integers; ``log10`` is given beside them since they get astronomically
large. The paper argues accuracy correlates with mask diversity; ``nmtrain diversity`` ranks by it.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

from .errors import SparsityError
from .pattern import Pattern


# Exact counting of A(M, N) grows quickly with M (16:8 takes seconds, 20:10 minutes, 32:16 is out of
# reach); above this M nmtrain shows the labelled asymptotic approximation instead.
EXACT_MAX_M = 16


@functools.lru_cache(maxsize=None)
def transposable_count(m: int, n: int) -> int:
    """A(M, N): the number of M x M 0/1 matrices with exactly N ones in every row and every column.

    Rows are added one at a time. Columns are interchangeable, so the state is only how many columns
    currently hold 0, 1, ..., N ones, with the number of ways to reach it. A row places its N ones
    class by class (from the fullest class down, so a column moved up is not moved again), choosing
    k columns of a class with c members in C(c, k) ways. States in which some column can no longer
    reach N with the rows left are dropped.
    """
    if not 0 <= n <= m:
        return 0
    if n in (0, m):
        return 1
    states: dict[tuple[int, ...], int] = {tuple([m] + [0] * n): 1}
    for row in range(m):
        rows_left = m - row - 1
        layer = {(vec, n): ways for vec, ways in states.items()}  # (column classes, ones left to place)
        for s in range(n - 1, -1, -1):
            nxt: dict[tuple[tuple[int, ...], int], int] = defaultdict(int)
            for (vec, left), ways in layer.items():
                have = vec[s]
                for k in range(left if s == 0 else 0, min(left, have) + 1):
                    new = vec
                    if k:
                        new = vec[:s] + (have - k, vec[s + 1] + k) + vec[s + 2:]
                    if new[s] and s < n - rows_left:  # these columns cannot reach n any more
                        continue
                    nxt[(new, left - k)] += ways * math.comb(have, k)
            layer = nxt
        states = {vec: ways for (vec, left), ways in layer.items() if left == 0}
    return states.get(tuple([0] * n + [m]), 0)


def transposable_log10_approx(m: int, n: int) -> float:
    """log10 of the asymptotic estimate A(M, N) ~ e^(-1/2) C(M, N)^(2M) / C(M^2, MN).

    An approximation (Canfield & McKay's dense regime), not a count: within 3% of the exact value at
    M = 16 and tending to it as M grows. Shown only, and labelled, where the exact count is out of reach.
    """
    return (2 * m * _log10(math.comb(m, n)) - _log10(math.comb(m * m, m * n)) - 0.5 / math.log(10))


@dataclass(frozen=True)
class Diversity:
    family: str          # "unstructured", "2:4", "2:4-T", ...
    density: float
    count: int | None    # the exact number of masks; None where only an approximation is known
    log10: float
    exact: bool = True

    @classmethod
    def of(cls, family: str, density: float, count: int) -> "Diversity":
        return cls(family, density, count, _log10(count))


def _log10(x: int) -> float:
    # math.log10 accepts arbitrarily large ints; keep full precision for huge ones too
    return math.log10(x) if x > 0 else float("-inf")


class DiversityError(SparsityError):
    """A family that does not fit the block shape or density; the message names the constraint."""


def unstructured_diversity(rows: int, cols: int, density: float | Fraction) -> Diversity:
    total = rows * cols
    kept = Fraction(density).limit_denominator(1 << 20) * total
    if kept.denominator != 1:
        raise DiversityError(f"density {float(density):g} x {total} weights is not a whole number of kept weights")
    return Diversity.of("unstructured", float(density), math.comb(total, int(kept)))


def pattern_diversity(rows: int, cols: int, pattern: Pattern) -> Diversity:
    """Mask diversity of ``pattern`` on an R x C block (groups of M along each row of C)."""
    n, m = pattern.n, pattern.m
    if cols % m:
        raise DiversityError(f"{pattern}: C={cols} is not a multiple of M={m}")
    if pattern.transposable:
        if rows % m:
            raise DiversityError(f"{pattern}: R={rows} is not a multiple of M={m} (transposable needs M x M tiles)")
        tiles = rows * cols // (m * m)
        if m > EXACT_MAX_M:
            return Diversity(str(pattern), pattern.density, None, tiles * transposable_log10_approx(m, n), exact=False)
        return Diversity.of(str(pattern), pattern.density, transposable_count(m, n) ** tiles)
    return Diversity.of(str(pattern), pattern.density, math.comb(m, n) ** (rows * cols // m))


def families(rows: int, cols: int, density: float) -> list[Pattern]:
    """Every N:M and N:M-T pattern of the given density that fits an R x C block."""
    target = Fraction(density).limit_denominator(1 << 20)
    found = []
    for m in range(2, cols + 1):
        n = target * m
        if cols % m or n.denominator != 1 or not 1 <= n < m:
            continue
        found.append(Pattern(int(n), m))
        if rows % m == 0:
            found.append(Pattern(int(n), m, transposable=True))
    return found


def rank(rows: int, cols: int, density: float, patterns: list[str | Pattern] | None = None) -> list[Diversity]:
    """Mask diversity of unstructured and every fitting N:M(-T) family (or just ``patterns``), largest first.

    ``patterns`` entries are ``Pattern`` objects or strings: ``"unstructured"``, ``"2:4"``, ``"2:4-T"``.
    """
    from .pattern import parse_pattern

    results: list[Diversity] = []
    if patterns is None:
        results.append(unstructured_diversity(rows, cols, density))
        results += [pattern_diversity(rows, cols, p) for p in families(rows, cols, density)]
    else:
        for p in patterns:
            if isinstance(p, str) and p.strip().lower() == "unstructured":
                results.append(unstructured_diversity(rows, cols, density))
            else:
                results.append(pattern_diversity(rows, cols, p if isinstance(p, Pattern) else parse_pattern(p)))
    return sorted(results, key=lambda d: (-d.log10, d.family))
