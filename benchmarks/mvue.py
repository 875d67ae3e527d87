"""The MVUE 2:4 weight-gradient sample's parts, each against what it replaced, side by side in one run.

Masked decay (and ``mvue_dw: true``) samples every sparse layer's ``dYᵀ`` in every step. Per shape, the
two sides of each row run alternately, best of ``--repeat``:

- ``draws``: the uniforms, `sparsity.uniform.uniforms` against ``torch.rand`` (the same numbers);
- ``linear``: ``mvue24`` of a Linear's ``dYᵀ`` (a transposed view of dY (tokens, C_out)), the compiled
  kernel against the tensor formula (the kernel switched off; what served above 1M entries before the
  kernel took any size), the draws (`uniforms`) included on both sides;
- ``conv``: a conv's ``dY`` (B, C, H, W) sampled for its weight gradient, `mvue24_by_channel` (in place,
  in dY's layout) against ``mvue24`` of the transposed copy (C, B·H·W), transposed back and made
  contiguous (as ``convolution_backward`` needs it): the copies it saves, the kernels otherwise the same.

Every pair is checked to give the same numbers before it is timed. The shapes default to the GPT's,
ViT-Tiny's and ResNet-20's layers (the benchmarks in ``train_step.py``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/mvue.py
    python benchmarks/mvue.py --linear 512x1024 --conv 128x16x8x8 --repeat 5 --out bench-results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from nmtrain.sparsity import mvue, mvue24, mvue24_by_channel
from nmtrain.sparsity.uniform import uniforms

LINEAR = "384x1024,512x1024,576x2176,768x6400"          # C_out x tokens: GPT qkv and MLP, ViT-Tiny's
CONV = "64x16x32x32,64x32x16x16,64x64x8x8,128x16x8x8"    # B x C x H x W: ResNet-20's stages, LeNet-5's conv


def _dims(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in item.split("x")) for item in text.split(",") if item]


def _best(pair: dict, repeat: int) -> dict[str, float]:
    """Each side's best time of ``repeat`` calls, in ms, the sides called alternately."""
    best = {side: float("inf") for side in pair}
    for _ in range(repeat):
        for side, call in pair.items():
            start = time.perf_counter()
            call()
            best[side] = min(best[side], (time.perf_counter() - start) * 1e3)
    return best


def _formula(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with mock.patch.object(mvue, "mvue24_sample", lambda *args: None):    # the compiled kernel declines
        return mvue24(x, generator)


def _transposed(dy: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    c = dy.shape[1]
    sampled = mvue24(dy.transpose(0, 1).reshape(c, -1), generator)
    return sampled.reshape(c, dy.shape[0], *dy.shape[2:]).transpose(0, 1).contiguous()


def _same(first, second) -> bool:
    """Both sides' results from generators seeded alike: equal, bit for bit."""
    a, b = first(torch.Generator().manual_seed(0)), second(torch.Generator().manual_seed(0))
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _row(kind: str, shape: tuple[int, ...], new, old, repeat: int) -> dict:
    if not _same(new, old):
        raise SystemExit(f"error: {kind} {shape}: the two sides sampled different numbers")
    gen = torch.Generator().manual_seed(1)
    best = _best({"new": lambda: new(gen), "old": lambda: old(gen)}, repeat)
    return {"kind": kind, "shape": "x".join(map(str, shape)), "new_ms": best["new"], "old_ms": best["old"],
            "ratio": best["new"] / best["old"]}


def measure(args) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for c_out, tokens in _dims(args.linear):
        dy_t = torch.randn(tokens, c_out).t()           # dYᵀ: a transposed view, as the weight gradient has it
        rows.append(_row("draws", (c_out, tokens // 4, 2), lambda g, s=(c_out, tokens // 4, 2): uniforms(s, g),
                         lambda g, s=(c_out, tokens // 4, 2): torch.rand(s, generator=g), args.repeat))
        rows.append(_row("linear", (c_out, tokens), lambda g, x=dy_t: mvue24(x, g),
                         lambda g, x=dy_t: _formula(x, g), args.repeat))
    for shape in _dims(args.conv):
        dy = torch.randn(shape)
        rows.append(_row("conv", shape, lambda g, d=dy: mvue24_by_channel(d, g),
                         lambda g, d=dy: _transposed(d, g), args.repeat))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linear", default=LINEAR, help="C_out x tokens of Linear layers' dYᵀ, comma-separated")
    parser.add_argument("--conv", default=CONV, help="B x C x H x W of conv layers' dY, comma-separated")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    rows = measure(args)
    table = Table(title=f"MVUE 2:4 sample, best of {args.repeat} (threads: {torch.get_num_threads()})")
    for column in ("part", "shape", "new ms", "against ms", "new ÷ against"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["kind"], r["shape"], f"{r['new_ms']:.3f}", f"{r['old_ms']:.3f}", f"{r['ratio']:.2f}x")
    Console(width=140).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mvue.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
