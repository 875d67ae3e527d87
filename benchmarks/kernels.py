"""The compiled N:4 mask kernels that SR-STE, S-STE, PGF and Bi-Mask run on every layer at every step, timed per
call on the layers of the benchmark models, and against the code of another checkout side by side.

Each kernel is one call of `sparsity.fused`'s (one thread: the kernels are serial; `threads.split_map` shares a
step's layers between two):

- ``masked``: `nm4_masked`, the row-wise N:4 mask and ``W * mask`` (SR-STE's forward weight);
- ``decayed``: `nm4_decayed`, the mask and PGF's ``where(mask, W, W * value)``;
- ``soft``: `soft_threshold4`, S-STE's ``beta * S(W)``;
- ``bimask``: `bimask_operands4`, Bi-Mask's four operands (row-wise mask and product, the column-wise mask of
  the permuted rows and its product);
- ``conv``: `nm4_masked` of an ``nhwc`` conv's weight (its groups along C_in, read where they lie).

``--before PATH`` attaches the same kernels from the ``nmtrain`` of PATH (another checkout, as
``train_step.py --before`` takes it), checks that both give the same bits on the shape's weight, and times the two
alternately, call by call: the median of ``--repeat`` calls each and their ratio, now ÷ before. Warm (the weight
in cache, the code hot): what a kernel costs of itself, not what it costs inside a training step, where the
weights come from memory (docs/speed.md, the twenty-first session).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels.py
    git worktree add /tmp/before <commit>
    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernels.py --before /tmp/before --out bench-results
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import BEFORE_PACKAGE, before_package  # noqa: E402  (a script beside this one)

from nmtrain.sparsity import fused  # noqa: E402

# C_out x K of the GPT's (qkv, proj, fc, fc-proj), ViT-Tiny's and LeNet-5's first fully connected layer
MATRICES = "384x128,128x128,512x128,128x512,576x192,768x192,192x768,120x400"
CONVS = "64x64x3x3,32x32x3x3"          # ResNet-20's stages' convs (C_out x C_in x kh x kw), nhwc groups


def _shapes(rank: int):
    """An argparse type: comma-separated shapes of ``rank`` dimensions that every kernel serves (their groups of 4
    along K, and for Bi-Mask's column-wise groups of 4 rows, whole; at most `fused.MAX_ENTRIES` entries)."""
    def parse(text: str) -> list[tuple[int, ...]]:
        shapes = []
        for item in filter(None, text.split(",")):
            try:
                shape = tuple(int(d) for d in item.split("x"))
            except ValueError:
                shape = ()
            if len(shape) != rank or min(shape) < 1:
                raise argparse.ArgumentTypeError(f"{item!r} is not {rank} positive sizes joined by 'x'")
            if shape[0] % 4 or shape[1] % 4 or np.prod(shape) > fused.MAX_ENTRIES:
                raise argparse.ArgumentTypeError(f"{item}: its first two sizes must be multiples of 4 and its "
                                                 f"entries at most {fused.MAX_ENTRIES}, where the kernels serve")
            shapes.append(shape)
        return shapes
    return parse


def _calls(module, weight: torch.Tensor, perm: torch.Tensor, n: int) -> dict:
    """The kernels of ``module`` (a `sparsity.fused`) on ``weight``, by name: each a call that returns what it
    makes; a kernel that ``module`` does not have (an older checkout's) is left out."""
    value = torch.tensor(0.37, dtype=torch.float64)
    scale = torch.tensor(0.73, dtype=weight.dtype)
    wanted = ({"conv": ("nm4_masked", (weight, n))} if weight.dim() == 4 else
              {"masked": ("nm4_masked", (weight, n)), "decayed": ("nm4_decayed", (weight, n, value)),
               "soft": ("soft_threshold4", (weight, n, scale)), "bimask": ("bimask_operands4", (weight, perm, n))})
    return {name: (lambda fn=getattr(module, function), args=args: fn(*args))
            for name, (function, args) in wanted.items() if hasattr(module, function)}


def _bits(made) -> list[bytes]:
    """What a kernel made, as bytes (None where it did not serve)."""
    items = made if isinstance(made, tuple) else (made,)
    return [b"none" if t is None else t.contiguous().numpy().view(np.uint8).tobytes() for t in items]


def _medians(calls: dict, repeat: int) -> dict[str, float]:
    """Each side's median µs per call over ``repeat`` calls, the sides called alternately, after a warm-up call
    each."""
    times: dict[str, list[float]] = {side: [] for side in calls}
    for call in calls.values():
        call()
    for _ in range(repeat):
        for side, call in calls.items():
            start = time.perf_counter()
            call()
            times[side].append(time.perf_counter() - start)
    return {side: statistics.median(spent) * 1e6 for side, spent in times.items()}


def run(args) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the kernels are serial; torch's own calls around them then are too
    try:
        return _rows(args)
    finally:
        torch.set_num_threads(threads)


def _rows(args) -> list[dict]:
    old = importlib.import_module(f"{BEFORE_PACKAGE}.sparsity.fused") if args.before else None
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.matrices + args.convs:
        weight = torch.randn(shape, generator=g)
        perm = torch.randperm(shape[0], generator=g)
        now = _calls(fused, weight, perm, args.n)
        before = _calls(old, weight, perm, args.n) if old is not None else {}
        for name, call in now.items():
            row = {"kernel": name, "shape": "x".join(map(str, shape)), "entries": weight.numel()}
            sides = {"now": call}
            if name in before:          # (an older checkout may not have it)
                if _bits(call()) != _bits(before[name]()):
                    raise SystemExit(f"{name} on {row['shape']}: this code and --before make different bits")
                sides["before"] = before[name]
                row["same_bits"] = True
            medians = _medians(sides, args.repeat)
            row["us"], row["ns_per_entry"] = medians["now"], medians["now"] * 1e3 / weight.numel()
            if "before" in medians:
                row["before_us"], row["vs_before"] = medians["before"], medians["now"] / medians["before"]
            rows.append(row)
    return rows


def _report(rows: list[dict], args) -> None:
    table = Table(title=f"N:4 kernels, {args.n}:4, one thread, median of {args.repeat} calls"
                  + (f", against {args.before}" if args.before else ""))
    columns = ["kernel", "shape", "µs / call", "ns / entry"] + (["before µs", "now ÷ before", "same bits"]
                                                                 if args.before else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("kernel", "shape") else "right")
    for row in rows:
        cells = [row["kernel"], row["shape"], f"{row['us']:.1f}", f"{row['ns_per_entry']:.3f}"]
        if args.before:
            cells += ([f"{row['before_us']:.1f}", f"{row['vs_before']:.3f}", "yes"] if "vs_before" in row
                      else ["–", "–", "–"])        # not in the code before
        table.add_row(*cells)
    Console().print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "kernels.json.tmp"
        tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        tmp.replace(out / "kernels.json")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrices", type=_shapes(2), default=MATRICES,
                        help="C_out x K of each matrix, comma-separated")
    parser.add_argument("--convs", type=_shapes(4), default=CONVS,
                        help="C_out x C_in x kh x kw of each nhwc conv, comma-separated")
    parser.add_argument("--n", type=int, default=2, choices=(1, 2, 3), help="N of N:4")
    parser.add_argument("--repeat", type=int, default=300, help="calls timed per kernel and side")
    parser.add_argument("--before", default=None, help="a checkout (or installed nmtrain/) to time against")
    parser.add_argument("--out", default=None, help="folder for kernels.json")
    args = parser.parse_args(argv)
    if fused.njit is None:
        parser.error("numba is not installed: there are no compiled kernels to time")
    if args.before and before_package(Path(args.before)) is None:
        parser.error(f"--before: no nmtrain checkout or installed nmtrain/ at {args.before}")
    rows = run(args)
    _report(rows, args)
    return rows


if __name__ == "__main__":
    main()
