"""Training time with real 2:4 sparse kernels (`accel: semi_structured`) against dense, on one GPU.

Three measurements, in one run, every variant of a case interleaved with the others (A, B, C, A, B, C,
...) so clock and thermal drift hit them alike; each timing is one forward + backward on the GPU's
clock (CUDA events), after warm-up, and the median of the repeats is reported:

1. per layer: square Linear layers (default 2048, 4096, 8192, 16384) on ``--tokens`` rows;
2. a transformer MLP block, d -> 4d -> GELU -> d (default d = 2048, 4096, 8192);
3. one end-to-end training step of a small ViT (forward, loss, backward, optimizer step), dense
   against the transposable method with and without ``accel: semi_structured``.

Variants of 1 and 2: ``dense`` (plain bf16 GEMMs: the baseline of the >= 1.3x target), ``masked``
(today's transposable path: W * mask, dense GEMMs), ``sparse`` (forward and backward-data on the 2:4
kernels, dense dW; W~ and W~^T compressed again every step, as training does after each optimizer
step) and ``sparse cached`` (the same without the compression: the kernels alone). The sparse
outputs and gradients are also compared with the masked-dense ones (relative error).

    python benchmarks/sparse_training.py                      # 23 s on an H100 (2026-12-06)
    python benchmarks/sparse_training.py --sizes 4096,16384 --tokens 16384 --repeats 30
    python benchmarks/sparse_training.py --e2e none           # layers and MLP blocks only

Results: a table, and ``OUT/sparse_training.json`` and ``OUT/sparse_training.csv``. Without a GPU
that can run the 2:4 kernels it prints why and exits with code 0.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from nmtrain.experiments import accel
from nmtrain.experiments.layers import plan_layers
from nmtrain.experiments.methods import attach
from nmtrain.experiments.methods.ste import ste_mask
from nmtrain.experiments.models import VisionTransformer
from nmtrain.sparsity import Pattern, nm_violation

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ("device", "torch", "case", "size", "tokens", "dense_ms", "masked_ms", "sparse_ms", "sparse_cached_ms",
           "speedup", "speedup_cached", "rel_err")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=8192, help="rows of the activation (batch x sequence)")
    parser.add_argument("--sizes", type=_ints, default=[2048, 4096, 8192, 16384], help="square Linear sizes")
    parser.add_argument("--mlp-dims", type=_ints, default=[2048, 4096, 8192], help="d of the d-4d-d MLP blocks")
    parser.add_argument("--e2e", choices=("vit", "none"), default="vit", help="end-to-end training step model")
    parser.add_argument("--vit-dim", type=int, default=1024)
    parser.add_argument("--vit-depth", type=int, default=4)
    parser.add_argument("--vit-batch", type=int, default=64, help="images of 224x224, 196 patches each")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench-results")
    return parser.parse_args(argv)


# --- timing -----------------------------------------------------------------------------------


def time_interleaved(variants: dict[str, tuple[Callable[[], None], Callable[[], None]]], warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median ms of each ``run`` on the GPU clock; ``prepare`` (clearing grads) runs untimed before it."""
    events: dict[str, list] = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, (prepare, run) in variants.items():
            prepare()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            if i >= warmup:
                events[name].append((start, end))
        torch.cuda.synchronize()        # keep the queue short: one round at a time
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}


# --- operands -------------------------------------------------------------------------------


def _tile_patterns() -> torch.Tensor:
    """The 90 4x4 0/1 tiles with two ones in every row and every column."""
    rows = [r for r in itertools.product((0, 1), repeat=4) if sum(r) == 2]
    tiles = [t for t in itertools.product(rows, repeat=4) if all(sum(col) == 2 for col in zip(*t))]
    return torch.tensor(tiles, dtype=torch.bool)                # (90, 4, 4)


