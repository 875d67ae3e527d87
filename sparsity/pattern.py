"""N:M patterns: parsing, validation and how they are printed.

In nmtrain **N is always the number of weights kept** in every group of M consecutive weights, so
the density is N/M. Other tools count zeros instead (Hubara et al.'s abstract, SparseGPT,
`torch.ao.pruning`), which is why every place that prints a pattern prints its density beside it.

Validation is table-driven (after `torch/sparse/semi_structured.py`): each constraint is one row,
and the error names the row that failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SparsityError


class PatternError(SparsityError):
    """A pattern string or (N, M) pair that nmtrain cannot use; the message names the constraint."""


# (constraint, check(n, m), message). Checked in order; the first failure is reported.
_PATTERN_CONSTRAINTS = (
    ("N >= 1", lambda n, m: n >= 1, "N (weights kept per group) must be at least 1, got {n}:{m}"),
    ("M >= 2", lambda n, m: m >= 2, "M (group size) must be at least 2, got {n}:{m}"),
    ("N < M", lambda n, m: n < m,
     "N (weights kept) must be smaller than M (group size), got {n}:{m}; "
     "nmtrain counts kept weights, so 2:4 keeps half"),
)

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(-[tT])?\s*$")


@dataclass(frozen=True)
class Pattern:
    """Keep `n` of every `m` consecutive weights; `transposable` adds the same rule along columns."""

    n: int
    m: int
    transposable: bool = False

    def __post_init__(self) -> None:
        validate_nm(self.n, self.m)

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" + ("-T" if self.transposable else "")

    @property
    def slug(self) -> str:
        """The pattern in file and directory names, e.g. ``2of4``, ``4of8T`` (no ':' in a path)."""
        return f"{self.n}of{self.m}" + ("T" if self.transposable else "")

    def describe(self) -> str:
        """The pattern with its density, e.g. ``2:4-T (density 0.50)``."""
        return f"{self} (density {self.density:.2f})"


def validate_nm(n: int, m: int) -> None:
    for _name, check, message in _PATTERN_CONSTRAINTS:
        if not check(n, m):
            raise PatternError(message.format(n=n, m=m))


def parse_pattern(text: str, transposable: bool = False) -> Pattern:
    """Parse ``"N:M"`` or ``"N:M-T"``. ``transposable=True`` forces the transposable variant."""
    match = _PATTERN_RE.match(str(text))
    if match is None:
        raise PatternError(f"pattern {text!r} is not of the form N:M or N:M-T (e.g. 2:4, 4:8-T)")
    n, m = int(match.group(1)), int(match.group(2))
    return Pattern(n, m, transposable or match.group(3) is not None)
