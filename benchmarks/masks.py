"""Mask solver benchmark: every transposable solver against plain row-wise N:M, in one run.

For each weight (a 4096x4096 fp32 matrix and the conv weights of ResNet-50's last stage) and each
pattern, it times row-wise N:M top-k and every transposable solver on the same tensor, and reports
the share of |W| kept, the gap to the optimum (the exact solver's kept magnitude) and the time as a
multiple of row-wise top-k's and of ``approx``'s. The row-wise row's note names the code that made it
(at M = 4 on a CPU, up to 1M entries, a compiled pass much faster than ``topk``). On a CPU, ``approx`` and
``exact`` run the compiled per-tile solvers; "approx (tensor path)" is the vectorised tensor code that a
GPU runs, timed here too. The networkx `flow` solver is far too slow for whole matrices: it runs on a
fixed random subset of tiles and its time is extrapolated to all tiles (marked "extrapolated"); its gap is
measured on that subset against the exact masks of the same tiles.

    python benchmarks/masks.py                      # CPU, 2:4-T 4:8-T 8:16-T 16:32-T
    python benchmarks/masks.py --device cuda
    python benchmarks/masks.py --sizes 4096,8192 --no-resnet --solvers exact,approx --repeat 3

Writes bench-results/masks.json and masks.csv. Ratios are measured side by side in this run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from nmtrain.sparsity import (kept_share, list_solvers, nm_mask, pruned_magnitude, tile_scores, to_matrix,
                              transposable_mask)
from nmtrain.sparsity.fused import nm4_mask
from nmtrain.sparsity.solvers import batched, compiled, get_solver
from nmtrain.sparsity.solvers.enumerate import enumerable
from nmtrain.sparsity.solvers.greedy import vectorised_approx


def rowwise_path(w: torch.Tensor, n: int, m: int) -> str:
    """Which code made `nm_mask`'s row-wise mask of ``w``: at M = 4 on a CPU, up to `fused.MAX_ENTRIES` entries,
    a compiled pass far faster than torch's ``topk`` (so a ratio to it reads much higher than one to ``topk``)."""
    # asked on the GEMM view, as `nm_mask` serves any layout: the answer depends on size, type and device alone
    return "compiled N:4 kernel" if m == 4 and nm4_mask(to_matrix(w), n) is not None else "torch topk"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int):
    """Best of `repeat` runs (after one warm-up run when repeating)."""
    result = fn()
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    if repeat == 0:
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = time.perf_counter() - start
    return result, best


