"""Learned N:M masks (MaskLLM, Fang et al., NeurIPS 2024): the weights frozen, the mask trained on the task's loss.

Every group of M weights along K (or every M x M tile for N:M-T) holds one logit per candidate mask
(``sparsity/learned.py``). Each step samples a soft mask per layer by Gumbel-softmax, runs the task's loss
with ``W * soft_mask`` in place of every sparse layer's weight, and takes an AdamW step on the logits only.
The deployed mask is the argmax candidate of every group, valid N:M / N:M-T by construction.

The defaults are MaskLLM's (NVlabs/MaskLLM; lines of ``learnable_sparsity/differentiable_mask.py``, the
LLaMA-2 7B script ``scripts/learnable_sparsity/llama2_7b_mask_only_tp8_c4.sh`` and Megatron's optimizer):

- temperature ``tau`` 4 -> 0.05 and logit scale ``kappa`` 1e2 -> 5e2, both **linear** in ``step / steps``
  (``differentiable_mask.py`` 680-683, the script's ``--gumbel-temperature-range 4 0.05
  --gumbel-scale-range 1e2 5e2``), the step counted from 0 as Megatron's ``args.iteration``;
- logits ``N(0, 0.01)`` (line 636) raised by the prior mask, ``(overlap - 1) * std * prior_strength``
  with ``--prior-strength 3.0`` (lines 246-247 and the script);
- AdamW (Megatron's ``FusedAdam``, decoupled weight decay 0.1), betas (0.9, 0.95), eps 1e-5, gradient
  clipping at norm 1.0, lr 5e-4 = ``LR=5e-5`` x ``--lr-mult 10`` (the logits' multiplier,
  ``megatron/training.py`` ``scale_lr_cond_gate``), cosine-decayed to ``MIN_LR`` x 10 = 5e-5 without warmup;
- soft masks (``--hard`` off: "soft mask for training yields better performance", ``pretrain_maskllm.py``);
- the script's ``--weight-reg 1e-5`` (subtract ``weight_reg * (1 - step/steps) * sum ||W * soft_mask||^2``,
  ``pretrain_maskllm.py`` 168-185) is here but off by default (its argument default, 0): the sum's scale
  depends on the model's size, and on a LeNet-5 it would not mean what it means on LLaMA.

Only ``steps`` is not MaskLLM's (2000 iterations of 256 x 4096 tokens): a few hundred steps over a
calibration set are what the 2 CPU cores allow; its cost (steps, seconds) is reported.

The model runs in eval mode (no dropout, batch-norm statistics untouched) with every parameter's
``requires_grad`` off; a sparse layer's weight is swapped for ``W * soft_mask`` only for the duration of
a step's forward and backward. Afterwards (also after an exception or Ctrl-C) every weight is the same
Parameter object, bit-identical, and the model's mode and ``requires_grad`` flags are as they were.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..sparsity import (Pattern, SparsityError, candidate_masks, choice_of, from_groups, masks_from_choice,
                        nm_violation, prior_logits, shape_violation, soft_mask)
from .errors import ExperimentError


class LearnedError(ExperimentError):
    """Input the learned-mask method cannot use (settings, layers, prior, batches); one-line message."""


@dataclass
class LearnedSettings:
    steps: int = 200                                  # optimizer steps, cycling over the calibration batches
    lr: float = 5e-4                                  # LR 5e-5 x lr-mult 10 (MaskLLM's LLaMA scripts)
    lr_min: float = 5e-5                              # MIN_LR 5e-6 x 10; cosine decay from lr, no warmup
    tau: tuple[float, float] = (4.0, 0.05)            # Gumbel temperature, linear start -> end
    scale: tuple[float, float] = (1e2, 5e2)           # logit scale kappa, linear start -> end
    prior_strength: float = 3.0                       # --prior-strength 3.0; 0: no prior
    init_std: float = 0.01                            # logits ~ N(0, init_std) before the prior
    weight_decay: float = 0.1                         # AdamW's decoupled decay on the logits
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    clip_grad: float = 1.0                            # global gradient norm of the logits; 0: no clipping
    hard: bool = False                                # straight-through one-hot samples instead of soft masks
    weight_reg: float = 0.0                           # MaskLLM's --weight-reg (its scripts: 1e-5), decayed linearly

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise LearnedError(f"steps: must be an integer >= 1, got {self.steps!r}")
        for name in ("lr", "init_std", "eps"):
            _require(name, getattr(self, name), lambda v: v > 0, "must be positive")
        for name in ("lr_min", "prior_strength", "weight_decay", "clip_grad", "weight_reg"):
            _require(name, getattr(self, name), lambda v: v >= 0, "must be >= 0")
        for name in ("tau", "scale"):
            pair = getattr(self, name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise LearnedError(f"{name}: must be a (start, end) pair, got {pair!r}")
            for value in pair:
                _require(name, value, lambda v: v > 0, "start and end must be positive")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise LearnedError(f"betas: must be a (beta1, beta2) pair, got {self.betas!r}")
        for value in self.betas:
            _require("betas", value, lambda v: 0 <= v < 1, "each must be in [0, 1)")

    def at(self, step: int) -> tuple[float, float, float, float]:
        """(tau, scale, lr, weight_reg) of ``step`` (0-based): linear anneals and the cosine lr."""
        frac = step / self.steps
        tau = self.tau[0] + (self.tau[1] - self.tau[0]) * frac
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * frac
        lr = self.lr_min + (self.lr - self.lr_min) * 0.5 * (math.cos(math.pi * frac) + 1.0)
        return tau, scale, lr, self.weight_reg * (1.0 - frac)


def _require(name: str, value, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise LearnedError(f"{name}: {what}, got {value!r}")


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: nn.Parameter          # the original Parameter, never written
    logits: nn.Parameter          # (groups, candidates)
    prior_choice: torch.Tensor    # (groups,) the prior mask's candidate per group


def _check_layer(name: str, module: nn.Module, pattern: Pattern, layout: str, prior: dict) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() not in (2, 4):
        raise LearnedError(f"layer {name!r}: learned masks need a 2-D or 4-D weight Parameter (Linear, Conv2d)")
    problem = shape_violation(weight.shape, pattern, layout)
    if problem is not None:
        raise LearnedError(f"layer {name!r}: weight {tuple(weight.shape)} cannot hold {pattern}: {problem}")
    mask = prior.get(name)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
        got = ("nothing" if mask is None else
               f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        raise LearnedError(f"prior[{name!r}]: want a bool mask of shape {tuple(weight.shape)}, got {got}")
    problem = nm_violation(mask, pattern, layout, exact=True)
    if problem is not None:
        raise LearnedError(f"prior[{name!r}] is not an exact {pattern} mask: {problem}")


def _prepare(layers: dict[str, nn.Module], pattern: Pattern, layout: str, prior: dict[str, torch.Tensor],
             settings: LearnedSettings, generator: torch.Generator) -> tuple[list[_Layer], torch.Tensor]:
    """The candidates (the pattern refused first if it has too many) and every layer's logits, from its prior."""
    try:
        candidates = candidate_masks(pattern.n, pattern.m, pattern.transposable)
    except SparsityError as err:
        raise LearnedError(str(err)) from err
    if not layers:
        raise LearnedError("no layers to learn masks for: the selection is empty")
    for name, module in layers.items():
        _check_layer(name, module, pattern, layout, prior)
    out = []
    for name, module in layers.items():
        weight = module.weight
        mask = prior[name].to(weight.device)
        logits = prior_logits(mask, candidates, layout, settings.prior_strength, generator, settings.init_std)
        out.append(_Layer(name, module, weight, nn.Parameter(logits), choice_of(mask, candidates, layout)))
    return out, candidates.to(out[0].weight.device)