def random_transposable_mask(rows: int, cols: int, device) -> torch.Tensor:
    """A transposable 2:4 mask, a random valid tile per 4x4 block (the kernels' speed ignores which)."""
    tiles = _tile_patterns().to(device)
    pick = torch.randint(len(tiles), (rows // 4, cols // 4), device=device)
    mask = tiles[pick].permute(0, 2, 1, 3).reshape(rows, cols)
    assert nm_violation(mask, Pattern(2, 4, True)) is None
    return mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class _Stack:
    """A chain of Linear layers (one for the per-layer case, two with a GELU for the MLP block), each
    run dense, masked dense or sparse on the same weights and inputs."""

    def __init__(self, shapes: list[tuple[int, int]], tokens: int, dtype, device, bias: bool):
        self.weights = [(torch.randn(o, i, device=device) / i ** 0.5).to(dtype).requires_grad_() for o, i in shapes]
        self.biases = [torch.zeros(o, device=device, dtype=dtype).requires_grad_() if bias else None
                       for o, _ in shapes]
        self.masks = [random_transposable_mask(o, i, device) for o, i in shapes]
        self.layers = [accel.SparseLinear(dtype) for _ in shapes]
        self.x = torch.randn(tokens, shapes[0][1], device=device, dtype=dtype).requires_grad_()
        self.dy = torch.randn(tokens, shapes[-1][0], device=device, dtype=dtype)

    def clear(self) -> None:
        self.x.grad = None
        for p in (*self.weights, *self.biases):
            if p is not None:
                p.grad = None

    def forward(self, mode: str) -> torch.Tensor:
        h = self.x
        for k, (w, b, mask, layer) in enumerate(zip(self.weights, self.biases, self.masks, self.layers)):
            if k:
                h = F.gelu(h)
            if mode == "dense":
                h = F.linear(h, w, b)
            elif mode == "masked":
                h = F.linear(h, ste_mask(w, mask, 2e-4), b)
            else:
                if mode == "sparse":
                    layer.invalidate()          # as after an optimizer step: compress W~ and W~^T again
                h = layer(h, w, b, mask, 2e-4)
        return h

    def step(self, mode: str) -> None:
        self.forward(mode).backward(self.dy)

    def grads(self, mode: str) -> list[torch.Tensor]:
        self.clear()
        y = self.forward(mode)
        y.backward(self.dy)
        return [y.detach().clone(), self.x.grad.clone(), *(w.grad.clone() for w in self.weights)]

    def time(self, warmup: int, repeats: int) -> tuple[dict[str, float], float]:
        err = max(_rel(a, b) for a, b in zip(self.grads("sparse"), self.grads("masked")))
        variants = {mode: (self.clear, lambda mode=mode: self.step(mode))
                    for mode in ("dense", "masked", "sparse", "sparse cached")}
        ms = time_interleaved(variants, warmup, repeats)
        assert all(layer.compressions > 0 for layer in self.layers), "the sparse path did not run"
        return ms, err


# --- the end-to-end model: the registry's ViT (experiments/models.py) at 224 px ----------------------


def time_e2e(args, dtype, device) -> tuple[dict[str, float], int, int]:
    """Median ms of one training step for dense, transposable and transposable + semi_structured."""
    images = torch.randn(args.vit_batch, 3, 224, 224, device=device, dtype=dtype)
    labels = torch.randint(0, 1000, (args.vit_batch,), device=device)
    with ExitStack() as attached:      # every model's forward runs through its method while it is timed
        runs = {variant: _attached_vit(method, mode, args, dtype, device, attached)
                for variant, method, mode in (("dense", "dense", "none"), ("transposable", "transposable", "none"),
                                              ("transposable+accel", "transposable", "semi_structured"))}
        return _time_vit(runs, images, labels, args)


def _attached_vit(name: str, mode: str, args, dtype, device, attached: ExitStack) -> tuple:
    """(model, method, optimizer, sparse layers) of one variant, attached until ``attached`` closes."""
    torch.manual_seed(0)
    model = VisionTransformer(1000, 3, 224, args.vit_dim, args.vit_depth, patch=16).to(device=device, dtype=dtype)
    layers = plan_layers(model, Pattern(2, 4, True), "nhwc").sparse     # first and last layer dense
    method = attached.enter_context(attach(name, layers, Pattern(2, 4, True), total_steps=1000,
                                           steps_per_epoch=1000, accel=mode))
    method.before_step(0)       # the first (exact) masks, outside the timed steps
    if mode == "semi_structured" and method.accel.fallback:
        raise SystemExit(f"sparse_training: e2e layers fell back: {method.accel.fallback}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, method, opt, len(method.ctx.layers)


def _time_vit(runs: dict, images: torch.Tensor, labels: torch.Tensor, args) -> tuple[dict[str, float], int, int]:
    """Median ms of one training step of every attached run, interleaved."""
    def step(variant: str) -> None:
        model, method, opt, _ = runs[variant]
        i = 1               # a step that recomputes no mask (transposable: every mask_interval = 40 steps)
        method.before_step(i)
        loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        method.after_backward(i)
        opt.step()
        method.after_step(i)

    def prepare(variant: str) -> Callable[[], None]:
        return lambda: runs[variant][2].zero_grad(set_to_none=True)

    ms = time_interleaved({v: (prepare(v), lambda v=v: step(v)) for v in runs}, args.warmup, args.repeats)
    tokens = args.vit_batch * (224 // 16) ** 2
    return ms, len(runs["transposable+accel"][1].accel.sparse), tokens


# --- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=140)
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    smallest = min([*args.sizes, *args.mlp_dims, args.vit_dim] or [2048])
    reason = accel.linear_unsupported(smallest, smallest, device, dtype)
    if reason is not None:
        print(f"sparse_training: the 2:4 sparse path cannot run on {device}: {reason}; nothing measured")
        return 0
    name = torch.cuda.get_device_name(device)
    backend = accel.backend_name()
    common = {"device": name, "torch": torch.__version__}
    rows: list[dict] = []
    started = time.perf_counter()

    def add(case: str, size: str, tokens: int, ms: dict[str, float], err: float | None,
            names=("dense", "masked", "sparse", "sparse cached")) -> None:
        dense, masked, sparse, cached = (ms.get(n) for n in names)
        rows.append({**common, "case": case, "size": size, "tokens": tokens, "dense_ms": dense, "masked_ms": masked,
                     "sparse_ms": sparse, "sparse_cached_ms": cached, "speedup": dense / sparse,
                     "speedup_cached": dense / cached if cached else None, "rel_err": err})

    for d in args.sizes:
        stack = _Stack([(d, d)], args.tokens, dtype, device, bias=False)
        ms, err = stack.time(args.warmup, args.repeats)
        add("linear fwd+bwd", f"{d}x{d}", args.tokens, ms, err)
        del stack
        torch.cuda.empty_cache()
    for d in args.mlp_dims:
        stack = _Stack([(4 * d, d), (d, 4 * d)], args.tokens, dtype, device, bias=True)
        ms, err = stack.time(args.warmup, args.repeats)
        add("MLP block fwd+bwd", f"{d}-{4 * d}-{d}", args.tokens, ms, err)
        del stack
        torch.cuda.empty_cache()
    if args.e2e == "vit":
        ms, n_sparse, tokens = time_e2e(args, dtype, device)
        add(f"ViT train step ({n_sparse} sparse layers)", f"d={args.vit_dim} x{args.vit_depth}", tokens, ms,
            None, names=("dense", "transposable", "transposable+accel", None))

    table = Table(title=f"2:4 sparse training, {name}, torch {torch.__version__}, {backend}, {args.dtype}, "
                        f"median of {args.repeats} interleaved repeats (ms)")
    for col in ("case", "size", "tokens", "dense", "masked", "sparse", "sparse cached", "dense/sparse",
                "dense/cached", "rel err"):
        table.add_column(col, justify="left" if col in ("case", "size") else "right")

    def fmt(v, spec=".2f", suffix=""):
        return "–" if v is None else f"{v:{spec}}{suffix}"
    for r in rows:
        table.add_row(r["case"], r["size"], str(r["tokens"]), fmt(r["dense_ms"]), fmt(r["masked_ms"]),
                      fmt(r["sparse_ms"]), fmt(r["sparse_cached_ms"]), fmt(r["speedup"], suffix="x"),
                      fmt(r["speedup_cached"], suffix="x"), fmt(r["rel_err"], ".1e"))
    console.print(table)
    console.print("masked = W*mask on dense GEMMs (transposable today); sparse = 2:4 kernels for forward and "
                  "backward-data, W~ and W~^T compressed every step; cached = the same without compression. "
                  "ViT row: masked = transposable, sparse = transposable + accel semi_structured.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**common, "capability": list(torch.cuda.get_device_capability(device)), "backend": backend,
            "cusparselt": torch.backends.cusparselt.version(), "dtype": args.dtype,
            "args": {k: v for k, v in vars(args).items()}, "seconds": time.perf_counter() - started}
    (out / "sparse_training.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    with open(out / "sparse_training.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out / 'sparse_training.json'} and {out / 'sparse_training.csv'} "
                  f"({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
