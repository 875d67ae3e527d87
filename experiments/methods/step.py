"""`step` (Lu et al., ICML 2023, arXiv 2302.01172): STEP, N:M masks learned under Adam with a frozen
second moment as preconditioner.

Source: the re-implementation in thu-ml/2by4-pretrain-acc-examples ``cramming/STEP/adamw.py`` (the same
code is huyz2023/2by4-pretrain ``sparse/adamw_step.py``, ``AdamW_STEP``) with its layer
``cramming/STEP/sparse_ops.py`` (``SparseLinear``). Adam-family only: under ``optim.name: sgd`` the run
is refused (``Capabilities.optimizers``; there is no second moment to freeze). Two phases:

1. **Dense**: plain AdamW on every parameter, the sparse layers train dense (``SparseLinear.forward``:
   ``if self.training and self.weight.mask == 'dense'`` → ``F.linear(x, self.weight, ...)``).
   Evaluation always uses the N:M weights, as the reference (its ``else`` branch), so metrics.jsonl
   shows what the run would deploy.
   **AutoSwitch** after every optimizer step ``t`` (1-based): ``Z_t`` = mean ``|v_t − v_{t−1}|`` over
   all entries of the sparse layers' weights (``option=1``: ``torch.mean(torch.cat(variance_change).abs())``),
   ``v`` AdamW's ``exp_avg_sq``; the window holds the last ``window`` values of ``Z`` (fewer at the
   start: ``sliding_window`` is averaged as it fills); the switch fires when ``t > T_max``, or when the
   window's mean is below ``threshold`` and ``t > T_min``
   (``if (self.t > self.T_max) or (average_Z < self.eps and self.t > self.T_min)``).
2. **Sparse** (from step ``t``, 0-based, on): the sparse layers' forward is ``W~ = E ⊙ W``, ``E`` the
   row-wise N:M magnitude mask of the current weights at every forward, gradient straight through
   to all of ``W`` plus SR-STE's ``decay · (1 − E) ⊙ W`` (``ste_mask``). The sparse layers' weights
   (only those: the reference's ``hasattr(p, 'mask')``; biases and every other parameter keep plain
   AdamW) take the preconditioned update, with ``v*`` their ``exp_avg_sq`` at the switch::

       p ← p · (1 − lr · wd)                           decoupled weight decay, first (as AdamW)
       m ← β1 m + (1 − β1) g                            the first moment keeps learning
       p ← p − lr / (1 − β1^k) · m / (sqrt(v*) + eps^(3/4))

   ``k`` the parameter's step count. As the reference: ``v*`` is *not* bias-corrected (it copies the
   raw ``exp_avg_sq``; ``bias_correction2`` is left out of the sparse branch) and the denominator's
   epsilon is ``math.sqrt(eps) * math.sqrt(math.sqrt(eps))``, ``eps^(3/4)``; ``m`` is bias-corrected.

   How, with torch's AdamW: in ``after_backward`` (after the clip, before ``optimizer.step``, with the
   step's learning rate) nmtrain applies this update to the sparse weights itself and sets their
   ``grad`` to None, so AdamW skips them. Their ``exp_avg``, ``exp_avg_sq`` (now ``v*``, no longer
   updated; the reference keeps updating its ``exp_avg_sq`` but never reads it again) and ``step``
   stay in the optimizer's state, so a checkpoint holds them. A method driven without an optimizer
   (``bind_optimizer`` never called: a benchmark, a hook test) switches at ``T_max`` only and leaves
   the update to whoever steps.

Defaults, from the authors' code:

- ``window`` null → ``int(1 / (1 − β2))``: ``self.T_omega = int(1 / (1 - betas[1]))``.
- ``threshold`` null → the optimizer's ``eps``: ``self.eps = eps`` (AutoSwitch compares with Adam's eps).
- ``t_min`` 0.1, ``t_max`` 0.5 (fractions of the run; ``T = round(fraction · total steps)``): README
  "``clipping``: a tuple for T_min and T_max in Algorithm 2, recommended to be 10% and 50% of total
  optimization steps"; ``cramming/backend/torch_default.py``
  ``optimizer_args['clipping'] = (38048 // 10, 38048 // 2)``. ``t_max: 1`` is no cap.
- ``decay`` 2e-4: ``Sparse.forward(ctx, weight, N, M, decay=0.0002)``, SR-STE's λ_W. The reference's
  ``Sparse.backward`` returns ``grad_output`` unchanged, so its runs used no decay: ``decay: 0``
  reproduces them.

GEMM densities: ``(1, 1, 1)`` in the dense phase, ``(r, 1, 1)`` in the sparse phase (a row-wise
mask: backward-data and the weight gradient dense, as SR-STE). summary.json: ``switch_step`` (the
first sparse step, 0-based; null if the run ended dense) and ``switch_reason`` (``settled`` or
``cap``); metrics.jsonl: ``switch_step`` and ``v_change`` (the window's mean of ``Z``, the
AutoSwitch statistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...sparsity import Pattern
from ..rules import DECAY, FRACTION, above, at_least, param
from .base import Capabilities, Method, MethodError, register_method


@dataclass
class STEPParams:
    window: Optional[int] = param(None, at_least(1, "(optimizer steps; null: 1/(1 - beta2))"))
    threshold: Optional[float] = param(None, above(0, "(mean |dv| per step; null: the optimizer's eps)"))
    t_min: float = param(0.1, FRACTION)       # AutoSwitch may fire only after this share of the run
    t_max: float = param(0.5, FRACTION)       # the cap: the switch fires after this share at the latest
    decay: float = param(2e-4, DECAY)         # SR-STE's lambda_W in the sparse phase

    def check(self) -> None:
        if self.t_max < self.t_min:
            raise MethodError(f"method.params.t_max: must not be before t_min={self.t_min}, got {self.t_max}")


@register_method("step")
class STEP(Method):
    Params = STEPParams
    caps = Capabilities(sparse_gemms=("forward",), optimizers=("adamw",), scheduled=True)
    summary = ("STEP: dense AdamW until its second moment settles (AutoSwitch), then N:M masks learned "
               "SR-STE-style with the frozen second moment as preconditioner")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = Pattern(ctx.pattern.n, ctx.pattern.m)
        self.t_min = int(round(params.t_min * ctx.total_steps))
        self.t_max = int(round(params.t_max * ctx.total_steps))
        self.optimizer: torch.optim.Optimizer | None = None
        self.switch_step: int | None = None     # the first sparse step (0-based)
        self.switch_reason: str | None = None   # "settled" or "cap"
        self.window_z: list[float] = []         # the last `window` values of Z_t
        self.v_change: float | None = None      # the window's mean at the last step
        self._v_before: dict[str, torch.Tensor | None] | None = None
        self._denoms: dict[str, tuple] = {}     # per layer: (v*, its version, eps, sqrt(v*) + eps^(3/4))

    def bind_optimizer(self, optimizer):
        self.optimizer = optimizer

    # --- phases ------------------------------------------------------------------------------
    @property
    def switched(self) -> bool:
        return self.switch_step is not None

    def in_sparse_phase(self, step: int) -> bool:
        return self.switch_step is not None and step >= self.switch_step

    def _group(self, p: nn.Parameter) -> dict:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def window_length(self) -> int:
        if self.params.window is not None:
            return self.params.window
        beta2 = self._group(next(iter(self.ctx.layers.values())).weight)["betas"][1]
        return int(1 / (1 - beta2))                 # the reference's T_omega

    def threshold(self) -> float:
        if self.params.threshold is not None:
            return self.params.threshold
        return self._group(next(iter(self.ctx.layers.values())).weight)["eps"]

    # --- step hooks --------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if self.optimizer is None:
            return
        if not self.switched:       # v_{t-1}, to measure what this step's AdamW update does to it
            self._v_before = {name: _second_moment(self.optimizer, mod.weight, clone=True)
                              for name, mod in self.ctx.layers.items()}
            return
        for name, mod in self.ctx.layers.items():
            p = mod.weight
            state = self.optimizer.state.get(p, {})
            if p.grad is not None and "exp_avg_sq" in state:
                group = self._group(p)
                preconditioned_step(p, p.grad, state, group, self._preconditioner(name, state["exp_avg_sq"],
                                                                                 group["eps"]))
                p.grad = None       # AdamW skips it: its update is done

    def _preconditioner(self, name: str, v: torch.Tensor, eps: float) -> torch.Tensor:
        """`preconditioner` of the frozen ``v*``, made once and kept with it: two tensor passes (a square root
        into a new tensor, an add) of every sparse step's five saved. Made again when ``v*`` is another tensor
        or was changed in place (its version counter: a checkpoint loaded into it) or eps changed."""
        seen = self._denoms.get(name)
        if seen is not None and seen[0] is v and seen[1] == v._version and seen[2] == eps:
            return seen[3]
        denom = preconditioner(v, eps)
        self._denoms[name] = (v, v._version, eps, denom)
        return denom

    def after_step(self, step: int) -> None:
        if self.switched:
            return
        t = step + 1                # optimizer steps done (the reference's self.t)
        if self.optimizer is not None and self._v_before is not None:
            self.window_z.append(self._z())
            del self.window_z[:-self.window_length()]
            self.v_change = sum(self.window_z) / len(self.window_z)
        self._v_before = None
        settled = self.v_change is not None and self.v_change < self.threshold() and t > self.t_min
        if t > self.t_max or settled:
            self.switch_step, self.switch_reason = t, "cap" if t > self.t_max and not settled else "settled"

    @torch.no_grad()
    def _z(self) -> float:
        """Z_t: mean |v_t - v_{t-1}| over every entry of the sparse layers' weights."""
        total, count = 0.0, 0
        for name, mod in self.ctx.layers.items():
            after = _second_moment(self.optimizer, mod.weight)
            before = self._v_before.get(name)
            if after is None:
                continue
            diff = after - before if before is not None else after
            total += float(diff.abs().sum(dtype=torch.float64))
            count += diff.numel()
        return total / count if count else 0.0

    # --- forward -----------------------------------------------------------------------------
    def forward_weight(self, name, module):
        if module.training and not self.switched:   # the dense phase trains dense; evaluation is N:M
            return module.weight
        return self.masked_nm_with_decay(name, module, self.pattern, self.params.decay)

    # --- results -----------------------------------------------------------------------------
    def masks(self):
        return self.row_masks(self.pattern)

    def export_pattern(self, name):
        return self.pattern

    def densities(self, name, step):
        return (self.pattern.density, 1.0, 1.0) if self.in_sparse_phase(step) else (1.0, 1.0, 1.0)

    def metric_fields(self):
        return {"switch_step": self.switch_step, "v_change": self.v_change}

    def summary_fields(self):
        return {"switch_step": self.switch_step, "switch_reason": self.switch_reason}

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "switch_step": self.switch_step, "switch_reason": self.switch_reason,
                "window_z": list(self.window_z), "v_change": self.v_change}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.switch_step = state.get("switch_step")
        self.switch_reason = state.get("switch_reason")
        self.window_z = [float(z) for z in state.get("window_z", [])]
        self.v_change = state.get("v_change")


