"""`nmtrain diversity`: rank sparsity pattern families by mask diversity (Hubara et al., 2021)."""

from __future__ import annotations

import json
import re
from typing import List, Optional

import typer
from rich.table import Table

from .console import console
from .errors import UsageError, user_errors


def _parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise UsageError(f"--shape {text!r} is not of the form RxC with positive sizes, e.g. 8x8")
    return int(match.group(1)), int(match.group(2))


@user_errors
def diversity(
    shape: str = typer.Option("8x8", help="Block of R x C weights (the paper uses 8x8); N:M groups run along C."),
    density: float = typer.Option(0.5, help="Share of weights kept, e.g. 0.5 for 2:4, 0.25 for 1:4."),
    pattern: Optional[List[str]] = typer.Option(None, "--pattern", "-p", help="Only these families: unstructured, 2:4, 2:4-T, ... (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {pattern, count (digits), log10, density, exact}."),
) -> None:
    """Count the masks each pattern family allows on a block (exact integers) and rank them, largest first."""
    from ..sparsity import rank
    from ..sparsity.diversity import EXACT_MAX_M

    rows, cols = _parse_shape(shape)
    if not 0.0 < density < 1.0:
        raise UsageError(f"--density {density} must be strictly between 0 and 1 (the share of weights kept)")
    results = rank(rows, cols, density, pattern or None)
    if as_json:
        print(json.dumps([{"pattern": d.family, "count": None if d.count is None else str(d.count),
                           "log10": d.log10, "density": d.density, "exact": d.exact} for d in results], indent=2))
        return
    top = results[0].log10
    table = Table(title=f"mask diversity of a {rows}x{cols} block, N kept of every M")
    for col, justify in (("rank", "right"), ("pattern", "left"), ("density", "right"), ("log10(MD)", "right"),
                         ("MD (exact count)", "right"), ("vs best", "right")):
        # a count of hundreds of digits folds over several lines of its cell: every digit is shown
        table.add_column(col, justify=justify, overflow="fold")
    for i, d in enumerate(results, 1):
        count = str(d.count) if d.exact else "≈ asymptotic, not exact"
        table.add_row(str(i), d.family, f"{d.density:.3f}", ("" if d.exact else "≈") + f"{d.log10:.3f}", count,
                      f"10^{d.log10 - top:.2f}" if i > 1 else "1")
    console.print(table)
    if not all(d.exact for d in results):
        console.print(f"≈: A(M, N) is counted exactly up to M = {EXACT_MAX_M}; beyond that the value shown is the "
                      "asymptotic estimate e^(-1/2)·C(M,N)^(2M)/C(M²,MN), an approximation.")