@contextlib.contextmanager
def _frozen(model: nn.Module, layers: list[_Layer]) -> Iterator[None]:
    """The model in eval mode with no parameter requiring grad; all restored afterwards, also on an exception."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    flags += [(s.weight, s.weight.requires_grad) for s in layers]      # layers outside the model, too
    training = model.training
    try:
        model.eval()
        for param, _ in flags:
            param.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


@contextlib.contextmanager
def _swapped(layers: list[_Layer], masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Each layer's weight replaced by ``W * mask`` for the block (as ``torch.func.functional_call``
    swaps ``_parameters``), the original Parameter put back afterwards, also on an exception."""
    try:
        for s in layers:
            s.module._parameters["weight"] = s.weight * masks[s.name].to(s.weight.dtype)
        yield
    finally:
        for s in layers:
            s.module._parameters["weight"] = s.weight


def _cycle(batches: Callable[[], Iterator]) -> Iterator:
    """The calibration batches, pass after pass (``batches()`` called anew for each)."""
    while True:
        empty = True
        for batch in batches():
            empty = False
            yield batch
        if empty:
            raise LearnedError("the calibration batches are empty: batches() yielded nothing")


def _step(model, layers, candidates, pattern, layout, batch, loss_fn, optimizer, settings, step, generator) -> float:
    """One optimizer step on the logits; returns the task's loss of this step's soft masks."""
    tau, scale, lr, reg = settings.at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    masks = {s.name: from_groups(soft_mask(s.logits, candidates, tau, scale, generator, settings.hard),
                                 s.weight.shape, pattern, layout) for s in layers}
    with _swapped(layers, masks):
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise LearnedError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise LearnedError(f"the loss is not finite at step {step} ({float(loss)}); check the model and batches")
        total = loss
        if reg > 0:
            total = loss - reg * sum((s.weight.detach() * masks[s.name]).pow(2).sum() for s in layers)
        optimizer.zero_grad(set_to_none=True)
        total.reshape(()).backward()
    if settings.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([s.logits for s in layers], settings.clip_grad)
    optimizer.step()
    return float(loss.detach())


