"""`nmtrain compare`: run methods x patterns from one spec and tabulate them side by side."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .console import console
from .errors import UsageError, user_errors
from .train import overrides_argument, resolve_spec, spec_args, spec_argument


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


# ASCII digits only (int() would also read '１' or '١'), and at most 18 of them: torch's manual_seed
# takes 64-bit seeds, and each epoch seeds with seed + epoch.
_SEED_RE = re.compile(r"-?[0-9]{1,18}", re.ASCII)


def _seeds(text: str) -> list[int]:
    from ..experiments.spec import check_number
    from ..sparsity.errors import clip

    texts = _split(text)
    if not all(_SEED_RE.fullmatch(t) for t in texts):
        raise UsageError(f"--seeds: give comma-separated integers of at most 18 ASCII digits like 0,1,2, "
                         f"got {clip(text)!r}")
    seeds = [int(t) for t in texts]
    for seed in seeds:
        check_number("sweep.seeds", seed, shown="--seeds")     # the rule of spec.seed and sweep.seeds
    return seeds


def _title(spec, seeds: str) -> str:
    return f"{spec.name}: {spec.model.name} on {spec.data.dataset}, {spec.train.epochs} epochs, {seeds}"


def _seeded_table(spec, seed_list: list[int], rows: list[dict]) -> None:
    from ..experiments.compare import aggregate, is_baseline, verdict, write_results
    from ..experiments.tasks import task_of_row

    cells = aggregate(rows)
    task = task_of_row(rows[0])
    metric = task.columns[0]
    title = _title(spec, f"seeds {','.join(map(str, seed_list))}")
    paths = write_results(cells, Path(spec.out), title, seeds=True)
    table = Table(title=f"nmtrain compare · {title}", caption="mean ± sample std over seeds; vs dense / vs best: "
                  "paired t-test over seeds, two-sided, alpha 0.05")
    for col in ("method", "pattern", "density", "seeds", metric.label, "vs dense", "vs best", "train FLOPs vs dense",
                "wall"):
        table.add_column(col, justify="left" if col in ("method", "pattern", "vs dense", "vs best") else "right")
    for c in cells:
        sd, low = c[f"{metric.key}_std"], task.lower_is_better
        table.add_row(c["method"], c["pattern"], f"{c['density']:.3f}", str(c["n_seeds"]),
                      f"{c[f'{metric.key}_mean']:.{metric.digits}f}"
                      + ("" if sd is None else f" ± {sd:.{metric.digits}f}") + metric.unit,
                      verdict(c["vs_dense"], "dense" if is_baseline(c) else "–", low),
                      verdict(c["vs_best"], "best", low), f"{c['flops_ratio']:.3f}", f"{c['wall_seconds_mean']:.1f} s")
    console.print(table)
    _wrote(paths)


def _run_table(spec, rows: list[dict]) -> None:
    from ..experiments.compare import write_results
    from ..experiments.tasks import task_of_row

    title = _title(spec, f"seed {spec.seed}")
    paths = write_results(rows, Path(spec.out), title)
    table = Table(title=f"nmtrain compare · {title}")
    show_accel = any(r["accel"] != "none" for r in rows)       # the column only where a cell used the kernels
    metrics = task_of_row(rows[0]).columns
    cols = ("method", "pattern", "density", *(c.label for c in metrics), "train FLOPs vs dense", "wall", "mask change")
    for col in cols + (("accel",) if show_accel else ()):
        table.add_column(col, justify="left" if col in ("method", "pattern", "accel") else "right")
    for r in rows:
        mcr = r["mask_change_rate"]
        table.add_row(r["method"], r["pattern"], f"{r['density']:.3f}", *(c.format(r[c.key]) for c in metrics),
                      f"{r['flops_ratio']:.3f}", f"{r['wall_seconds']:.1f} s",
                      "–" if mcr is None else f"{mcr:.4f}", *((r["accel"],) if show_accel else ()))
    console.print(table)
    _wrote(paths)


def _wrote(paths: dict) -> None:
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))


@user_errors
def compare(
    spec: Optional[str] = spec_argument(),
    overrides: Optional[List[str]] = overrides_argument(),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods, e.g. dense,srste,bimask; method:variant for a method with the parameters sweep.params['method:variant'] (default: the spec's sweep.methods)."),
    patterns: Optional[str] = typer.Option(None, help="Comma-separated N:M patterns (N kept of M), e.g. 2:4,1:4 (default: sweep.patterns, and sweep.patterns_of per method)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2: every cell runs once per seed; the outputs show mean ± std and a paired test against dense and the best cell (default: sweep.seeds, else one run with `seed`)."),
    out: Optional[Path] = typer.Option(None, help="Directory for the grid's runs and compare.csv/json/png (default: the spec's out)."),
    overwrite: bool = typer.Option(False, help="Replace runs already in the output directory."),
    reuse: bool = typer.Option(False, help="Read, instead of retraining, every cell whose directory already holds a finished run of the same spec (an interrupted grid continues)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train every method at every pattern; write one table as rich output, CSV, JSON and a PNG of the task's metric (accuracy, perplexity) vs FLOPs."""
    from ..experiments.compare import grid, run_grid

    resolved = resolve_spec(spec_args(spec, overrides), None, None, out)
    seed_list = _seeds(seeds) if seeds is not None else (resolved.sweep.seeds or None)
    cells = grid(resolved, _split(methods) or resolved.sweep.methods, _split(patterns) or resolved.sweep.patterns,
                 seed_list, None if patterns else resolved.sweep.patterns_of)
    console.print(_grid_line(cells, seed_list))
    if reuse and overwrite:
        raise UsageError("--reuse and --overwrite: choose one (reuse keeps finished runs, overwrite retrains them)")
    rows = run_grid(cells, Path(resolved.out), overwrite=overwrite, console=console, progress=progress, reuse=reuse)
    if seed_list:
        _seeded_table(resolved, seed_list, rows)
    else:
        _run_table(resolved, rows)


def _grid_line(cells, seed_list) -> str:
    """``comparing 6 runs (2 cells x seeds 0,1,2): dense, srste 2:4 (density 0.50)``: each cell once."""
    def name(c) -> str:
        if not c.preflight.method.caps.sparse:
            return c.label
        return f"{c.label} {c.preflight.asked.describe()}"

    names = list(dict.fromkeys(name(c) for c in cells))
    shape = f" ({len(names)} cells x seeds {','.join(map(str, seed_list))})" if seed_list else ""
    return f"comparing {len(cells)} runs{shape}: " + ", ".join(names)
