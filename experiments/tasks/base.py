"""The task contract: what kind of problem a run learns, and the registry the task modules add themselves to.

A task says how a batch becomes a loss, how many targets a batch holds, what input probes a model,
how a model is measured on a loader, which of those measures is the run's primary metric and which
way is better, and which keys summary.json and compare's tables carry. The runner, compare, AdaPrune,
the claims report and `nmtrain train`'s table ask the task, never its name, so a third task is one
module with a ``@register_task("name")`` class (and its import in the package's ``__init__``).

The task of a run comes from its dataset (``DatasetInfo.task``). In a module of its own so that the
task modules import it, not their package (which imports them to register them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ExperimentError


class TaskError(ExperimentError):
    """A task name nmtrain does not know; one-line message."""


@dataclass(frozen=True)
class Column:
    """A summary.json key as the tables show it: ``final_accuracy`` as ``final acc``, ``89.60%``."""
    key: str            # the key in summary.json and in compare's rows (``<key>_mean`` in a seeded grid's)
    label: str          # the table's header
    digits: int = 2
    unit: str = ""

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}{self.unit}"


class Task:
    """The contract. Class attributes describe the task's metrics; methods do its arithmetic."""
    name: str = ""
    metrics: tuple[str, ...] = ()       # the keys `evaluate` returns, in metrics.jsonl's order
    primary: str = ""                   # the metric a run is judged by (one of ``metrics``)
    lower_is_better: bool = False       # the primary metric's direction (also the tables' and the tests')
    best_metric: str = ""               # the metric the run's "best" tracks (same direction as ``primary``)
    worst: float = 0.0                  # "best" before the first eval
    split: str = "test"                 # the split the test loader holds (summary.json's eval_split)
    short: str = ""                     # the primary metric in the progress bar ("acc", "ppl")
    axis_label: str = ""                # the compare plot's y axis
    columns: tuple[Column, ...] = ()    # compare's and `nmtrain train`'s columns; the first is the primary

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def targets(self, y: torch.Tensor) -> int:
        """How many targets the batch ``y`` holds (its loss is a mean over these)."""
        raise NotImplementedError

    def example_input(self, info, device: torch.device) -> torch.Tensor:
        """One input the model accepts (probing its layers, counting its FLOPs)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """The ``metrics`` of ``model`` on ``loader``, in eval mode."""
        raise NotImplementedError

    def final_fields(self, final: dict[str, float]) -> dict[str, float]:
        """summary.json's ``final_*`` keys of a model measured as ``final`` (AdaPrune writes these alone)."""
        raise NotImplementedError

    def summary_fields(self, final: dict[str, float], best: float) -> dict[str, float]:
        """A training run's summary.json keys from its final metrics and its best ``best_metric`` so far."""
        raise NotImplementedError

    # -- the direction, in one place ----------------------------------------------------------------

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b`` on the primary metric (or on ``best_metric``: the same direction)."""
        return a < b if self.lower_is_better else a > b

    def best(self, best: float, metrics: dict[str, float]) -> float:
        """The run's best ``best_metric`` after an eval that measured ``metrics``."""
        value = metrics[self.best_metric]
        return min(best, value) if self.lower_is_better else max(best, value)

    def gain(self, value: float, reference: float) -> float:
        """How much better ``value`` is than ``reference`` (negative: worse), in the primary metric's units."""
        return reference - value if self.lower_is_better else value - reference

    def format(self, value: float) -> str:
        return self.columns[0].format(value)


_TASKS: dict[str, Task] = {}


def register_task(name: str):
    """Register a Task class under ``name`` (one instance: tasks keep no state)."""
    def decorator(cls: type[Task]) -> type[Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.name = name
        _TASKS[name] = cls()
        return cls
    return decorator


def list_tasks() -> dict[str, Task]:
    return dict(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise TaskError(f"task: {name!r} is unknown; use one of: {', '.join(_TASKS)}")
    return _TASKS[name]


def task_of_row(row: dict) -> Task:
    """The task whose primary column a result row carries: a run's row (``final_accuracy``) or a seeded
    grid's (``final_accuracy_mean``); rows that name no task's column are classification's (older files)."""
    for task in _TASKS.values():
        key = task.columns[0].key
        if key in row or f"{key}_mean" in row:
            return task
    return _TASKS["classification"]
