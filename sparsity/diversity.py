"""Mask diversity (Hubara et al., 2021): how many distinct masks a sparsity structure allows.

For a block of R x C weights kept at density D (the paper tabulates an 8x8 block, T = 64):

- unstructured: ``C(T, D*T)``: any D*T of the T weights;
- N:M row-wise: ``C(M, N) ** (T/M)``: every group of M consecutive weights of a row keeps N;
- N:M transposable: ``A(M, N) ** (T/M**2)``: every M x M tile keeps N per row and per column, where
  ``A(M, N)`` counts M x M 0/1 matrices with exactly N ones in every row and column. It has no simple
  closed form; :func:`transposable_count` counts it exactly by dynamic programming over rows, with
  the multiset of column sums so far as the state. Beyond M = EXACT_MAX_M that count takes too long
  and the asymptotic estimate e^(-1/2) C(M,N)^(2M) / C(M^2, MN) is shown instead, labelled as such.

Counts are exact Python integers up to MAX_COUNT_DIGITS digits; ``log10`` is given beside them, and
alone (from log-gamma) for a count longer than that. The paper argues accuracy correlates with mask
diversity; ``nmtrain diversity`` ranks by it.

Every public function checks its arguments against the limits below before it counts anything, so
a huge block or group is refused at once, with the limit in the message, instead of running for hours.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction

from .errors import SparsityError, shown
from .pattern import Pattern, as_pattern, parse_pattern


# -- limits: each bounds the work of one call (times measured on one core of a shared 2-core machine) --
# A whole 1024 x 1024 layer. Listing the families walks the multiples of D's denominator up to C (2**19
# steps for 1x1048576 at 0.5: 0.02 s), and a count past MAX_COUNT_DIGITS is a log-gamma formula, so
# what remains is A(M, N) for M <= EXACT_MAX_M: the slowest listing, 840x840 at 0.5 (every even M up
# to 14, as N:M and N:M-T), takes 0.7-1.3 s.
MAX_BLOCK_WEIGHTS = 1 << 20
# CPython's own limit on turning an int into a string (sys.int_info.default_max_str_digits: the
# conversion is quadratic); a count longer than that is given by its log10 only, never computed.
MAX_COUNT_DIGITS = 4300
# Exact A(M, N) by the dynamic programme below; its worst case, N = M/2, takes 0.3-0.6 s at M = 13,
# 0.65-1.4 s at 14 (a quiet / a loaded machine), 1.6 s at 15 and 8.5 s at 16 (20:10 takes minutes); every
# N of every M up to 14 together (cached), 1.6-2.3 s. Above this M the labelled asymptotic estimate is shown.
EXACT_MAX_M = 14


class DiversityError(SparsityError):
    """A block, density or family that cannot be counted; the message names the constraint, and
    ``field`` the argument at fault ("shape", "density" or "pattern") for a caller to name its option."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def check_block(rows: int, cols: int, shown_as: str | None = None) -> None:
    """The block is R x C positive integers with R*C <= MAX_BLOCK_WEIGHTS; ``shown_as`` is the block as
    the caller's user wrote it (e.g. the CLI's --shape text), for the message."""
    got = shown_as if shown_as is not None else f"{shown(rows)}x{shown(cols)}"
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in (rows, cols)):
        raise DiversityError(f"R and C must be positive integers, got {got}", "shape")
    if rows * cols > MAX_BLOCK_WEIGHTS:
        raise DiversityError(f"at most 2**20 weights in a block (R x C ≤ {MAX_BLOCK_WEIGHTS}), got {got}", "shape")


def check_density(density: float | Fraction) -> Fraction:
    """``density`` strictly between 0 and 1 (NaN is not), as the fraction the counts use: its
    denominator is at most MAX_BLOCK_WEIGHTS, as no block has more weights to keep a share of."""
    try:
        value = float(density)
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise DiversityError(f"{density} must be strictly between 0 and 1 (the share of weights kept)", "density")
    share = Fraction(density).limit_denominator(MAX_BLOCK_WEIGHTS)
    if not 0 < share < 1:       # 1e-300 is above 0, but no block keeps that share of its weights
        raise DiversityError(f"{density} keeps no weight (or all) of a block of at most {MAX_BLOCK_WEIGHTS} "
                             f"weights; give a share from 1/{MAX_BLOCK_WEIGHTS} to 1 - 1/{MAX_BLOCK_WEIGHTS}",
                             "density")
    return share


@functools.lru_cache(maxsize=None)
def transposable_count(m: int, n: int) -> int:
    """A(M, N): the number of M x M 0/1 matrices with exactly N ones in every row and every column,
    for M up to EXACT_MAX_M. A(M, N) = A(M, M - N) (swap ones and zeros), and the smaller N is the
    faster count: every N of every M up to 14 then takes about half as long."""
    if not 0 <= n <= m:
        return 0
    if m > EXACT_MAX_M:
        raise DiversityError(f"A({m}, {n}) is counted exactly only up to M = {EXACT_MAX_M} (M = 16 takes "
                             "seconds, 20 minutes); use transposable_log10_approx", "pattern")
    return _transposable_dp(m, min(n, m - n))