def _second_moment(optimizer: torch.optim.Optimizer, p: nn.Parameter, clone: bool = False) -> torch.Tensor | None:
    v = optimizer.state.get(p, {}).get("exp_avg_sq")
    return v.clone() if clone and v is not None else v


@torch.no_grad()
def preconditioned_step(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                        denom: torch.Tensor | None = None) -> None:
    """STEP's sparse-phase update of ``p`` in place, with its AdamW ``state`` (``exp_avg_sq`` frozen)::

        p ← p (1 − lr wd);  m ← β1 m + (1 − β1) g;  p ← p − lr / (1 − β1^k) · m / (sqrt(v*) + eps^(3/4))

    ``denom``: `preconditioner` of the state's ``exp_avg_sq`` and the group's eps, made already (else made here).
    """
    beta1 = group["betas"][0]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    state["step"] += 1
    k = float(state["step"])
    p.mul_(1 - lr * wd)
    state["exp_avg"].lerp_(grad, 1 - beta1)         # as torch's AdamW forms m
    if denom is None:
        denom = preconditioner(state["exp_avg_sq"], eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** k))


def preconditioner(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(v*) + eps^(3/4)``, the sparse phase's denominator (a new tensor)."""
    return v.sqrt().add_(math.sqrt(eps) * math.sqrt(math.sqrt(eps)))
