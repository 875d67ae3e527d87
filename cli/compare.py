"""`nmtrain compare`: run methods x patterns from one spec and tabulate them side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .console import console
from .errors import user_errors
from .train import resolve_spec


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


@user_errors
def compare(
    args: Optional[List[str]] = typer.Argument(None, metavar="[SPEC.yaml] [KEY.SUB=VALUE]...",
                                               help="A YAML spec (default: the quick Fashion-MNIST spec), then dotted overrides."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods, e.g. dense,srste,transposable,bimask,bame (default: the spec's sweep.methods)."),
    patterns: Optional[str] = typer.Option(None, help="Comma-separated N:M patterns (N kept of M), e.g. 2:4,1:4 (default: sweep.patterns)."),
    out: Optional[Path] = typer.Option(None, help="Directory for the grid's runs and compare.csv/json/png (default: the spec's out)."),
    overwrite: bool = typer.Option(False, help="Replace runs already in the output directory."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train every method at every pattern; write one table as rich output, CSV, JSON and a PNG of accuracy vs FLOPs."""
    from ..experiments.compare import grid, run_grid, write_results

    spec = resolve_spec(args or [], None, None, out)
    cells = grid(spec, _split(methods) or spec.sweep.methods, _split(patterns) or spec.sweep.patterns)
    console.print(f"comparing {len(cells)} runs: " + ", ".join(f"{c.method.name} {c.sparsity.pattern}" for c in cells))
    rows = run_grid(cells, overwrite=overwrite, console=console, progress=progress)
    title = f"{spec.name}: {spec.model.name} on {spec.data.dataset}, {spec.train.epochs} epochs, seed {spec.seed}"
    paths = write_results(rows, Path(spec.out), title)
    table = Table(title=f"nmtrain compare · {title}")
    show_accel = any(r["accel"] != "none" for r in rows)       # the column only where a cell used the kernels
    cols = ("method", "pattern", "density", "final acc", "best acc", "train FLOPs vs dense", "wall", "mask change")
    for col in cols + (("accel",) if show_accel else ()):
        table.add_column(col, justify="left" if col in ("method", "pattern", "accel") else "right")
    for r in rows:
        mcr = r["mask_change_rate"]
        table.add_row(r["method"], r["pattern"], f"{r['density']:.3f}", f"{r['final_accuracy']:.2f}%",
                      f"{r['best_accuracy']:.2f}%", f"{r['flops_ratio']:.3f}", f"{r['wall_seconds']:.1f} s",
                      "–" if mcr is None else f"{mcr:.4f}", *((r["accel"],) if show_accel else ()))
    console.print(table)
    console.print(f"wrote {paths['csv']}, {paths['json']} and {paths['png']}")
