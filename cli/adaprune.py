"""`nmtrain adaprune`: a trained (dense or unstructured-sparse) model to N:M by a one-shot method (AdaPrune by default)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .choices import ONESHOT_METHODS, SOLVERS
from .console import console
from .errors import user_errors

_FIT = "in AdaPrune's fit (--method adaprune, --finetune)"


# The options that belong to one method or another (each its params' field of that name; refused with
# one line by a method that has no such field).
METHOD_OPTIONS = ("iters", "batch", "lr_weight", "lr_bias", "sequential", "add_back", "blocksize", "percdamp",
                  "learn_steps", "learn_lr", "prior", "prior_strength")


@user_errors
def adaprune(
    source: Path = typer.Argument(..., help="A run directory of `nmtrain train`, or a state_dict with --spec."),
    pattern: str = typer.Option(..., "--pattern", "-p", help="N:M pattern, N kept of every M (2:4 = density 0.50); N:M-T for transposable."),
    transposable: bool = typer.Option(False, "--transposable", "-T", help="Transposable N:M (mask also N:M along C_out)."),
    method: str = typer.Option("adaprune", help=f"One-shot method: {', '.join(ONESHOT_METHODS)}."),
    finetune: bool = typer.Option(False, "--finetune", help="Follow the method with AdaPrune's fit of the kept weights "
                                  "(masks fixed); the summary gives the metric after each."),
    calib_samples: int = typer.Option(1000, help="Calibration samples, drawn (seeded) from the training split (never from data.holdout's part)."),
    calib_seed: int = typer.Option(0, help="Seed of the calibration sample (and of AdaPrune's batches)."),
    iters: Optional[int] = typer.Option(None, help=f"Adam steps per layer {_FIT}; default 1000."),
    batch: Optional[int] = typer.Option(None, help=f"Calibration samples per Adam step {_FIT}; default 50."),
    lr_weight: Optional[float] = typer.Option(None, help=f"Learning rate of the kept weights {_FIT}; default 1e-3."),
    lr_bias: Optional[float] = typer.Option(None, help=f"Learning rate of the bias {_FIT}; default 1e-2."),
    sequential: Optional[bool] = typer.Option(None, "--sequential", help=f"Each layer's inputs from the already-converted "
                                              f"network {_FIT}; default: parallel, inputs from the original."),
    add_back: Optional[bool] = typer.Option(None, "--add-back/--no-add-back", help="AdaPrune: start from the kept weights "
                                            "rescaled to carry each group's pruned |w|; default: --add-back."),
    blocksize: Optional[int] = typer.Option(None, help="SparseGPT: columns per block of lazy updates, a multiple of M; default 128 (or the multiple of M below it)."),
    percdamp: Optional[float] = typer.Option(None, help="SparseGPT: dampening, the share of the mean Hessian diagonal added to it; default 0.01."),
    learn_steps: Optional[int] = typer.Option(None, help="learned: Adam steps on the mask logits over the calibration batches; default 200."),
    learn_lr: Optional[float] = typer.Option(None, help="learned: learning rate of the mask logits (cosine to a tenth); default 5e-4."),
    prior: Optional[str] = typer.Option(None, help="learned: the one-shot method whose mask the logits start from: magnitude (default), wanda or sparsegpt."),
    prior_strength: Optional[float] = typer.Option(None, help="learned: how strongly the logits start on the prior's mask (MaskLLM's --prior-strength); default 3."),
    solver: str = typer.Option("exact", help=f"Transposable mask solver for N:M-T: {', '.join(SOLVERS)}."),
    spec: Optional[Path] = typer.Option(None, help="Spec giving model and data for a bare state_dict (default: SOURCE/config.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Output run directory (default: beside SOURCE, named SOURCE-METHOD-2of4; -4of8T for 4:8-T)."),
    overwrite: bool = typer.Option(False, help="Replace a run already in the output directory."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Convert a dense or unstructured-sparse model to N:M (or N:M-T) with a one-shot method.

    Methods: magnitude (largest |w|), adaprune (the default: magnitude mask, pruned magnitude added back,
    then Adam fits each layer's kept weights and bias to its original output), wanda (|w|·||x||),
    sparsegpt (mask every M columns by w²/[H⁻¹]², error compensated through the inverse Hessian), learned
    (masks learned on the task's loss, weights frozen). For N:M-T each picks its mask with the
    transposable solver on its own saliency; --finetune follows any but adaprune with AdaPrune's fit.
    Calibration samples come from the training split; the metric is measured on data.holdout's samples
    when the source's spec sets it, else on the test (validation) split. Writes model.pt, config.yaml
    and summary.json (method, parameters, calibration, per-layer errors, the metric before and after);
    Ctrl-C leaves nothing. Methods, sources and defaults: docs/methods.md#one-shot-conversion.
    """
    from ..experiments.oneshot import ConversionSettings, convert
    from ..sparsity import parse_pattern

    given = locals()        # the methods' own options, by their params' field names; unset ones are None
    options = {name: given[name] for name in METHOD_OPTIONS if given[name] is not None}
    settings = ConversionSettings(pattern=parse_pattern(pattern, transposable=transposable), method=method,
                                  calib_samples=calib_samples, calib_seed=calib_seed, finetune=finetune,
                                  solver=solver, options=options)
    try:
        result = convert(source, settings, spec_path=spec, out=out, overwrite=overwrite, console=console,
                         progress=progress)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        raise typer.Exit(code=130) from None
    console.print(layer_table(result.summary))
    console.print(metric_table(result.summary))
    console.print(f"run directory: {result.out}")


