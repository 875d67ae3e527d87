"""Image classification: cross-entropy over classes; accuracy (%) is the primary metric, higher is better.

What every run did before tasks existed, unchanged: the same loss, the same metrics.jsonl keys
(``test_loss``, ``accuracy``) and summary.json keys (``final_accuracy``, ``best_accuracy``,
``final_test_loss``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..evaluate import evaluate
from .base import Column, Task, register_task


@register_task("classification")
class Classification(Task):
    metrics = ("test_loss", "accuracy")
    primary = "accuracy"
    lower_is_better = False
    best_metric = "accuracy"
    worst = -1.0                        # below any accuracy: the first eval sets it
    split = "test"                    # what the test loader holds: the test split
    short = "acc"
    axis_label = "final test accuracy (%)"
    columns = (Column("final_accuracy", "final acc", 2, "%"), Column("best_accuracy", "best acc", 2, "%"))

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(net(x), y, reduction=reduction)

    def targets(self, y: torch.Tensor) -> int:
        return y.shape[0]               # one label per image

    def example_input(self, info, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        accuracy, test_loss = evaluate(model, loader, device)
        return {"test_loss": test_loss, "accuracy": accuracy}

    def final_fields(self, final: dict[str, float]) -> dict[str, float]:
        return {"final_accuracy": final["accuracy"]}

    def summary_fields(self, final: dict[str, float], best: float) -> dict[str, float]:
        return {"final_accuracy": final["accuracy"], "best_accuracy": self.best(best, final),
                "final_test_loss": final["test_loss"]}
