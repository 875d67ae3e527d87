"""`nmtrain diversity`: rank sparsity pattern families by mask diversity (Hubara et al., 2021)."""

from __future__ import annotations

import json
import math
import re
from typing import List, Optional

import typer
from rich.table import Table

from .console import console
from .errors import UsageError, user_errors


# ASCII digits only (re's \d also takes '８' and '٨', which int() would read as 8).
_SHAPE_RE = re.compile(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", re.ASCII)


def _parse_shape(text: str) -> tuple[int, int]:
    from ..sparsity.diversity import MAX_BLOCK_WEIGHTS, check_block
    from ..sparsity.errors import clip

    match = _SHAPE_RE.fullmatch(text)
    sides = [side.lstrip("0") for side in match.groups()] if match else []
    if not sides or not all(sides):
        raise UsageError(f"--shape {clip(text)!r} is not of the form RxC with positive ASCII sizes, e.g. 8x8")
    # A side with more digits than the limit is over it: it is never read, so int() never sees 5000 digits.
    width = len(str(MAX_BLOCK_WEIGHTS))
    rows, cols = (int(side) if len(side) <= width else MAX_BLOCK_WEIGHTS + 1 for side in sides)
    check_block(rows, cols, shown_as=clip(text.strip()))
    return rows, cols


def _flagged(exc: Exception) -> Exception:
    """The engine's error with the option at fault in front, e.g. ``--shape: at most 2**20 weights ...``."""
    from ..sparsity import PatternError

    field = "pattern" if isinstance(exc, PatternError) else getattr(exc, "field", "")
    return UsageError(f"--{field}: {exc}") if field else exc


@user_errors
def diversity(
    shape: str = typer.Option("8x8", help="Block of R x C weights (the paper uses 8x8); N:M groups run along C."),
    density: float = typer.Option(0.5, help="Share of weights kept, e.g. 0.5 for 2:4, 0.25 for 1:4."),
    pattern: Optional[List[str]] = typer.Option(None, "--pattern", "-p", help="Only these families: unstructured, 2:4, 2:4-T, ... (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {pattern, count (digits; null when "
                                 "approximated or over 4300 digits), log10, density, exact}."),
) -> None:
    """Count the masks each pattern family allows on a block (exact integers) and rank them, largest first.

    Blocks of up to 2**20 weights; counts of more than 4300 digits are given by their log10 only."""
    from ..sparsity import PatternError, rank
    from ..sparsity.diversity import DiversityError

    try:
        rows, cols = _parse_shape(shape)
        results = rank(rows, cols, density, pattern or None)
    except (DiversityError, PatternError) as exc:
        raise _flagged(exc) from None
    if as_json:
        print(json.dumps([{"pattern": d.family, "count": None if d.count is None else str(d.count),
                           "log10": d.log10, "density": d.density, "exact": d.exact} for d in results], indent=2))
        return
    _table(rows, cols, results)


def _table(rows: int, cols: int, results: list) -> None:
    from ..sparsity.diversity import EXACT_MAX_M, MAX_COUNT_DIGITS

    top = results[0].log10
    table = Table(title=f"mask diversity of a {rows}x{cols} block, N kept of every M")
    for col, justify in (("rank", "right"), ("pattern", "left"), ("density", "right"), ("log10(MD)", "right"),
                         ("MD (exact count)", "right"), ("vs best", "right")):
        # a count of hundreds of digits folds over several lines of its cell: every digit is shown
        table.add_column(col, justify=justify, overflow="fold")
    for i, d in enumerate(results, 1):
        if not d.exact:
            count = "≈ asymptotic, not exact"
        elif d.count is None:
            count = f"{math.floor(d.log10) + 1:,} digits, not shown"
        else:
            count = str(d.count)
        table.add_row(str(i), d.family, f"{d.density:.3f}", ("" if d.exact else "≈") + f"{d.log10:.3f}", count,
                      f"10^{d.log10 - top:.2f}" if i > 1 else "1")
    console.print(table)
    if any(d.exact and d.count is None for d in results):
        console.print(f"counts of more than {MAX_COUNT_DIGITS} digits are not computed; their log10 is shown.")
    if not all(d.exact for d in results):
        console.print(f"≈: A(M, N) is counted exactly up to M = {EXACT_MAX_M}; beyond that the value shown is the "
                      "asymptotic estimate e^(-1/2)·C(M,N)^(2M)/C(M²,MN), an approximation.")
