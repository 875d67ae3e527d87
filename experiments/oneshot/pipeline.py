"""One conversion, end to end: a trained model's run directory to an N:M (or N:M-T) one by a one-shot method.

    source -> spec, weights -> model, layer plan, calibration sample (training split, --calib-seed)
           -> metric of the original and of magnitude projection
           -> the method (registry.py), then per-layer errors, BatchNorm re-estimated, the one-shot metric
           -> with --finetune: AdaPrune's fit of the kept weights (mask fixed), errors, BatchNorm, metric
           -> every sparse weight checked against the pattern -> summary.json, model.pt, config.yaml

The metric is measured on the held-out part of the training split when the source's spec sets
``data.holdout`` (the calibration sample never comes from it), else on the test (validation) split.
Nothing is written until the end, and then into a temporary directory that is renamed into place, so a
conversion stopped at any point (Ctrl-C, an error) leaves no output directory behind.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text
from torch import nn

from ...sparsity import LAYOUTS, Pattern, fold_mask, nm_violation
from ..build import build, layer_plan, resolve_device
from ..io import CheckpointError, make_dirs, remove_dirs, state_dict_mismatch
from ..rundir import CONFIG, SUMMARY, RunDir, load_weights
from ..spec import Spec, SpecError, dump_spec, from_dict
from ..tasks import get_task
from ..yamlfile import read_yaml
from .calibration import calibration_set, layer_errors, recalibrate_batchnorm
from .reconstruct import ReconstructParams, fit_layers
from .inplace import make_job, run_method
from .registry import ConversionError, Job, OneShotMethod, Outcome
from .settings import ConversionSettings  # noqa: F401  (where the CLI and benchmarks import it from)
from .report import Stage, build_summary


@dataclass
class ConversionResult:
    out: Path | None            # the run directory written (None with write=False)
    summary: dict               # summary.json's content


# ------------------------------------------------------------------------------------------------
# Source and output directory


def load_source(source: str | Path, spec_path: str | Path | None = None) -> tuple[Spec, dict[str, torch.Tensor]]:
    """(spec, state_dict) from a run directory (its config.yaml) or a state_dict file plus ``spec_path``."""
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"SOURCE: {source} does not exist")
    if spec_path is None:
        if not source.is_dir():
            raise ConversionError(f"SOURCE: {source} is a state_dict file; pass --spec SPEC.yaml naming its model "
                                  "and data (or pass a run directory of `nmtrain train`)")
        spec_path = RunDir(source).config
        if not spec_path.is_file():
            raise ConversionError(f"SOURCE: {source} has no {CONFIG}; pass --spec SPEC.yaml naming its model and data")
    spec = from_dict(Spec, read_yaml(spec_path))
    if spec.sparsity.layout not in LAYOUTS:
        raise SpecError(f"sparsity.layout: {spec.sparsity.layout!r} is unknown; use one of: {', '.join(LAYOUTS)}")
    return spec, load_weights(source, field="SOURCE")


def default_out(source: str | Path, pattern: Pattern, method: str = "adaprune") -> Path:
    """``SOURCE-<method>-2of4`` beside the source (``-4of8T`` for 4:8-T)."""
    source = Path(source)
    base = source if source.is_dir() else source.with_suffix("")
    return base.parent / f"{base.name}-{method}-{pattern.slug}"


# ------------------------------------------------------------------------------------------------
# The whole conversion


@dataclass
class _Setup:
    spec: Spec
    built: Any
    original: nn.Module
    names: list[str]
    skipped: dict
    job: Job


def convert(source: str | Path, settings: ConversionSettings, spec_path: str | Path | None = None,
            out: str | Path | None = None, overwrite: bool = False, console=None, progress: bool = True,
            write: bool = True) -> ConversionResult:
    """Convert ``source`` with ``settings``; write a run directory (model.pt, config.yaml, summary.json)
    unless ``write`` is False (then only the summary is returned: what the benchmark uses)."""
    start = time.perf_counter()
    method, params, finetune = settings.resolve()
    spec, state = load_source(source, spec_path)
    out = Path(out) if out is not None else default_out(source, settings.pattern, method.name)
    if write:
        RunDir(out).check_target(overwrite)
    with _progress(console, progress) as bar:
        setup = _set_up(spec, state, settings, bar)
        job, task = setup.job, setup.job.task
        measured = {"original": task.evaluate(setup.original, setup.built.test_loader, job.device),
                    "magnitude": _masked_metrics(setup, job.prior)}
        stages = [_one_shot(setup, method, params)]
        if finetune is not None:
            stages.append(_finetune(setup, stages[0].outcome.masks, finetune))
    for stage in stages:
        measured[stage.name] = stage.metrics
    sparse_layers = _check_sparse(job.model, stages[0].outcome.masks, job.pattern, job.layout)
    summary = build_summary(spec, source, settings, method, params, finetune, setup.built.info, job, measured, stages,
                            sparse_layers, setup.skipped, time.perf_counter() - start)
    if write:
        _write(out, job.model, spec, source, method, settings.pattern, summary, setup.built.info.tokenizer)
    return ConversionResult(out if write else None, summary)


def _set_up(spec: Spec, state: dict, settings: ConversionSettings, bar) -> _Setup:
    """The source model (eval mode, on the spec's device), its layer plan, the calibration sample and the Job."""
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    # calibration images are plain (no augmentation); data.holdout keeps its samples out of the training split
    built = build(spec, augment=False, holdout=spec.data.holdout)
    original = built.model
    problem = state_dict_mismatch(original.state_dict(), state)
    if problem:
        raise CheckpointError(f"SOURCE: weights do not match model {spec.model.name}: {problem}")
    original.load_state_dict(state)
    original.to(device).eval()
    plan = layer_plan(spec, built, settings.pattern, device)
    names = list(plan.sparse)
    calib = calibration_set(built.train_ds, min(settings.calib_samples, len(built.train_ds)), settings.calib_seed)
    job = make_job(original, copy.deepcopy(original), names, settings.pattern, spec.sparsity.layout, settings.solver,
                   calib, get_task(built.info.task), device, settings.calib_seed, bar)
    return _Setup(spec, built, original, names, plan.skipped, job)


def _masked_metrics(setup: _Setup, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """The task's metrics of plain magnitude projection: the original weights with ``masks`` folded in."""
    model = copy.deepcopy(setup.original)
    with torch.no_grad():
        for name, mask in masks.items():
            w = model.get_submodule(name).weight
            w.copy_(fold_mask(w, mask))
    return setup.job.task.evaluate(model, setup.built.test_loader, setup.job.device)


def _one_shot(setup: _Setup, method: OneShotMethod, params: Any) -> Stage:
    """Run the method on the job, then measure: per-layer errors, BatchNorm re-estimated, the task's metrics."""
    job = setup.job
    t0 = time.perf_counter()
    outcome = run_method(job, method, params)
    seconds = time.perf_counter() - t0
    errors = layer_errors(job.original, job.model, setup.names, job.calib, method.sequential(params), job.device,
                          masks=job.prior)
    bn = recalibrate_batchnorm(job.model, job.calib.inputs, setup.spec.data.batch_size, job.device)
    metrics = job.task.evaluate(job.model, setup.built.test_loader, job.device)
    return Stage("oneshot", outcome, seconds, errors, bn, metrics, method.sequential(params))


def _finetune(setup: _Setup, masks: dict[str, torch.Tensor], params: ReconstructParams) -> Stage:
    """AdaPrune's fit of the kept weights from the one-shot result, the masks fixed; measured as `_one_shot`."""
    job = setup.job
    t0 = time.perf_counter()
    fitted = fit_layers(job, masks, params, "fine-tune")
    seconds = time.perf_counter() - t0
    errors = layer_errors(job.original, job.model, setup.names, job.calib, params.sequential, job.device)
    bn = recalibrate_batchnorm(job.model, job.calib.inputs, setup.spec.data.batch_size, job.device)
    metrics = job.task.evaluate(job.model, setup.built.test_loader, job.device)
    return Stage("finetune", Outcome(masks=masks, layer_fields=fitted), seconds, errors, bn, metrics,
                 params.sequential)


def _check_sparse(model: nn.Module, masks: dict[str, torch.Tensor], pattern: Pattern, layout: str) -> dict:
    """summary.json's ``sparse_layers``, after checking every converted weight against the pattern and its mask."""
    sparse_layers = {}
    for name, mask in masks.items():
        w = model.get_submodule(name).weight.detach()
        problem = nm_violation(w, pattern, layout)
        if problem is not None or bool((w[~mask] != 0).any()):
            raise RuntimeError(f"internal error: {name}.weight breaks {pattern} after conversion: {problem}")
        sparse_layers[f"{name}.weight"] = {"pattern": str(pattern), "density": float(mask.float().mean()),
                                           "transposable": pattern.transposable, "layout": layout}
    return sparse_layers


class _Info(ProgressColumn):
    """A task's ``info`` field (a loss, a layer name), empty when it has none."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def _progress(console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Info(),
                    TimeElapsedColumn(), console=console, disable=not enabled)


# ------------------------------------------------------------------------------------------------
# Writing: a temporary directory beside the output, renamed into place file by file under its lock


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)        # atomic within one file system: the temporary directory is beside ``out``


def _write(out: Path, model: nn.Module, spec: Spec, source, method: OneShotMethod, pattern: Pattern, summary: dict,
           tokenizer: dict | None) -> None:
    created = make_dirs(out.parent, "--out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staged = RunDir(tmp)
        staged.write_model({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if tokenizer is not None:       # a language model's vocabulary: `nmtrain sample` reads it from the run
            staged.write_tokenizer(tokenizer)
        # The source's spec names model and data; the conversion's own settings are in summary.json.
        staged.write_config(f"# spec of the source model ({source}); {method.title} {pattern.describe()} "
                            f"settings: {SUMMARY}\n" + dump_spec(spec))
        staged.write_summary(summary)
        names = [p.name for p in (staged.model, staged.tokenizer, staged.config, staged.summary) if p.is_file()]
        # Held while moved, and all or nothing: a failure (or Ctrl-C) removes what was moved, and the directory.
        with RunDir(out).writing():
            for name in names:                  # summary.json last: its presence means "finished"
                _move(tmp / name, out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_dirs(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
