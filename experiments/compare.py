"""Run a grid of methods x patterns from one spec and put the results side by side.

Each cell is an ordinary `train` run in ``OUT/<method>-<N>of<M>`` (dense runs once, as ``dense``),
so every cell has its own complete run directory. A spec's ``accel`` (real 2:4 kernels) applies to the
cells that can use it (transposable at 2:4-T); the others, the dense baseline among them, run with
``accel: none``, and the ``accel`` column says which did. The comparison is written as
``OUT/compare.csv``, ``OUT/compare.json`` and ``OUT/compare.png`` (the task's primary metric against
training FLOPs relative to dense, one marker per method, one colour per pattern).

The metric is the task's (``experiments/tasks``): an image grid's columns are final and best accuracy
(higher is better), a language-model grid's final perplexity and validation loss (lower is better);
"best" and the verdict's "above"/"below" (better/worse) follow the primary metric's direction.

With seeds (``--seeds 0,1,2`` or ``sweep.seeds``) every cell runs once per seed, each an ordinary run
directory ``OUT/<cell>/seed<k>``; the outputs then hold one row per method and pattern with the mean
and sample standard deviation over the seeds (error bars in the plot), and each row is tested against
the best cell and against dense with a paired t-test over the seeds (``experiments/stats.py``): a
difference the test cannot tell from the seed-to-seed spread is marked "within noise".
"""

from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from ..sparsity import parse_pattern
from . import accel as accel_mod
from .io import atomic_write, check_output_dir, check_output_file, save_text
from .methods import get_method, params_dict
from .build import Preflight, parse_field_pattern, validate
from .rundir import RunDir
from .runner import train
from .spec import Spec, SpecError, check_number, from_dict, to_dict
from .stats import mean, paired_test, std
from .tasks import Task, get_task, task_of_row
from .yamlfile import read_yaml

def run_columns(task: Task) -> tuple[str, ...]:
    """A single-seed grid's CSV columns: one row per run, the task's two metrics after the pattern."""
    return ("method", "pattern", "density", *(c.key for c in task.columns), "epochs", "seed", "flops_ratio",
            "wall_seconds", "mask_change_rate", "run_dir", "accel")


def seed_columns(task: Task) -> tuple[str, ...]:
    """A seeded grid's CSV columns: the primary metric's mean and std, the second metric's mean."""
    primary, second = (c.key for c in task.columns)
    return ("method", "pattern", "density", "n_seeds", "seeds", f"{primary}_mean", f"{primary}_std",
            f"{second}_mean", "flops_ratio", "wall_seconds_mean", "mask_change_rate_mean",
            "vs_dense_difference", "vs_dense_p", "vs_dense", "vs_best_difference", "vs_best_p", "vs_best", "accel")


RESULT_FILES = ("compare.csv", "compare.json", "compare.png", "mask_change.png")     # in the grid's directory

MAX_SEEDS = 100


def check_seeds(seeds: list[int]) -> list[int]:
    """Seeds for a multi-seed grid: distinct integers within the seed rule (spec.RULES), at most MAX_SEEDS."""
    if not seeds:
        raise SpecError("sweep.seeds: give at least one seed, e.g. 0,1,2")
    if len(seeds) > MAX_SEEDS:
        raise SpecError(f"sweep.seeds: at most {MAX_SEEDS} seeds, got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise SpecError(f"sweep.seeds: every seed is an integer, got {s!r}")
        check_number("sweep.seeds", s)
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"sweep.seeds: a seed is listed twice in {seeds}; give each once")
    return list(seeds)


@dataclass
class Cell:
    """One run of a grid: its label (a method name, or ``method:variant`` for a method with the
    parameters ``sweep.params[label]``), its spec and what `validate` found in it (carried to the run)."""
    label: str
    spec: Spec
    preflight: Preflight


def split_label(label: str) -> tuple[str, str | None]:
    method, _, variant = label.partition(":")
    if ":" in label and (not variant or not variant.replace("_", "").replace("-", "").isalnum()):
        raise SpecError(f"sweep.methods: {label!r}: a variant is method:name, name of letters, digits, - or _")
    return method, variant or None


