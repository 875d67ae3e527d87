"""Accuracy and loss of an image classifier on a loader: the classification task's measure (experiments/tasks/
classification.py; a language model's is in tasks/language_model.py).

Also `eval_mode`, the one way nmtrain runs a model in another mode for a while (measuring it, probing
its layers, recalibrating its BatchNorm) and hands it back in the mode it had.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F


@contextlib.contextmanager
def eval_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (``training=True``: in train mode); afterwards, also after an
    exception, back in the mode it had, so a caller in the middle of training keeps training."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """(accuracy in %, mean loss per sample) of a classifier on a loader."""
    correct = total = 0
    loss_sum = 0.0
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1)
