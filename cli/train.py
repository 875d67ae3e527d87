"""`nmtrain train`: run a YAML experiment spec (default: the quick Fashion-MNIST spec)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..experiments.spec import SPECS_DIR, apply_overrides, from_dict, read_yaml, Spec
from ..sparsity import parse_pattern
from .console import console
from .errors import UsageError, user_errors

DEFAULT_SPEC = SPECS_DIR / "fmnist_quick.yaml"


def resolve_spec(args: list[str], method: str | None, pattern: str | None, out: Path | None) -> Spec:
    """SPEC file (optional, first) + dotted overrides + the flag shortcuts, as one validated Spec."""
    spec_path: Path | None = None
    overrides = list(args)
    if overrides and "=" not in overrides[0]:
        spec_path = Path(overrides.pop(0))
    for o in overrides:
        if "=" not in o:
            raise UsageError(f"argument {o!r}: after the spec, arguments are key.sub=value overrides")
    data = read_yaml(spec_path or DEFAULT_SPEC)
    # Flags first, so that overrides can set the new method's parameters (--method bimask method.params.iter=50).
    if method is not None:
        section = data.setdefault("method", {})
        if section.get("name") != method:   # the spec's parameters belong to its own method
            section["params"] = {}
        section["name"] = method
    if pattern is not None:
        p = parse_pattern(pattern)
        data.setdefault("sparsity", {}).update(pattern=f"{p.n}:{p.m}")
        if p.transposable:
            data["sparsity"]["transposable"] = True
    if out is not None:
        data["out"] = str(out)
    data = apply_overrides(data, overrides)
    return from_dict(Spec, data)


@user_errors
def train(
    args: Optional[List[str]] = typer.Argument(None, metavar="[SPEC.yaml] [KEY.SUB=VALUE]...",
                                               help="A YAML spec (default: the quick Fashion-MNIST spec), then dotted overrides like optim.lr=0.05."),
    method: Optional[str] = typer.Option(None, help="Training method: dense, unstructured, fixed, srste, transposable (resets method.params)."),
    pattern: Optional[str] = typer.Option(None, help="N:M pattern, N kept of every M (2:4 = density 0.50); N:M-T for transposable."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: the spec's `out`)."),
    overwrite: bool = typer.Option(False, help="Replace a run already in the run directory."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Train a network with an N:M sparse method; writes config.yaml, metrics.jsonl, checkpoint.pt, model.pt, summary.json."""
    from ..experiments.runner import train as run_training

    spec = resolve_spec(args or [], method, pattern, out)
    result = run_training(spec, overwrite=overwrite, console=console, progress=progress)
    console.print(f"run directory: {result.out}")