def weights(device: str, sizes: list[int]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {f"{size}x{size} randn": torch.randn(size, size) for size in sizes}
    layer4 = torchvision.models.resnet50().layer4  # random init: the shapes are what matter here
    out["resnet50 layer4.0.conv2 512x512x3x3"] = layer4[0].conv2.weight.detach().clone()
    out["resnet50 layer4.0.conv3 2048x512x1x1"] = layer4[0].conv3.weight.detach().clone()
    out["resnet50 layer4.1.conv1 512x2048x1x1"] = layer4[1].conv1.weight.detach().clone()
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patterns", default="2:4,4:8,8:16,16:32", help="comma-separated N:M (all run transposable)")
    parser.add_argument("--flow-tiles", type=int, default=200, help="tiles the networkx flow solver runs on")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (best is kept)")
    parser.add_argument("--sizes", default="4096", help="comma-separated sides of the square random weights")
    parser.add_argument("--solvers", default="", help="comma-separated solvers to time (exact and approx always run)")
    parser.add_argument("--no-resnet", action="store_true", help="only the square weights")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    console = Console(width=160)
    device = args.device
    rows = []
    solvers = [s.name for s in list_solvers() if s.name != "flow"]
    if args.solvers:
        wanted = args.solvers.split(",")
        solvers = [s for s in solvers if s in wanted or s in ("exact", "approx")]     # the ratios need both
    chosen = weights(device, [int(x) for x in args.sizes.split(",")])
    if args.no_resnet:
        chosen = {k: v for k, v in chosen.items() if not k.startswith("resnet50")}
    for wname, w in chosen.items():
        for text in args.patterns.split(","):
            n, m = (int(x) for x in text.split(":"))
            base, t_row = timed(lambda: nm_mask(w, n, m), device, args.repeat)
            rows.append(dict(weight=wname, pattern=f"{n}:{m}", solver="row-wise top-k (not -T)", seconds=t_row,
                             note=rowwise_path(w, n, m), kept=kept_share(w, base)))
            masks = {}
            for solver in solvers:
                if solver == "enumerate" and not enumerable(m, n):
                    continue
                masks[solver], t = timed(lambda: transposable_mask(w, n, m, solver=solver), device, args.repeat)
                note = ""
                if solver == "compiled" or (solver in ("exact", "approx") and device == "cpu" and not enumerable(m, n)):
                    note = f"flow fallback tiles: {compiled.stats['fallback']}"
                elif solver == "batched" or (solver == "exact" and not enumerable(m, n)):
                    note = f"flow fallback tiles: {batched.stats['fallback']}"
                rows.append(dict(weight=wname, pattern=f"{n}:{m}-T", solver=solver, seconds=t, note=note,
                                 kept=kept_share(w, masks[solver])))
                if solver == "approx" and device == "cpu" and (not args.solvers or "tensor" in args.solvers):
                    tiles = tile_scores(w, m)
                    keep, t = timed(lambda: vectorised_approx(tiles, n), device, args.repeat)
                    rows.append(dict(weight=wname, pattern=f"{n}:{m}-T", solver="approx (tensor path)", seconds=t,
                                     note="the GPU's code path", kept=float((tiles * keep).sum() / tiles.sum())))
            # networkx flow on a subset of tiles, extrapolated
            scores = tile_scores(w, m)
            pick = torch.randperm(scores.shape[0], generator=torch.Generator().manual_seed(0))[:args.flow_tiles]
            sub = scores[pick.to(scores.device)]
            flow_keep, t_flow = timed(lambda: get_solver("flow").fn(sub, n), device, 0)
            exact_sub = tile_scores(masks["exact"].to(w.dtype), m)[pick.to(scores.device)].bool()
            gap_flow = (pruned_magnitude(sub, exact_sub) - pruned_magnitude(sub, flow_keep)).sum().item()
            rows.append(dict(weight=wname, pattern=f"{n}:{m}-T", solver="flow (networkx)",
                             seconds=t_flow * scores.shape[0] / sub.shape[0],
                             note=f"extrapolated from {sub.shape[0]} of {scores.shape[0]} tiles; "
                                  f"exact - flow pruned |W| on them: {gap_flow:+.2e}", kept=None))
            optimum = kept_share(w, masks["exact"])
            t_approx = next(r["seconds"] for r in rows if r["weight"] == wname and r["pattern"] == f"{n}:{m}-T"
                            and r["solver"] == "approx")
            for row in rows:
                if row["weight"] == wname and row["pattern"].startswith(f"{n}:{m}"):
                    row["rowwise_seconds"] = t_row
                    row["approx_seconds"] = t_approx
                    row["optimum_kept"] = optimum
            console.print(f"{wname} {n}:{m} done", style="dim")
    for row in rows:
        row["x_rowwise"] = row["seconds"] / row["rowwise_seconds"]
        row["x_approx"] = row["seconds"] / row["approx_seconds"]
        row["gap_to_optimum"] = None if row["kept"] is None else (row["optimum_kept"] - row["kept"]) / row["optimum_kept"]

    title = f"mask solvers on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}, " \
            f"{torch.get_num_threads()} threads, torch {torch.__version__})"
    table = Table(title=title)
    for col in ("weight", "pattern", "solver", "seconds", "x row-wise", "x approx", "|W| kept", "gap to optimum", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["weight"], r["pattern"], r["solver"], f"{r['seconds']:.4g}", f"{r['x_rowwise']:.2f}",
                      f"{r['x_approx']:.2f}",
                      "" if r["kept"] is None else f"{r['kept']:.5f}",
                      "" if r["gap_to_optimum"] is None else f"{r['gap_to_optimum'] * 100:.3f}%", r["note"])
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "masks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(out / "masks.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out / 'masks.json'} and {out / 'masks.csv'}")


if __name__ == "__main__":
    main()