def grid(spec: Spec, methods: list[str], patterns: list[str], seeds: list[int] | None = None,
         patterns_of: dict | None = None) -> list[Cell]:
    """One cell per method and pattern (and per seed, when ``seeds`` is given), each validated before
    anything runs (a bad cell fails the whole grid up front). A method may be listed as ``method:variant``
    beside ``method``: the variant's parameters are ``sweep.params["method:variant"]`` (e.g.
    ``bimask:local`` with ``{search: local}``), its directories ``method-variant-...``. ``patterns_of``
    (``sweep.patterns_of``) gives a method label patterns of its own in place of ``patterns`` (PGF at 1:8
    beside everyone's 2:4 and 1:4)."""
    patterns_of = dict(patterns_of or {})
    known = list(dict.fromkeys([*spec.sweep.methods, *methods]))     # a grid cut down by --methods keeps them
    for label, own in patterns_of.items():
        if label not in known:
            raise SpecError(f"sweep.patterns_of: {label!r} is not one of the grid's methods ({', '.join(known)})")
        if not isinstance(own, list) or not own or not all(isinstance(t, str) for t in own):
            raise SpecError(f"sweep.patterns_of.{label}: give a list of patterns such as ['2:4', '1:8']")
    if seeds is not None:
        seeds = check_seeds(seeds)
    if not methods or not patterns:
        raise SpecError("sweep: give --methods and --patterns, or a `sweep:` section with methods and patterns")
    if len(set(methods)) != len(methods):
        raise SpecError(f"sweep.methods: a method is listed twice in {methods}")
    cells = []
    for label in methods:
        method, variant = split_label(label)
        cls = get_method(method)
        if variant is not None and label not in spec.sweep.params:
            raise SpecError(f"sweep.params: give the parameters of variant {label!r} (sweep.params.{label!r})")
        parsed = [parse_field_pattern(text, "--patterns / sweep.patterns") for text in patterns_of.get(label, patterns)]
        sparse = cls.caps.sparse
        if sparse and not cls.caps.accepts_transposable:
            # a -T pattern is a cell only for methods that take transposable masks (4:8-T beside 2:4)
            parsed = [p for p in parsed if not p.transposable]
            if not parsed:
                raise SpecError(f"sweep.patterns: method {method} takes no transposable (-T) pattern; "
                                "add a plain one such as 2:4")
        for i, p in enumerate(parsed):
            if not sparse and i > 0:
                continue            # the dense baseline has no pattern: one run is enough
            cell = copy.deepcopy(spec)
            if label in spec.sweep.params:
                cell.method.params = dict(spec.sweep.params[label])
            elif cell.method.name != method:
                cell.method.params = {}
            cell.method.name = method
            cell.sparsity.pattern = f"{p.n}:{p.m}"
            cell.sparsity.transposable = p.transposable and sparse   # dense has no mask to transpose
            if cell.accel in accel_mod.ACCEL_MODES and not cls.caps.accel(p):
                cell.accel = "none"     # this cell's masks cannot use the 2:4 kernels: its masked-dense run
            stem = label.replace(":", "-")
            cell.out = str(Path(spec.out) / (f"{stem}-{p.slug}" if sparse else stem))
            for seed in seeds if seeds is not None else [None]:
                run = cell
                if seed is not None:
                    run = copy.deepcopy(cell)
                    run.seed, run.out = seed, str(Path(cell.out) / f"seed{seed}")
                cells.append(Cell(label, run, validate(run)))
    return cells


def _last_change_rate(run_dir: Path) -> float | None:
    records = RunDir(run_dir).read_metrics("compare")
    return records[-1].get("mask_change_rate") if records else None


def finished_run(cell: Spec, preflight: Preflight | None = None) -> dict | None:
    """The summary of a finished run of exactly this cell's spec in its directory, else None.

    Finished: summary.json is there (written last). Same spec: the saved config.yaml equals the cell's
    resolved spec, method parameters filled in as the runner saves them. ``preflight``: the cell's
    `validate` result (None: validated here)."""
    rd = RunDir(cell.out)
    if not rd.is_finished():
        return None
    resolved = copy.deepcopy(cell)
    resolved.method.params = params_dict((preflight or validate(cell)).params)
    try:
        # Through the schema, so keys added since the run was written compare at their defaults.
        saved = to_dict(from_dict(Spec, read_yaml(rd.config)))
        summary = rd.read_summary()
    except (OSError, ValueError, yaml.YAMLError):     # SpecError and CheckpointError are ValueErrors
        return None
    if saved != to_dict(resolved):
        return None
    return summary


