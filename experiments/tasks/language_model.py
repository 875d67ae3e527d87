"""Causal language modelling: next-token cross-entropy; perplexity is the primary metric, lower is better.

A batch is ``x``, ``y``: token ids ``[B, T]``, ``y`` the next token of every position of ``x``; the model
gives logits ``[B, T, V]``. The loss is the mean cross-entropy over every target token. Measured on
the validation loader (non-overlapping windows covering the split): ``val_loss``, nats per token, the
mean over every target token; ``perplexity`` = exp(val_loss); ``bpc`` = val_loss / ln 2, bits per
token (per character with the char and byte tokenizers of English text, near enough).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..evaluate import eval_mode
from .base import Column, Task, register_task


def token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits ``[B, T, V]`` against targets ``[B, T]``, over every target token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


@register_task("language_model")
class LanguageModel(Task):
    metrics = ("val_loss", "perplexity", "bpc")
    primary = "perplexity"
    lower_is_better = True
    best_metric = "val_loss"            # the best perplexity is exp() of it
    worst = math.inf
    split = "validation"              # what the test loader holds: the validation split (the last 10% of the text)
    short = "ppl"
    axis_label = "validation perplexity (lower is better)"
    columns = (Column("final_perplexity", "final ppl", 3), Column("final_val_loss", "val loss", 4))

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return token_loss(net(x), y, reduction)

    def targets(self, y: torch.Tensor) -> int:
        return y.numel()                # every position predicts a token

    def example_input(self, info, device: torch.device) -> torch.Tensor:
        return torch.zeros(1, info.block_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        with eval_mode(model):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                loss_sum += float(token_loss(model(x), y, "sum").double())
                tokens += y.numel()
        return measures(loss_sum / max(tokens, 1))

    def final_fields(self, final: dict[str, float]) -> dict[str, float]:
        return {"final_val_loss": final["val_loss"], "final_perplexity": final["perplexity"],
                "final_bpc": final["bpc"]}

    def summary_fields(self, final: dict[str, float], best: float) -> dict[str, float]:
        return {**self.final_fields(final), "best_val_loss": self.best(best, final)}


def measures(val_loss: float) -> dict[str, float]:
    """val_loss (nats per token), perplexity and bits per token, from the mean loss per token. Perplexity
    is capped at exp(700) (a loss no model that learned anything reaches) so that it stays a finite JSON number."""
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700.0)), "bpc": val_loss / math.log(2)}
