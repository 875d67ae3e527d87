"""Run a grid of methods x patterns from one spec and put the results side by side.

Each cell is an ordinary `train` run in ``OUT/<method>-<N>of<M>`` (dense runs once, as ``dense``),
so every cell has its own complete run directory. A spec's ``accel`` (real 2:4 kernels) applies to the
cells that can use it (transposable at 2:4-T); the others, the dense baseline among them, run with
``accel: none``, and the ``accel`` column says which did. The comparison is written as
``OUT/compare.csv``, ``OUT/compare.json`` and ``OUT/compare.png`` (accuracy against training
FLOPs relative to dense, one marker per method, one colour per pattern).
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

from ..sparsity import parse_pattern
from . import accel as accel_mod
from .io import atomic_write, save_text
from .methods import get_method
from .runner import train, validate
from .spec import Spec, SpecError

COLUMNS = ("method", "pattern", "density", "final_accuracy", "best_accuracy", "epochs", "seed", "flops_ratio",
           "wall_seconds", "mask_change_rate", "run_dir", "accel")


def grid(spec: Spec, methods: list[str], patterns: list[str]) -> list[Spec]:
    """One spec per cell, each validated before anything runs (a bad cell fails the whole grid up front)."""
    if not methods or not patterns:
        raise SpecError("sweep: give --methods and --patterns, or a `sweep:` section with methods and patterns")
    cells = []
    for method in methods:
        get_method(method)
        for i, text in enumerate(patterns):
            if method == "dense" and i > 0:
                continue            # dense has no pattern: one run is enough
            p = parse_pattern(text)
            cell = copy.deepcopy(spec)
            if method in spec.sweep.params:
                cell.method.params = dict(spec.sweep.params[method])
            elif cell.method.name != method:
                cell.method.params = {}
            cell.method.name = method
            cell.sparsity.pattern = f"{p.n}:{p.m}"
            cell.sparsity.transposable = p.transposable and method != "dense"   # dense has no mask to transpose
            if cell.accel in accel_mod.ACCEL_MODES and not accel_mod.supports(method, p):
                cell.accel = "none"     # this cell's masks cannot use the 2:4 kernels: its masked-dense run
            cell.out = str(Path(spec.out) / ("dense" if method == "dense" else f"{method}-{p.n}of{p.m}"
                                              + ("T" if p.transposable else "")))
            validate(cell)
            cells.append(cell)
    return cells


def _last_change_rate(run_dir: Path) -> float | None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("mask_change_rate") if lines else None


def run_grid(cells: list[Spec], overwrite: bool = False, console=None, progress: bool = True) -> list[dict]:
    rows = []
    for cell in cells:
        result = train(cell, overwrite=overwrite, console=console, progress=progress)
        s = result.summary
        rows.append({"method": s["method"], "pattern": s["pattern"] or "dense", "density": s["density"],
                     "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
                     "epochs": s["epochs"], "seed": s["seed"], "flops_ratio": s["train_flops"]["ratio"],
                     "wall_seconds": s["wall_seconds"], "mask_change_rate": _last_change_rate(result.out),
                     "run_dir": str(result.out), "accel": s["accel"]["mode"]})
    return rows


def write_results(rows: list[dict], out: Path, title: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out / "compare.csv", "json": out / "compare.json", "png": out / "compare.png"}
    save_text(buf.getvalue(), paths["csv"])
    save_text(json.dumps(rows, indent=2) + "\n", paths["json"])
    atomic_write(paths["png"], lambda tmp: plot(rows, tmp, title))
    return paths


def plot(rows: list[dict], path: str, title: str) -> None:
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
    for r in rows:
        mi, pi = methods.index(r["method"]), patterns.index(base(r["pattern"]))
        ax.scatter(r["flops_ratio"], r["final_accuracy"], marker=markers[mi % len(markers)], s=70,
                   color=colours(pi % 10), edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xlabel("training GEMM MACs relative to dense (as run on N:M sparse tensor cores)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3, zorder=0)
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], linestyle="", color="grey", label=m)
               for i, m in enumerate(methods)]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color=colours(i % 10), label=p)
                for i, p in enumerate(patterns)]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def check_patterns(texts: list[str]) -> list[str]:
    return [str(parse_pattern(t)) for t in texts]