def _transposable_dp(m: int, n: int) -> int:
    """A(M, N) by dynamic programming over the rows.

    Rows are added one at a time. Columns are interchangeable, so the state is only how many columns
    currently hold 0, 1, ..., N ones, with the number of ways to reach it. A row places its N ones
    class by class (from the fullest class down, so a column moved up is not moved again), choosing
    k columns of a class with c members in C(c, k) ways. States in which some column can no longer
    reach N with the rows left are dropped.
    """
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
    The binomials are taken in log-gamma: C(M², MN) of a 1024 x 1024 tile has 315,000 digits.
    """
    return 2 * m * _log10_comb(m, n) - _log10_comb(m * m, m * n) - 0.5 / math.log(10)


@dataclass(frozen=True)
class Diversity:
    family: str          # "unstructured", "2:4", "2:4-T", ...
    density: float
    count: int | None    # the exact number of masks; None when approximated or over MAX_COUNT_DIGITS digits
    log10: float
    exact: bool = True   # False: log10 is the asymptotic estimate of A(M, N), not of a count

    @classmethod
    def of(cls, family: str, density: float, count: int) -> "Diversity":
        return cls(family, density, count, _log10(count))


def _log10(x: int) -> float:
    # math.log10 accepts arbitrarily large ints; keep full precision for huge ones too
    return math.log10(x) if x > 0 else float("-inf")


def _log10_comb(n: int, k: int) -> float:
    """log10 C(n, k) from log-gamma: constant time for any n, to about 1e-12 of the value."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(10)


def _counted(family: str, density: float, log10: float, count) -> Diversity:
    """The exact ``count()`` when it has fewer than MAX_COUNT_DIGITS digits, else ``log10`` alone."""
    if log10 < MAX_COUNT_DIGITS - 1:
        return Diversity.of(family, density, count())
    return Diversity(family, density, None, log10)


def unstructured_diversity(rows: int, cols: int, density: float | Fraction) -> Diversity:
    """Mask diversity of unstructured sparsity at ``density`` on an R x C block: C(R·C, density·R·C)."""
    check_block(rows, cols)
    total = rows * cols
    kept = check_density(density) * total
    if kept.denominator != 1:
        raise DiversityError(f"{float(density):g} x {total} weights is not a whole number of kept weights", "density")
    k = int(kept)
    return _counted("unstructured", float(density), _log10_comb(total, k), lambda: math.comb(total, k))


def pattern_diversity(rows: int, cols: int, pattern: Pattern) -> Diversity:
    """Mask diversity of ``pattern`` (a Pattern or "2:4-T") on an R x C block (groups of M along each row of C)."""
    pattern = as_pattern(pattern)
    check_block(rows, cols)
    n, m = pattern.n, pattern.m
    if cols % m:
        raise DiversityError(f"{pattern}: C={cols} is not a multiple of M={m}", "pattern")
    if pattern.transposable:
        if rows % m:
            raise DiversityError(f"{pattern}: R={rows} is not a multiple of M={m} (transposable needs M x M tiles)",
                                 "pattern")
        tiles = rows * cols // (m * m)
        if m > EXACT_MAX_M:
            return Diversity(str(pattern), pattern.density, None, tiles * transposable_log10_approx(m, n), exact=False)
        tile = transposable_count(m, n)
        return _counted(str(pattern), pattern.density, tiles * _log10(tile), lambda: tile ** tiles)
    groups = rows * cols // m
    return _counted(str(pattern), pattern.density, groups * _log10_comb(m, n), lambda: math.comb(m, n) ** groups)


def families(rows: int, cols: int, density: float) -> list[Pattern]:
    """Every N:M and N:M-T pattern of the given density that fits an R x C block."""
    check_block(rows, cols)
    target = check_density(density)
    found = []
    # N = D·M is whole only when M is a multiple of D's denominator: a walk of at most C/2 steps.
    for m in range(target.denominator, cols + 1, target.denominator):
        if cols % m:
            continue
        n = int(target * m)
        found.append(Pattern(n, m))
        if rows % m == 0:
            found.append(Pattern(n, m, transposable=True))
    return found


def rank(rows: int, cols: int, density: float, patterns: list[str | Pattern] | None = None) -> list[Diversity]:
    """Mask diversity of unstructured and every fitting N:M(-T) family (or just ``patterns``), largest first.

    ``patterns`` entries are ``Pattern`` objects or strings: ``"unstructured"``, ``"2:4"``, ``"2:4-T"``.
    """
    check_block(rows, cols)
    check_density(density)
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