def learn_masks(model: nn.Module, layers: dict[str, nn.Module], pattern: Pattern, layout: str,
                prior: dict[str, torch.Tensor], batches: Callable[[], Iterator],
                loss_fn: Callable[[nn.Module, object], torch.Tensor], settings: LearnedSettings,
                generator: torch.Generator, on_step: Callable[[int, float], None] | None = None,
                on_masks: Callable[[int, dict, dict], None] | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn an N:M (N:M-T) mask for every layer of ``layers`` (name -> module inside ``model``) on ``loss_fn``.

    ``prior`` holds each layer's one-shot mask (bool, exact ``pattern``); ``batches()`` yields the
    calibration batches anew for each pass; ``generator`` seeds the logits and the Gumbel noise.
    ``on_step(step, loss)`` follows progress; ``on_masks(step, hard_masks, logits)`` sees, after every
    step, the mask each layer would deploy then (for checks). Returns the deployed (argmax) bool masks
    and ``{"steps", "seconds", "loss_first", "loss_last", "changed_vs_prior", "groups", "candidates"}``;
    ``changed_vs_prior`` is the share of groups whose deployed candidate is not the prior's.
    """
    settings.check()
    start = time.perf_counter()
    state, candidates = _prepare(layers, pattern, layout, prior, settings, generator)
    optimizer = torch.optim.AdamW([s.logits for s in state], lr=settings.lr, betas=tuple(settings.betas),
                                  eps=settings.eps, weight_decay=settings.weight_decay)
    losses = []
    with _frozen(model, state):
        feed = _cycle(batches)
        for step in range(settings.steps):
            losses.append(_step(model, state, candidates, pattern, layout, next(feed), loss_fn, optimizer,
                                settings, step, generator))
            if on_masks is not None:
                on_masks(step, _deployed(state, candidates, layout), {s.name: s.logits.detach() for s in state})
            if on_step is not None:
                on_step(step, losses[-1])
    masks = _deployed(state, candidates, layout)
    return masks, _stats(state, losses, time.perf_counter() - start, candidates)


def _deployed(layers: list[_Layer], candidates: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """Every layer's argmax mask (bool, the weight's shape)."""
    with torch.no_grad():
        return {s.name: masks_from_choice(s.logits.argmax(-1), candidates, s.weight.shape, layout) for s in layers}


def _stats(layers: list[_Layer], losses: list[float], seconds: float, candidates: torch.Tensor) -> dict:
    groups = sum(s.prior_choice.numel() for s in layers)
    changed = sum(int((s.logits.detach().argmax(-1) != s.prior_choice).sum()) for s in layers)
    return {"steps": len(losses), "seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1],
            "changed_vs_prior": changed / groups, "groups": groups, "candidates": int(candidates.shape[0])}

