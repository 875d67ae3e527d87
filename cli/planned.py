"""Commands whose implementation lands with later issues. They show their planned options under
``--help`` and refuse to run, so nothing pretends to work."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .errors import fail


def _planned(command: str, issue: int) -> typer.Exit:
    return fail(f"`nmtrain {command}` is planned (issue #{issue}) and not implemented yet; "
                "available now: prune, diversity, train")


def adaprune(
    source: Path = typer.Argument(..., help="A run directory of `nmtrain train`, or a state_dict with --spec."),
    pattern: str = typer.Option(..., help="N:M pattern (N kept of every M)."),
    transposable: bool = typer.Option(False, help="Transposable N:M."),
    calib_samples: int = typer.Option(1000, help="Calibration samples."),
    iters: int = typer.Option(1000, help="Optimisation steps per layer."),
    spec: Optional[Path] = typer.Option(None, help="Spec giving model and data for a bare state_dict."),
    out: Optional[Path] = typer.Option(None, help="Output run directory."),
) -> None:
    """(planned) Convert a dense or unstructured-sparse model to N:M with layer-wise reconstruction."""
    raise _planned("adaprune", 5)


def convert(
    source: Path = typer.Argument(..., help="A run directory or a state_dict."),
    to: str = typer.Option(..., help="compressed, dense or semi-structured."),
    out: Optional[Path] = typer.Option(None, help="Output file."),
) -> None:
    """(planned) Convert between masked-dense, compressed N:M (safetensors) and semi-structured formats."""
    raise _planned("convert", 5)
