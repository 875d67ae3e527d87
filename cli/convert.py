"""`nmtrain convert`: masked-dense state_dicts <-> compressed N:M safetensors; semi-structured 2:4 on GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .console import console
from .errors import user_errors


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@user_errors
def convert(
    source: Path = typer.Argument(..., help="A run directory (patterns from summary.json), a state_dict (.pt, also "
                                  "torch.nn.utils.prune / mask-buffer ones) or a .safetensors file."),
    to: str = typer.Option(..., help="compressed (N:M values + uint8 indices, safetensors), dense (plain masked "
                           "state_dict .pt) or semi-structured (2:4 Linear weights on a CUDA GPU >= sm80: latency vs dense)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: beside SOURCE)."),
    pattern: Optional[str] = typer.Option(None, help="For a bare state_dict: the N:M pattern its weights hold (N kept of "
                                          "every M); weights that do not satisfy it stay dense."),
    layout: Optional[str] = typer.Option(None, help="For a bare state_dict: conv grouping nhwc (default) or flatten."),
) -> None:
    """Convert between masked-dense, compressed N:M (safetensors) and semi-structured formats."""
    from ..experiments.convert import convert as run_convert
    from ..experiments.semistructured import semi_structured_benchmark
    from ..experiments.io import check_output_file, save_text

    if to == "semi-structured":
        dest = out if out is not None else (source / "semi-structured.json" if source.is_dir()
                                            else source.with_suffix(".semi-structured.json"))
        check_output_file(dest, "--out")            # before the benchmark, not after it
        report = semi_structured_benchmark(source, pattern, layout)
        table = Table(title=f"nmtrain convert → semi-structured 2:4 ({report['device']}, {report['dtype']}, "
                            f"batch {report['batch']})")
        for col in ("layer", "shape", "pattern", "dense", "2:4 sparse", "speedup", "max |diff|"):
            table.add_column(col, justify="left" if col in ("layer", "shape", "pattern") else "right")
        for name, r in report["layers"].items():
            table.add_row(name, "×".join(map(str, r["shape"])), r["pattern"], f"{r['dense_ms']:.4f} ms",
                          f"{r['sparse_ms']:.4f} ms", f"{r['speedup']:.2f}x", f"{r['max_abs_diff']:.2e}")
        console.print(table)
        for name, why in report["skipped"].items():
            console.print(f"skipped {name}: {why}")
        save_text(json.dumps(report, indent=2) + "\n", dest, "--out")
        console.print(f"wrote {dest}")
        return

    rep = run_convert(source, to, out, pattern, layout)
    table = Table(title=f"nmtrain convert → {rep.out}  (--to {to})")
    for col in ("source file", "output file", "tensor bytes dense", "tensor bytes stored", "ratio (dense/stored)",
                "N:M layers"):
        table.add_column(col, justify="right")
    ratio = rep.dense_tensor_bytes / max(rep.stored_tensor_bytes, 1)
    table.add_row(_size(rep.source_bytes), _size(rep.out_bytes), _size(rep.dense_tensor_bytes),
                  _size(rep.stored_tensor_bytes), f"{ratio:.3f}x", str(len(rep.layers)))
    console.print(table)
    if rep.layers:
        layers = Table(title="N:M layers")
        for col in ("tensor", "pattern", "density", "layout"):
            layers.add_column(col)
        for name, fmt in rep.layers.items():
            layers.add_row(name, str(fmt.pattern), f"{fmt.pattern.density:.2f}", fmt.layout)
        console.print(layers)
    for note in rep.imported:
        console.print(f"imported mask: {note}")
    if rep.negzero_canonicalised:
        console.print(f"note: {rep.negzero_canonicalised} pruned entries held -0.0 and are stored as +0.0 (equal values)")
    console.print(f"file size ratio (source/output): {rep.source_bytes / max(rep.out_bytes, 1):.3f}x; wrote {rep.out}")
