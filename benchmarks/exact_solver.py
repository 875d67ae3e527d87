"""Time row-wise top-k, ``approx`` and the batched ``exact`` solver on one matrix and ResNet-50 conv shapes.

Usage: python benchmarks/exact_solver.py [--size 4096] [--patterns 2:4,4:8,8:16,16:32] [--device cpu]
Prints seconds and kept-magnitude share per solver, plus the batched solver's counters
(rounds, cancelled cycles, tiles that needed the flow fallback). All timings come from the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from nmtrain.sparsity import nm_mask, transposable_mask
from nmtrain.sparsity.solvers import batched


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _share(w: torch.Tensor, keep: torch.Tensor) -> float:
    return float((w.abs() * keep).sum() / w.abs().sum())


def bench(name: str, w: torch.Tensor, n: int, m: int) -> None:
    rowwise, t_row = _timed(lambda: nm_mask(w, n, m))
    approx, t_approx = _timed(lambda: transposable_mask(w, n, m, solver="approx"))
    exact, t_exact = _timed(lambda: transposable_mask(w, n, m, solver="exact"))
    print(f"{name:>22} {n}:{m}-T  rowwise {t_row:6.2f}s ({_share(w, rowwise):.4f})  "
          f"approx {t_approx:6.2f}s ({_share(w, approx):.4f})  exact {t_exact:6.2f}s ({_share(w, exact):.4f})  "
          f"exact/approx {t_exact / t_approx:4.2f}  batched stats {batched.stats}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--patterns", default="2:4,4:8,8:16,16:32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-conv", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    w = torch.randn(args.size, args.size, device=args.device)
    for pattern in args.patterns.split(","):
        n, m = map(int, pattern.split(":"))
        bench(f"{args.size}x{args.size}", w, n, m)
    if not args.no_conv:
        for shape in [(2048, 512, 1, 1), (512, 2048, 1, 1), (512, 512, 3, 3)]:
            conv = torch.randn(shape, device=args.device) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
            for n, m in [(2, 4), (4, 8)]:
                bench("x".join(map(str, shape)), conv, n, m)


if __name__ == "__main__":
    main()
