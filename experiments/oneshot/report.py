"""summary.json of a conversion: what was done (source, method, its parameters, calibration) and what it gave.

Metrics of the task's primary measure (``accuracy_*`` of an image classifier, ``perplexity_*`` of a
language model) at each stage: ``_original`` (the source), ``_magnitude`` (plain magnitude projection,
original BatchNorm statistics), ``_oneshot`` (after the method) and, with ``--finetune``, ``_finetune``;
``final_*`` are the task's keys of the model written. ``recovered_<stage>`` is the share of magnitude's
loss a stage recovers, ``(m_stage - m_magnitude) / (m_original - m_magnitude)`` in the better direction
(perplexity: lower), null when magnitude loses nothing; ``recovered`` is the written model's.
Per layer: the relative reconstruction error ``||layer(X) - Y||^2 / ||Y||^2`` of magnitude, of the method and
of the fine-tune on the calibration inputs (calibration.py `layer_errors`), and the seconds it took.
As AdaPrune's summaries always did, the method's parameters are also top-level keys (``iters``,
``blocksize``, ...) and its one-shot figures are also named after it (``accuracy_adaprune``,
``perplexity_sparsegpt``, per layer ``error_adaprune``), wherever such a key is not taken (method
``magnitude``'s are the baseline's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..models import builder_record
from .registry import Job, OneShotMethod, Outcome


@dataclass
class Stage:
    """One measured stage of a conversion: the method (``oneshot``) or the fine-tune (``finetune``)."""
    name: str
    outcome: Outcome
    seconds: float
    errors: dict[str, dict[str, float]]     # layer -> {"error": ..., ("magnitude": ...)}
    bn: bool                                # BatchNorm statistics re-estimated
    metrics: dict[str, float]               # the task's metrics after it
    sequential: bool                        # its layers' inputs: the converted model's (else the original's)


def build_summary(spec, source, settings, method: OneShotMethod, params: Any, finetune: Any, info, job: Job,
                  measured: dict[str, dict], stages: list[Stage], sparse_layers: dict, skipped: dict,
                  wall: float) -> dict:
    task, pattern = job.task, job.pattern
    value = {stage: metrics[task.primary] for stage, metrics in measured.items()}
    lost = task.gain(value["original"], value["magnitude"])
    final = stages[-1]
    summary = {
        "name": f"{spec.name}-{method.name}", "method": method.name, "method_params": dataclasses.asdict(params),
        "finetune": None if finetune is None else dataclasses.asdict(finetune), "source": str(source),
        "pattern": str(pattern), "density": pattern.density, "transposable": pattern.transposable,
        "layout": job.layout, "solver": job.solver, "model": spec.model.name, "dataset": spec.data.dataset,
        "seed": spec.seed, "builder": builder_record(spec.model.name, info, spec.model), "device": str(job.device),
        "calib_samples": len(job.calib), "calib_seed": job.calib.seed,
        "calib_split": "train" if spec.data.holdout is None else f"train without the {spec.data.holdout} held-out samples",
        "eval_split": task.split if spec.data.holdout is None else f"holdout ({spec.data.holdout} train samples)",
        "sequential": stages[0].sequential, "mode": "sequential" if stages[0].sequential else "parallel",
        "batchnorm_recalibrated": final.bn,
        **{f"{task.primary}_{stage}": v for stage, v in value.items()},
        **task.final_fields(measured[final.name]),
        **{f"recovered_{s.name}": task.gain(value[s.name], value["magnitude"]) / lost if lost > 0 else None
           for s in stages},
        **{f"seconds_{s.name}": s.seconds for s in stages},
    }
    summary["recovered"] = summary[f"recovered_{final.name}"]
    summary["wall_seconds"] = wall
    for key, val in {f"{task.primary}_{method.name}": value["oneshot"], **summary["method_params"]}.items():
        summary.setdefault(key, val)            # the names AdaPrune's summaries have always had
    for key, val in stages[0].outcome.fields.items():
        if key in summary:
            raise RuntimeError(f"internal error: method {method.name}'s summary key {key!r} is taken")
        summary[key] = val
    summary.update(layers=_layers(job, method, stages), sparse_layers=sparse_layers, skipped_layers=skipped,
                   task=task.name)
    return summary


def _layers(job: Job, method: OneShotMethod, stages: list[Stage]) -> dict[str, dict]:
    """Per layer (``name.weight``): shape, relative errors of magnitude and of each stage, the method's own keys."""
    rows = {}
    for name, layer in job.layers.items():
        first = stages[0]
        row = {"shape": list(layer.weight.shape), "error_magnitude": first.errors[name]["magnitude"]}
        for stage in stages:
            row[f"error_{stage.name}"] = stage.errors[name]["error"]
        row.setdefault(f"error_{method.name}", first.errors[name]["error"])
        own = dict(first.outcome.layer_fields.get(name, {}))
        row["seconds"] = own.pop("seconds", None)
        row.update(own)
        for stage in stages[1:]:
            row[f"seconds_{stage.name}"] = stage.outcome.layer_fields.get(name, {}).get("seconds")
        rows[f"{name}.weight"] = row
    return rows
