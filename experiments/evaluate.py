"""Accuracy and loss of a model on a loader: how training, AdaPrune and their reports measure a model."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(accuracy in %, mean loss) on a loader."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)