def run_grid(cells: list[Cell], out: Path, overwrite: bool = False, console=None, progress: bool = True,
             reuse: bool = False) -> list[dict]:
    """Train every cell; with ``reuse``, a cell whose directory already holds a finished run of the same
    spec is read instead of trained (an interrupted grid continues where it stopped). Every output is
    checked before the first cell trains. With a ``console``, one line per finished cell; the caller
    shows the table of the whole grid, written to ``out``."""
    finished = [finished_run(c.spec, c.preflight) if reuse else None for c in cells]
    check_grid_targets(out, [c for c, s in zip(cells, finished) if s is None], overwrite)
    rows = []
    for i, (c, s) in enumerate(zip(cells, finished), 1):
        reused = s is not None
        if s is None:
            s = train(c.spec, overwrite=overwrite, console=console, progress=progress, preflight=c.preflight).summary
        result_out = Path(c.spec.out)
        task = get_task(s.get("task", "classification"))      # summaries written before tasks: images
        rows.append({"method": c.label, "pattern": s["pattern"] or "dense", "density": s["density"],
                     **{col.key: s[col.key] for col in task.columns},
                     "epochs": s["epochs"], "seed": s["seed"], "flops_ratio": s["train_flops"]["ratio"],
                     "wall_seconds": s["wall_seconds"], "mask_change_rate": _last_change_rate(result_out),
                     "run_dir": str(result_out), "accel": s["accel"]["mode"]})
        if console is not None:
            console.print(cell_line(rows[-1], i, len(cells), reused), soft_wrap=True)    # one line, even in a log
    return rows


def check_grid_targets(out: Path, to_train: list[Cell], overwrite: bool) -> None:
    """The grid's outputs: the table's files in the grid's directory ``out``, and the run directory of
    each cell ``to_train`` (a reused cell's finished run stays as it is)."""
    check_output_dir(out, "--out")
    for name in RESULT_FILES:
        check_output_file(out / name, "--out")
    for cell in to_train:
        RunDir(cell.spec.out).check_target(overwrite)


def is_baseline(row: dict) -> bool:
    """Whether a result row (one run, or one cell) is the dense baseline: its run recorded no pattern
    (summary.json's ``pattern`` is null exactly for methods that mask nothing, ``caps.sparse`` false)."""
    return row["pattern"] == "dense"


def cell_line(row: dict, i: int, total: int, reused: bool) -> str:
    """``[2/6] srste 2:4 (density 0.50) seed 0: final acc 89.60%, wall 23.1 s`` for one finished cell."""
    cell = row["method"] if is_baseline(row) else f"{row['method']} {parse_pattern(row['pattern']).describe()}"
    where = f"reusing the finished run in {row['run_dir']}" if reused else row["run_dir"]
    task = task_of_row(row)
    return (f"[{i}/{total}] {cell} seed {row['seed']}: final {task.short} {task.format(row[task.columns[0].key])}, "
            f"wall {row['wall_seconds']:.1f} s · {where}")


def aggregate(rows: list[dict]) -> list[dict]:
    """Per-seed run rows -> one row per (method, pattern): mean and sample std over the seeds, and a
    paired t-test against dense and against the best cell (the best mean of the task's primary metric:
    the highest final accuracy, the lowest final perplexity)."""
    task = task_of_row(rows[0])
    primary, second = (c.key for c in task.columns)
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["pattern"]), []).append(r)
    out = []
    for (method, pattern), runs in cells.items():
        values = [r[primary] for r in runs]
        rates = [r["mask_change_rate"] for r in runs if r["mask_change_rate"] is not None]
        out.append({"method": method, "pattern": pattern, "density": runs[0]["density"],
                    "seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
                    f"{primary}_mean": mean(values), f"{primary}_std": std(values),
                    f"{second}_mean": mean([r[second] for r in runs]),
                    "flops_ratio": mean([r["flops_ratio"] for r in runs]),
                    "wall_seconds_mean": mean([r["wall_seconds"] for r in runs]),
                    "mask_change_rate_mean": mean(rates) if rates else None,
                    "accel": runs[0]["accel"], "runs": runs})
    by_seed = [{r["seed"]: r[primary] for r in row["runs"]} for row in out]
    best = 0                    # the first of the best means, in the metric's direction (Task.better)
    for i, row in enumerate(out):
        if task.better(row[f"{primary}_mean"], out[best][f"{primary}_mean"]):
            best = i
    dense = next((i for i, row in enumerate(out) if is_baseline(row)), None)
    for i, row in enumerate(out):
        row["vs_best"] = None if i == best else paired_test(by_seed[i], by_seed[best]).to_dict()
        row["vs_dense"] = None if dense is None or i == dense else paired_test(by_seed[i], by_seed[dense]).to_dict()
        row["is_best"] = i == best
    return out


def verdict(test: dict | None, reference: str, lower_is_better: bool = False) -> str:
    """A comparison in words: "best" / "dense" (the reference itself), "within noise", "above (+0.42, p=0.010)".
    "above" is better and "below" worse in the metric's direction: with ``lower_is_better`` (perplexity)
    a negative difference is "above"."""
    if test is None:
        return reference
    if test["within_noise"] is None:
        return f"{test['difference']:+.2f} (1 seed: untested)"
    if test["within_noise"]:
        return "within noise"
    better = test["difference"] < 0 if lower_is_better else test["difference"] > 0
    return f"{'above' if better else 'below'} ({test['difference']:+.2f}, p={test['p_value']:.3f})"


