"""`nmtrain prune`: prune a state_dict (or a run directory's model) to N:M or N:M-T by magnitude."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .choices import SOLVERS
from .console import console
from .errors import UsageError, user_errors

# Show a progress bar when the work is large enough to make a user wait.
_PROGRESS_MIN_ELEMENTS = 1 << 22
# A solver warm-up this long is numba compiling the kernels (first use after an install, about 10 s);
# loading them from numba's disk cache takes about a second even on a busy machine.
_COMPILING_AFTER_S = 2.0


def _check_choice(option: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise UsageError(f"{option} {value!r} is unknown; use one of: {', '.join(choices)}")


def _warm_up(state: dict, selected: list[str], pat, solver: str) -> float:
    """Do the solver's one-time work before any layer is timed, and say so while it compiles; returns its seconds."""
    from ..sparsity.solvers import warm_up

    note = threading.Timer(_COMPILING_AFTER_S, lambda: print(
        "compiling the mask solvers (first use; cached for later runs) ...", file=sys.stderr, flush=True))
    note.start()
    try:
        return sum(warm_up(solver, pat.n, pat.m, dtype, device)
                   for dtype, device in {(state[name].dtype, state[name].device) for name in selected})
    finally:
        note.cancel()


def _print_tables(title: str, reports: list, skipped: dict[str, str]) -> None:
    table = Table(title=title)
    table.add_column("layer", overflow="fold", min_width=16)
    for col, justify in (("shape", "left"), ("pattern", "left"), ("density", "right"), ("|W| kept", "right"),
                         ("unstr. kept", "right"), ("valid", "center"), ("time", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in reports:
        table.add_row(r.name, "×".join(map(str, r.shape)), r.pattern, f"{r.density:.2f}", f"{r.kept_share:.4f}",
                      f"{r.unstructured_share:.4f}", "✓" if r.valid else "[red]✗", f"{r.seconds * 1000:.1f} ms")
    console.print(table)
    if skipped:
        skipped_table = Table(title="skipped (left dense)")
        skipped_table.add_column("tensor")
        skipped_table.add_column("reason")
        for name, reason in skipped.items():
            skipped_table.add_row(name, reason)
        console.print(skipped_table)


def _prune_with_progress(state: dict, pat, layout: str, solver: str, selection):
    """`prune_state_dict` of the layers in ``selection`` under a progress bar (per layer, and per tile for
    the transposable solvers) when the model is large or the solver slow."""
    from ..sparsity import prune_state_dict

    total_elements = sum(v.numel() for v in state.values())
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable=total_elements < _PROGRESS_MIN_ELEMENTS and solver != "flow")
    with progress:
        layers = progress.add_task("layers", total=None)
        tiles = progress.add_task("tiles", total=None, visible=False)

        def on_layer(name: str, i: int, total: int) -> None:
            progress.update(layers, description=name, completed=i, total=total)

        def on_tiles(done: int, total: int) -> None:
            progress.update(tiles, completed=done, total=total, visible=True)

        extra = {"chunk_tiles": 256 if solver == "flow" else 1 << 16, "on_progress": on_tiles} if pat.transposable else {}
        return prune_state_dict(state, pat, layout=layout, solver=solver, on_layer=on_layer, selection=selection,
                                **extra)


@user_errors
def prune(
    input: Path = typer.Argument(..., help="A state_dict file (.pt) or a run directory of `nmtrain train`."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the pruned state_dict."),
    pattern: str = typer.Option(..., "--pattern", "-p", help="N:M with N kept of every M, e.g. 2:4, 1:4, 4:8; N:M-T for transposable."),
    transposable: bool = typer.Option(False, "--transposable", "-T", help="N:M along C_out too (backward-data GEMM sparse)."),
    solver: str = typer.Option("exact", help="Transposable solver: " + ", ".join(SOLVERS) + "."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Only weights whose name matches this glob (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Skip weights whose name matches this glob (repeatable)."),
    keep_first_dense: bool = typer.Option(True, "--keep-first/--prune-first", help="Keep the first weight dense, as training does."),
    keep_last_dense: bool = typer.Option(True, "--keep-last/--prune-last", help="Keep the last weight (classifier) dense, as training does."),
    layout: str = typer.Option("nhwc", help="Conv grouping: nhwc (M input channels at one tap, as hardware) or flatten (C_in*kh*kw)."),
    report: Optional[Path] = typer.Option(None, help="Also write the per-layer table as JSON here."),
) -> None:
    """Prune every eligible weight to N:M (or N:M-T) by magnitude; pruned entries become exact zeros.

    The weights are chosen by training's layer rule: the first and the last (the classifier) stay dense."""
    from ..experiments.io import check_output_file, save_state_dict, save_text
    from ..experiments.rundir import load_weights
    from ..sparsity import LAYOUTS, list_solvers, parse_pattern, select

    # The outputs are checked before any work: a device, FIFO or directory there is refused, not replaced.
    check_output_file(output, "--output")
    if report is not None:
        check_output_file(report, "--report")
        if Path(report).absolute() == Path(output).absolute():
            raise UsageError(f"--report: {report} is also --output; give the report its own file")
    pat = parse_pattern(pattern, transposable=transposable)
    _check_choice("--solver", solver, [s.name for s in list_solvers()])
    _check_choice("--layout", layout, list(LAYOUTS))
    state = load_weights(input)
    # The layer rule first, once: bad input fails at once, not after the solvers compile.
    selection = select(state, pat, layout, include or (), exclude or (), keep_first_dense, keep_last_dense)
    warm_up_seconds = _warm_up(state, selection.selected, pat, solver) if pat.transposable else 0.0
    pruned, reports, skipped = _prune_with_progress(state, pat, layout, solver, selection)

    if not all(r.valid for r in reports):  # a solver bug must never reach a user's file
        bad = [r.name for r in reports if not r.valid]
        raise UsageError(f"internal check failed: masks of {', '.join(bad)} break {pat}; nothing written")
    save_state_dict(pruned, output, "--output")

    _print_tables(f"nmtrain prune → {output}  ({pat.describe()}, layout {layout}"
                  + (f", solver {solver})" if pat.transposable else ")"), reports, skipped)
    if warm_up_seconds >= _COMPILING_AFTER_S:
        console.print(f"the mask solvers compiled in {warm_up_seconds:.1f} s (first use; not in the layers' times)")
    console.print(f"pruned {len(reports)} weights, skipped {len(skipped)}; wrote {output}")
    if report is not None:
        rows = [dict(vars(r), shape=list(r.shape)) for r in reports]
        save_text(json.dumps({"pattern": str(pat), "density": pat.density, "layout": layout, "solver": solver,
                              "layers": rows, "skipped": skipped}, indent=2), report, "--report")
