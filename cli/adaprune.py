"""`nmtrain adaprune`: a trained (dense or unstructured-sparse) model to N:M by layer-wise reconstruction."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import console
from .errors import user_errors


@user_errors
def adaprune(
    source: Path = typer.Argument(..., help="A run directory of `nmtrain train`, or a state_dict with --spec."),
    pattern: str = typer.Option(..., "--pattern", "-p", help="N:M pattern, N kept of every M (2:4 = density 0.50); N:M-T for transposable."),
    transposable: bool = typer.Option(False, "--transposable", "-T", help="Transposable N:M (mask also N:M along C_out; exact solver)."),
    calib_samples: int = typer.Option(1000, help="Calibration samples, drawn (seeded) from the train split."),
    iters: int = typer.Option(1000, help="Adam steps per layer."),
    batch: int = typer.Option(50, help="Calibration samples per Adam step."),
    sequential: bool = typer.Option(False, "--sequential", help="Take each layer's inputs from the already-pruned network "
                                    "(default: parallel, inputs cached from the unpruned model, layers independent)."),
    add_back: bool = typer.Option(True, help="Start from the kept weights rescaled to carry each group's pruned |w|; "
                                  "--no-add-back starts from plain projection."),
    spec: Optional[Path] = typer.Option(None, help="Spec giving model and data for a bare state_dict (default: SOURCE/config.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Output run directory (default: beside SOURCE, named SOURCE-adaprune-2of4; -4of8T for 4:8-T)."),
    overwrite: bool = typer.Option(False, help="Replace a run already in the output directory."),
    progress: bool = typer.Option(True, help="Show a progress bar per layer."),
) -> None:
    """Convert a dense or unstructured-sparse model to N:M (or N:M-T) with AdaPrune.

    Per sparse layer: magnitude mask, pruned magnitude added back onto the kept weights of each group,
    then Adam (lr 1e-3 weights, 1e-2 bias) makes the layer's output on calibration data match the
    original layer's, with the mask re-applied after every step. Default mode is parallel: every layer
    is fitted to inputs cached from the unpruned model, independently of the others (the reference
    code's choice: errors do not compound through the fit, and the order of layers does not matter).
    --sequential feeds each layer the already-pruned network's activations so it also corrects upstream
    error. BatchNorm statistics are re-estimated on the calibration set. Writes model.pt, config.yaml
    (the source's spec) and summary.json (accuracies of original, magnitude projection and AdaPrune).

    The method, with the add-back rule: docs/methods.md#adaprune.
    """
    from ..experiments.adaprune import AdaPruneSettings, adaprune as run_adaprune
    from ..experiments.tasks import get_task
    from ..sparsity import parse_pattern

    pat = parse_pattern(pattern, transposable=transposable)
    settings = AdaPruneSettings(pattern=pat, calib_samples=calib_samples, iters=iters, batch=batch,
                                sequential=sequential, add_back=add_back)
    result = run_adaprune(source, settings, spec_path=spec, out=out, overwrite=overwrite, console=console,
                          progress=progress)
    s = result.summary

    table = Table(title=f"nmtrain adaprune → {result.out}  ({pat.describe()}, {s['mode']}, "
                        f"{s['calib_samples']} calibration samples, {s['iters']} steps)")
    table.add_column("layer", overflow="fold", min_width=16)
    for col in ("shape", "pattern", "density", "rel. error magnitude", "rel. error AdaPrune", "time"):
        table.add_column(col, justify="left" if col in ("shape", "pattern") else "right", no_wrap=True)
    for r in result.layers:
        table.add_row(r.name, "×".join(map(str, r.shape)), str(pat), f"{pat.density:.2f}",
                      f"{r.error_magnitude:.4g}", f"{r.error_adaprune:.4g}", f"{r.seconds:.1f} s")
    console.print(table)

    task = get_task(s.get("task", "classification"))
    acc = Table(title="test accuracy" if task.primary == "accuracy" else f"validation {task.primary}")
    for col in ("original", "magnitude", "AdaPrune", "recovered", "BN re-estimated", "wall"):
        acc.add_column(col, justify="right")
    rec = s["recovered"]
    acc.add_row(*(task.format(s[f"{task.primary}_{stage}"]) for stage in ("original", "magnitude", "adaprune")),
                "–" if rec is None else f"{100 * rec:.0f}%", "yes" if s["batchnorm_recalibrated"] else "no BN",
                f"{s['wall_seconds']:.1f} s")
    console.print(acc)
    console.print(f"run directory: {result.out}")