def _seed_csv_row(row: dict) -> dict:
    task = task_of_row(row)
    flat = {k: row[k] for k in seed_columns(task) if k in row}
    flat["seeds"] = " ".join(str(s) for s in row["seeds"])
    for key, ref in (("vs_dense", "dense"), ("vs_best", "best")):
        test = row[key]
        flat[f"{key}_difference"] = None if test is None else test["difference"]
        flat[f"{key}_p"] = None if test is None else test["p_value"]
        flat[key] = verdict(test, ref if key == "vs_best" or is_baseline(row) else "–", task.lower_is_better)
    return flat


def write_results(rows: list[dict], out: Path, title: str, seeds: bool = False) -> dict[str, Path]:
    """Single-seed grids write one row per run (``rows``); seeded grids (``seeds``) write the rows of
    :func:`aggregate` (one per method and pattern, per-seed rows under ``runs``)."""
    buf = io.StringIO()
    task = task_of_row(rows[0]) if rows else get_task("classification")
    writer = csv.DictWriter(buf, fieldnames=seed_columns(task) if seeds else run_columns(task))
    writer.writeheader()
    writer.writerows([_seed_csv_row(r) for r in rows] if seeds else rows)
    paths = {"csv": out / "compare.csv", "json": out / "compare.json", "png": out / "compare.png"}
    save_text(buf.getvalue(), paths["csv"], "--out")
    save_text(json.dumps(rows, indent=2) + "\n", paths["json"], "--out")
    atomic_write(paths["png"], lambda fh: plot(rows, fh, title), "--out")
    series = recompute_series(rows)
    if series:
        paths["mask_change"] = out / "mask_change.png"
        atomic_write(paths["mask_change"], lambda fh: plot_recomputes(series, fh, title), "--out")
    return paths


def recompute_series(rows: list[dict]) -> dict[str, list[tuple[int, list[tuple[int, float]]]]]:
    """Per cell label, per run (seed): the (step, change rate) of every mask recompute in metrics.jsonl."""
    runs = [run for row in rows for run in row.get("runs", [row])]
    series: dict[str, list] = {}
    for run in runs:
        points = [(e["step"], e["change_rate"]) for record in RunDir(run["run_dir"]).read_metrics("compare")
                  for e in record.get("mask_recomputes", [])]
        if points:
            series.setdefault(f"{run['method']} {run['pattern']}", []).append((run["seed"], points))
    return series


def plot_recomputes(series: dict, path: str | IO[bytes], title: str) -> None:
    """Share of the mask that flips at each recompute, one line per run (colour per cell)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, (label, runs) in enumerate(series.items()):
        for j, (seed, points) in enumerate(runs):
            steps, rates = zip(*points)
            ax.plot(steps, rates, color=colours(i % 10), linewidth=1, alpha=0.8, marker=".", markersize=3,
                    label=label if j == 0 else None)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of mask entries flipped at the recompute")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _density_label(pattern: str) -> str:
    """'2:4' -> '2:4 (density 0.50)'; a pattern's colour in the plot stands for its density (-T included)."""
    return pattern if pattern == "dense" else parse_pattern(pattern).describe()


def plot(rows: list[dict], path: str | IO[bytes], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")              # no display: write files only
    import matplotlib.pyplot as plt

    markers = "os^Dv<>pP*X"
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def base(pattern: str) -> str:          # 2:4-T shares 2:4's colour: same density
        return pattern.removesuffix("-T")

    patterns = list(dict.fromkeys(base(r["pattern"]) for r in rows))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    task = task_of_row(rows[0]) if rows else get_task("classification")
    key = task.columns[0].key
    seeded = bool(rows) and f"{key}_mean" in rows[0]
    for r in rows:
        mi, pi = methods.index(r["method"]), patterns.index(base(r["pattern"]))
        y = r[f"{key}_mean"] if seeded else r[key]
        if seeded and r[f"{key}_std"] is not None:      # error bar: one sample std over the seeds
            ax.errorbar(r["flops_ratio"], y, yerr=r[f"{key}_std"], color=colours(pi % 10),
                        capsize=3, linewidth=1, zorder=2)
        ax.scatter(r["flops_ratio"], y, marker=markers[mi % len(markers)], s=70,
                   color=colours(pi % 10), edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xlabel("training GEMM MACs relative to dense (as run on N:M sparse tensor cores)")
    if seeded:
        n = sorted({r["n_seeds"] for r in rows})
        ax.set_ylabel(f"{task.axis_label}\nmean ± std over {'/'.join(map(str, n))} seeds")
    else:
        ax.set_ylabel(task.axis_label)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3, zorder=0)
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], linestyle="", color="grey", label=m)
               for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=_density_label(p))
                for i, p in enumerate(patterns)]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
