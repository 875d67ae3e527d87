"""`nmtrain train`: run a YAML experiment spec (default: the quick Fashion-MNIST spec)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

from .choices import METHODS
from .console import console
from .errors import UsageError, user_errors

if TYPE_CHECKING:
    from ..experiments.spec import Spec

DEFAULT_SPEC_NAME = "fmnist_quick.yaml"     # in experiments/specs/
# --nproc: at most this many processes on one machine (a node has 8 or 16 GPUs; a million would be a
# fork bomb). `check_launch` also holds it to one GPU per process on CUDA.
MAX_NPROC = 64


# SPEC and the overrides are two arguments (of train and compare), so that usage reads
# `[SPEC.yaml] [KEY.SUB=VALUE]...`; a first argument with '=' in it is an override all the same
# (`spec_args`, then `_split_args`).
def spec_argument():
    return typer.Argument(None, metavar="SPEC.yaml", show_default=False,
                          help="A YAML spec (default: the quick Fashion-MNIST spec, experiments/specs/fmnist_quick.yaml).")


def overrides_argument():
    return typer.Argument(None, metavar="KEY.SUB=VALUE", show_default=False,
                          help="Dotted overrides of the spec, like optim.lr=0.05 (type-checked).")


def spec_args(spec: str | None, overrides: list[str] | None) -> list[str]:
    return ([spec] if spec is not None else []) + list(overrides or [])


def _split_args(args: list[str]) -> tuple[Path | None, list[str]]:
    spec_path: Path | None = None
    overrides = list(args)
    if overrides and "=" not in overrides[0]:
        spec_path = Path(overrides.pop(0))
    for o in overrides:
        if "=" not in o:
            raise UsageError(f"argument {o!r}: after the spec, arguments are key.sub=value overrides")
    return spec_path, overrides


def resolve_spec(args: list[str], method: str | None, pattern: str | None, out: Path | None) -> Spec:
    """SPEC file (optional, first) + dotted overrides + the flag shortcuts, as one validated Spec."""
    from ..experiments.spec import SPECS_DIR
    from ..experiments.yamlfile import read_yaml

    spec_path, overrides = _split_args(args)
    return _apply(read_yaml(spec_path or SPECS_DIR / DEFAULT_SPEC_NAME), overrides, method, pattern, out)


def resume_spec(run_dir: Path, args: list[str], method: str | None, pattern: str | None, out: Path | None) -> Spec:
    """The saved spec of ``run_dir`` (its config.yaml), with ``out`` pointing at ``run_dir``.

    Overrides are accepted only when they leave the saved spec unchanged: a resumed run is the same run."""
    from ..experiments.rundir import CONFIG, RunDir
    from ..experiments.yamlfile import read_yaml

    if not run_dir.is_dir():
        raise UsageError(f"--resume: {run_dir} is not a directory")
    config = RunDir(run_dir).config
    if not config.is_file():
        raise UsageError(f"--resume: {run_dir} holds no run (no {CONFIG}); start it without --resume")
    spec_path, overrides = _split_args(args)
    if spec_path is not None:
        raise UsageError(f"--resume: takes the spec from {config}; drop {spec_path}")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise UsageError(f"--out: {out} differs from --resume {run_dir}; a resumed run stays in its directory")
    saved = read_yaml(config, "--resume")
    spec = _apply(copy.deepcopy(saved), [], None, None, None)
    if overrides or method is not None or pattern is not None:
        changed = _apply(copy.deepcopy(saved), overrides, method, pattern, None)
        if changed != spec:
            what = " ".join([*(["--method"] if method is not None else []),
                             *(["--pattern"] if pattern is not None else []), *overrides])
            raise UsageError(f"--resume: {what} would change the spec saved in {config}; a resumed run keeps "
                             "its spec (start a new run with --out to change it)")
    spec.out = str(run_dir)
    return spec


def _apply(data: dict, overrides: list[str], method: str | None, pattern: str | None, out: Path | None) -> Spec:
    from ..experiments.build import parse_field_pattern
    from ..experiments.spec import Spec, apply_overrides, from_dict

    # Flags first, so that overrides can set the new method's parameters (--method bimask method.params.iter=50).
    if method is not None:
        section = data.setdefault("method", {})
        if section.get("name") != method:   # the spec's parameters belong to its own method
            section["params"] = {}
        section["name"] = method
    if pattern is not None:
        p = parse_field_pattern(pattern, "--pattern")
        data.setdefault("sparsity", {}).update(pattern=f"{p.n}:{p.m}")
        if p.transposable:
            data["sparsity"]["transposable"] = True
    if out is not None:
        data["out"] = str(out)
    data = apply_overrides(data, overrides)
    return from_dict(Spec, data)


@user_errors
def train(
    spec: Optional[str] = spec_argument(),
    overrides: Optional[List[str]] = overrides_argument(),
    method: Optional[str] = typer.Option(None, help="Training method: " + ", ".join(METHODS) + " (resets method.params)."),
    pattern: Optional[str] = typer.Option(None, help="N:M pattern, N kept of every M (2:4 = density 0.50); N:M-T for transposable."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: the spec's `out`)."),
    overwrite: bool = typer.Option(False, help="Replace a run already in the run directory."),
    resume: Optional[Path] = typer.Option(None, metavar="DIR", help="Continue the run in DIR from its checkpoint.pt, with its saved config.yaml."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    nproc: int = typer.Option(1, help="Processes on this machine, launched through torchrun (data.batch_size is the global batch)."),
) -> None:
    """Train a network with an N:M sparse method; writes config.yaml, metrics.jsonl, checkpoint.pt, model.pt, summary.json."""
    from ..experiments.runner import Interrupted, summary_table, train as run_training

    args = spec_args(spec, overrides)
    if resume is not None and overwrite:
        raise UsageError("--resume and --overwrite: choose one (resume continues the run, overwrite replaces it)")
    if nproc != 1:
        raise typer.Exit(code=launch(nproc, args, method, pattern, out, overwrite, resume, progress))

    resolved = _resolve(args, method, pattern, out, resume)
    try:
        result = run_training(resolved, overwrite=overwrite, console=console, progress=progress,
                              resume=resume is not None)
    except Interrupted as stop:
        if stop.checkpoint_step is None:
            print(f"interrupted at step {stop.step} before any checkpoint; start again with the same command",
                  file=sys.stderr)
        else:
            print(f"interrupted at step {stop.step}; checkpoint at step {stop.checkpoint_step} saved; "
                  f"resume with: nmtrain train --resume {stop.out}", file=sys.stderr)
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(code=130) from None
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(summary_table(result.summary))
        console.print(f"run directory: {result.out}")


def _resolve(args: list[str], method: str | None, pattern: str | None, out: Path | None, resume: Path | None) -> Spec:
    """The spec to train: the saved one of the run in ``resume``, else the SPEC file and overrides."""
    if resume is not None:
        return resume_spec(resume, args, method, pattern, out)
    return resolve_spec(args, method, pattern, out)


def torchrun_command(nproc: int, args: list[str], method: str | None, pattern: str | None, out: Path | None,
                     overwrite: bool, resume: Path | None, progress: bool) -> list[str]:
    """``python -m nmtrain.cli.torchrun --standalone --nproc_per_node N -m nmtrain.cli.main train ...``:
    the same command without ``--nproc``; ``--standalone`` rendezvouses on a free loopback port. The
    launcher is torchrun's own, run by `nmtrain.cli.torchrun` for the failed process's exit code."""
    cmd = [sys.executable, "-m", "nmtrain.cli.torchrun", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nmtrain.cli.main", "train", *args]
    for flag, value in (("--method", method), ("--pattern", pattern), ("--out", out), ("--resume", resume)):
        if value is not None:
            cmd += [flag, str(value)]
    if overwrite:
        cmd.append("--overwrite")
    if not progress:
        cmd.append("--no-progress")
    return cmd


def launch(nproc: int, args: list[str], method: str | None, pattern: str | None, out: Path | None,
           overwrite: bool, resume: Path | None, progress: bool) -> int:
    """Check what the ``nproc`` processes would refuse, then run them; the exit code of the first that
    failed (2: bad input, 130: interrupted; see `nmtrain.cli.torchrun`)."""
    from ..experiments.distributed import world_size

    if not 1 <= nproc <= MAX_NPROC:
        raise UsageError(f"--nproc: give 1 to {MAX_NPROC} processes, got {nproc} (1 trains in this process; "
                         "N > 1 launches N processes through torchrun)")
    if world_size() > 1:
        raise UsageError("--nproc: already running under torchrun; drop --nproc")
    check_launch(nproc, _resolve(args, method, pattern, out, resume), overwrite, resume is not None)
    cmd = torchrun_command(nproc, args, method, pattern, out, overwrite, resume, progress)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def check_launch(nproc: int, spec: Spec, overwrite: bool, resume: bool) -> None:
    """What ``nproc`` processes would refuse, checked before any is started, so that bad input is one line
    and exit code 2 here rather than the same line from every process and then torchrun's report: the
    spec with the global batch split ``nproc`` ways, the machine, the run directory. Only a check that
    needs the data (the epoch's last batch splits across the processes) is left to the processes."""
    from ..experiments.build import resolve_device, validate
    from ..experiments.rundir import RunDir

    validate(spec, world=nproc)
    # One GPU per process on CUDA (rank r takes cuda:r). On the CPU more processes than cores only take
    # turns (slow, not wrong), so there only MAX_NPROC bounds them.
    if resolve_device(spec.device).type == "cuda" and nproc > _gpus():
        raise UsageError(f"--nproc: {nproc} processes need {nproc} GPUs (one each); this machine has {_gpus()}")
    rd = RunDir(spec.out)
    rd.check_target(overwrite, resume)
    if resume:
        rd.load_checkpoint()        # every process reads it first: an unreadable one is refused here instead


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()