def _title(method: str) -> str:
    """The method's name as tables print it ("SparseGPT")."""
    from ..experiments.oneshot import get_oneshot
    return get_oneshot(method).title


def _params_text(s: dict) -> str:
    params = ", ".join(f"{k} {v}" for k, v in s["method_params"].items())
    return _title(s["method"]) + (f" ({params})" if params else "")


def _stage_label(s: dict) -> str:
    """The method's column: its title, or "one-shot" where that is the baseline's ("magnitude")."""
    title = _title(s["method"])
    return "one-shot" if title == "magnitude" else title


def layer_table(s: dict) -> Table:
    """Per layer: shape, pattern, relative reconstruction error of magnitude, the method and the fine-tune, time."""
    finetune = s["finetune"] is not None
    table = Table(title=f"nmtrain adaprune: {s['pattern']}, {_params_text(s)}, {s['mode']}, "
                        f"{s['calib_samples']} calibration samples, seed {s['calib_seed']}")
    table.add_column("layer", overflow="fold", min_width=16)
    columns = ["shape", "pattern", "density", "rel. error magnitude", f"rel. error {_stage_label(s)}"]
    columns += ["rel. error fine-tune"] if finetune else []
    for col in columns + ["time"]:
        table.add_column(col, justify="left" if col in ("shape", "pattern") else "right", no_wrap=True)
    for name, r in s["layers"].items():
        seconds = (r["seconds"] or 0.0) + (r.get("seconds_finetune") or 0.0)
        row = [name, "×".join(map(str, r["shape"])), s["pattern"], f"{s['density']:.2f}",
               f"{r['error_magnitude']:.4g}", f"{r['error_oneshot']:.4g}"]
        row += [f"{r['error_finetune']:.4g}"] if finetune else []
        table.add_row(*row, f"{seconds:.1f} s")
    return table


def metric_table(s: dict) -> Table:
    """The task's primary metric: original, magnitude, after the method (and the fine-tune), share recovered."""
    from ..experiments.tasks import get_task

    task = get_task(s.get("task", "classification"))
    table = Table(title=f"{s['eval_split']} {task.primary}")
    stages = [("original", "original"), ("magnitude", "magnitude"), ("oneshot", _stage_label(s))]
    if s["finetune"] is not None:
        stages.append(("finetune", f"{_stage_label(s)} + fine-tune"))
    for _, label in stages:
        table.add_column(label, justify="right")
    for col in ("recovered", "BN re-estimated", "time"):
        table.add_column(col, justify="right")
    recovered = [s[f"recovered_{stage}"] for stage, _ in stages[2:]]
    seconds = sum(s[f"seconds_{stage}"] for stage, _ in stages[2:])
    table.add_row(*(task.format(s[f"{task.primary}_{stage}"]) for stage, _ in stages),
                  " → ".join("–" if r is None else f"{100 * r:.0f}%" for r in recovered),
                  "yes" if s["batchnorm_recalibrated"] else "no BN", f"{seconds:.1f} s (wall {s['wall_seconds']:.1f} s)")
    return table
