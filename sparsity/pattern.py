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

from .errors import SparsityError, clip, shown


class PatternError(SparsityError):
    """A pattern string or (N, M) pair that nmtrain cannot use; the message names the constraint."""


# The largest group: a row of mask diversity's largest block (1024 x 1024 weights), and far wider than
# any layer's row. Its digits also bound the digits of N and M in a pattern string, so that int()
# never reads a 5000-digit number (CPython raises its own ValueError past 4300 digits).
MAX_M = 1 << 20
MAX_M_DIGITS = len(str(MAX_M))

# (constraint, check(n, m), message). Checked in order; the first failure is reported.
_PATTERN_CONSTRAINTS = (
    ("N >= 1", lambda n, m: n >= 1, "N (weights kept per group) must be at least 1, got {n}:{m}"),
    ("M >= 2", lambda n, m: m >= 2, "M (group size) must be at least 2, got {n}:{m}"),
    ("N < M", lambda n, m: n < m,
     "N (weights kept) must be smaller than M (group size), got {n}:{m}; "
     "nmtrain counts kept weights, so 2:4 keeps half"),
    ("M <= 2**20", lambda n, m: m <= MAX_M, f"M (group size) must be at most 2**20 = {MAX_M}, got {{n}}:{{m}}"),
)

# ASCII digits and spaces only: re's \d would take '２:４' (fullwidth) or Arabic-Indic digits, and \s the
# ideographic space, which int() then reads as numbers nobody typed on purpose.
_PATTERN_RE = re.compile(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*(-[tT])?\s*", re.ASCII)


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
            raise PatternError(message.format(n=shown(n), m=shown(m)))


def parse_pattern(text: str, transposable: bool = False) -> Pattern:
    """Parse ``"N:M"`` or ``"N:M-T"``. ``transposable=True`` forces the transposable variant."""
    match = _PATTERN_RE.fullmatch(str(text))
    if match is None:
        raise PatternError(f"pattern {clip(text)!r} is not of the form N:M or N:M-T with ASCII digits "
                           "(e.g. 2:4, 4:8-T)")
    n, m = (digits.lstrip("0") or "0" for digits in match.group(1, 2))   # 5000 leading zeros are no digits
    if max(len(n), len(m)) > MAX_M_DIGITS:
        raise PatternError(f"pattern {clip(text)!r}: N and M have at most {MAX_M_DIGITS} digits "
                           f"(M is at most 2**20 = {MAX_M})")
    return Pattern(int(n), int(m), transposable or match.group(3) is not None)


def as_pattern(pattern: "Pattern | str", field: str = "pattern") -> Pattern:
    """``pattern`` as a `Pattern`: one already, or a string ``parse_pattern`` reads ("2:4", "4:8-T")."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        return parse_pattern(pattern)
    raise PatternError(f"{field}: expected a Pattern or a string like '2:4', got {type(pattern).__name__}")
