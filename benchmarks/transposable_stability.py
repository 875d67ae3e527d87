"""Transposable training with the paper's mask interval, pruned weights bounded or not, side by side.

    python benchmarks/transposable_stability.py [--patterns 2:4-T,1:4-T,1:8-T] [--seeds 0,1,2]
        [--interval 40] [--solver exact] [--out bench-results/transposable] [--set KEY=VALUE]...

Runs the quick spec (LeNet-5, Fashion-MNIST, 3 epochs) with `transposable` at every pattern and seed,
once with `bound_pruned: false` (the unbounded reference behaviour) and once with the default
`bound_pruned: true`, each cell an ordinary run directory (finished runs of the same spec are reused, so
an interrupted benchmark continues). Writes `stability.csv` (one row per run: final accuracy, largest
and mean share of the mask flipped at one recompute) and `stability.png` (the share flipped at every
recompute, unbounded beside bounded), and prints a table. A run that ends at or below 15% accuracy (chance
is 10%) or stops on a non-finite loss counts as diverged. See README "Transposable training".
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmtrain.experiments.compare import finished_run, grid, recompute_series  # noqa: E402
from nmtrain.experiments.runner import RunError, train  # noqa: E402
from nmtrain.experiments.spec import SPECS_DIR, load_spec  # noqa: E402

DIVERGED = 15.0
VARIANTS = (("unbounded", False), ("bounded", True))


def run_variant(args, name: str, bound: bool) -> list[dict]:
    spec = load_spec(SPECS_DIR / "fmnist_quick.yaml", [
        "method.name=transposable", f"method.params.mask_interval={args.interval}",
        f"method.params.bound_pruned={str(bound).lower()}", f"method.params.solver={args.solver}",
        f"out={Path(args.out) / name}", *args.set])
    rows = []
    for c in grid(spec, ["transposable"], args.patterns.split(","), [int(s) for s in args.seeds.split(",")]):
        cell = c.spec
        summary = finished_run(cell, c.preflight)
        if summary is None:
            try:
                summary = train(cell, overwrite=True, progress=False, preflight=c.preflight).summary
            except RunError as exc:          # a non-finite loss stops the run: that is a divergence
                print(f"{cell.out}: {exc}", file=sys.stderr)
                summary = {"final_accuracy": 0.0, "pattern": f"{cell.sparsity.pattern}-T", "seed": cell.seed}
        rows.append({"variant": name, "method": "transposable", "pattern": summary["pattern"],
                     "seed": cell.seed, "final_accuracy": summary["final_accuracy"], "run_dir": cell.out})
    series = recompute_series(rows)
    for row in rows:
        rates = [r for seed, points in series.get(f"transposable {row['pattern']}", []) if seed == row["seed"]
                 for _, r in points]
        row["max_change_rate"] = max(rates) if rates else None
        row["mean_change_rate"] = statistics.mean(rates) if rates else None
        row["diverged"] = row["final_accuracy"] <= DIVERGED
    return rows


def plot(all_rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
    colours = plt.get_cmap("tab10")
    for ax, (name, _) in zip(axes, VARIANTS):
        series = recompute_series([r for r in all_rows if r["variant"] == name])
        for i, (label, runs) in enumerate(sorted(series.items())):
            for j, (seed, points) in enumerate(runs):
                steps, rates = zip(*points)
                ax.plot(steps, rates, color=colours(i % 10), linewidth=1, marker=".", markersize=3,
                        label=label.split()[-1] if j == 0 else None)
        ax.set_title(f"pruned weights {name}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of the mask flipped at the recompute")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", default="2:4-T,1:4-T,1:8-T")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--interval", type=int, default=40)
    parser.add_argument("--solver", default="exact")
    parser.add_argument("--out", default="bench-results/transposable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for every run, e.g. train.max_steps=50 for a smoke test")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [row for name, bound in VARIANTS for row in run_variant(args, name, bound)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "stability.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = (f"transposable, LeNet-5 on Fashion-MNIST, 3 epochs, mask_interval {args.interval}, "
             f"solver {args.solver}, seeds {args.seeds}")
    plot(rows, out / "stability.png", title)
    print("| pruned weights | pattern | final acc per seed | mean ± std | diverged | largest flip at one recompute |")
    print("|---|---|---|---|---|---|")
    for name, _ in VARIANTS:
        for pattern in dict.fromkeys(r["pattern"] for r in rows):
            cell = [r for r in rows if r["variant"] == name and r["pattern"] == pattern]
            accs = [r["final_accuracy"] for r in cell]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            flips = [r["max_change_rate"] for r in cell if r["max_change_rate"] is not None]
            flip = f"{max(flips):.1%}" if flips else "–"
            print(f"| {name} | {pattern} | {' / '.join(f'{a:.2f}' for a in accs)} | "
                  f"{statistics.mean(accs):.2f} ± {sd:.2f} | {sum(r['diverged'] for r in cell)} of {len(cell)} | "
                  f"{flip} |")
    print(json.dumps({"csv": str(out / "stability.csv"), "png": str(out / "stability.png")}))


if __name__ == "__main__":
    main()
