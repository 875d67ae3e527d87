"""The papers' claims, tested on a seeded `nmtrain compare` grid with paired t-tests over its seeds.

    python benchmarks/claims.py OUT/compare.json [OUT2/compare.json ...]

For each grid (`nmtrain compare SPEC --seeds ...`, e.g. the shipped reproduction specs) it prints one
markdown row per claim: the two cells compared, their means, the mean per-seed difference, p, and the
verdict (on the grid's primary metric: final accuracy, or final perplexity for a language-model grid, "above"
meaning better) — "holds" when the claim's direction is met or the difference is within noise where the claim is
"about equal", "does not hold" when the paired test separates the cells the wrong way. Claims:

- Hubara et al.: transposable 4:8-T is about as accurate as (row-wise) 2:4 — 4:8-T vs SR-STE 2:4.
- Zhang et al.: Bi-Mask is at least as accurate as transposable masks at the same density (2:4, 1:4).
- Yang et al.: BAME matches SR-STE (2:4, 1:4) at fewer training FLOPs.
- The frontier grids (`*_frontier.yaml`): Hu et al. (S-STE) at least as accurate as SR-STE (2:4, 1:4); Hu et al.
  (masked decay, transposable 2:4 pre-training) about as accurate as dense; Lu et al. (STEP) at least as
  accurate as SR-STE under AdamW (2:4, 1:4); Bambhaniya et al. (progressive gradient flow) at least as
  accurate as SR-STE at 1:8.
A claim whose cells are not in the grid is skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmtrain.experiments.stats import paired_test  # noqa: E402
from nmtrain.experiments.tasks import task_of_row  # noqa: E402

# (claim, cell A, cell B, kind): "equal" holds unless the test separates A and B; "at_least" holds unless A
# is separated below B. Cells are (method, pattern) as compare.json names them.
CLAIMS = [
    ("4:8-T about as accurate as 2:4 (Hubara et al.)", ("transposable", "4:8-T"), ("srste", "2:4"), "equal"),
    ("Bi-Mask ≥ transposable at 2:4 (Zhang et al.)", ("bimask", "2:4"), ("transposable", "2:4-T"), "at_least"),
    ("Bi-Mask ≥ transposable at 1:4 (Zhang et al.)", ("bimask", "1:4"), ("transposable", "1:4-T"), "at_least"),
    ("BAME ≈ SR-STE at 2:4, fewer FLOPs (Yang et al.)", ("bame", "2:4"), ("srste", "2:4"), "equal"),
    ("BAME ≈ SR-STE at 1:4, fewer FLOPs (Yang et al.)", ("bame", "1:4"), ("srste", "1:4"), "equal"),
    ("S-STE ≥ SR-STE at 2:4 (Hu et al. 2024)", ("sste", "2:4"), ("srste", "2:4"), "at_least"),
    ("S-STE ≥ SR-STE at 1:4 (Hu et al. 2024)", ("sste", "1:4"), ("srste", "1:4"), "at_least"),
    ("masked decay 2:4-T ≈ dense (Hu et al. 2024)", ("maskdecay", "2:4-T"), ("dense", "dense"), "equal"),
    ("STEP ≥ SR-STE at 2:4, AdamW (Lu et al.)", ("step", "2:4"), ("srste", "2:4"), "at_least"),
    ("STEP ≥ SR-STE at 1:4, AdamW (Lu et al.)", ("step", "1:4"), ("srste", "1:4"), "at_least"),
    ("PGF ≥ SR-STE at 1:8 (Bambhaniya et al.)", ("pgf", "1:8"), ("srste", "1:8"), "at_least"),
]


def verdicts(rows: list[dict]) -> list[dict]:
    """One verdict per claim whose two cells are in the grid, judged on the task's primary metric (final
    accuracy; final perplexity for a language-model grid, where lower is better)."""
    task = task_of_row(rows[0])
    key = task.columns[0].key
    by = {(r["method"], r["pattern"]): r for r in rows}
    out = []
    for claim, a, b, kind in CLAIMS:
        if a not in by or b not in by:
            continue
        ra, rb = by[a], by[b]
        test = paired_test({r["seed"]: r[key] for r in ra["runs"]}, {r["seed"]: r[key] for r in rb["runs"]})
        separated = test.within_noise is False
        above = task.gain(test.difference, 0.0) > 0         # A better than B, in the metric's direction
        if kind == "equal":
            holds = not separated
            words = "holds (within noise)" if holds else f"does not hold ({'above' if above else 'below'})"
        else:
            holds = not (separated and not above)
            words = ("holds" + (" (above)" if separated else " (within noise)")) if holds else "does not hold (below)"
        if "FLOPs" in claim:
            fewer = ra["flops_ratio"] < rb["flops_ratio"]
            words += f"; FLOPs {ra['flops_ratio'] / rb['flops_ratio']:.2f}x of {b[0]}" + ("" if fewer else " (not fewer)")
            holds = holds and fewer
        out.append({"claim": claim, "a": f"{a[0]} {a[1]}", "b": f"{b[0]} {b[1]}",
                    "mean_a": ra[f"{key}_mean"], "mean_b": rb[f"{key}_mean"],
                    "difference": test.difference, "p_value": test.p_value, "holds": holds, "verdict": words})
    return out


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for path in sys.argv[1:]:
        rows = json.loads(Path(path).read_text())
        if not rows or "runs" not in rows[0]:
            raise SystemExit(f"{path}: not a seeded grid (run nmtrain compare with --seeds)")
        print(f"\n{path}\n")
        print("| claim | A | B | A mean | B mean | A − B (paired) | p | verdict |")
        print("|---|---|---|---|---|---|---|---|")
        for v in verdicts(rows):
            p = "–" if v["p_value"] is None else f"{v['p_value']:.3f}"
            print(f"| {v['claim']} | {v['a']} | {v['b']} | {v['mean_a']:.2f} | {v['mean_b']:.2f} | "
                  f"{v['difference']:+.2f} | {p} | {v['verdict']} |")


if __name__ == "__main__":
    main()
