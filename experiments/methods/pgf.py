"""`pgf` (Bambhaniya et al., CPAL 2025, arXiv 2402.04744): progressive gradient flow to N:M.

Source: abhibambhaniya/progressive_gradient_flow_nm_sparsity, ``readme.md`` (the former
``readme_sparsity.md``), ``timm/sparse_pruning/sparse_functions.py`` (``get_sparse_mask``,
``get_decay_config``, ``LinearDecay``, ``ExponentialDecay``, ``StepDecay``, ``SparseLinear``,
``SparseConv2D``) and ``train.py`` (the step count it passes to the layers). Two schedules restrict,
step by step, the gradient that flows to the pruned weights:

- ``schedule: mdgf`` (mask-decay gradient flow, the default): the target N:M mask ``E`` and a mask
  value ``v`` for the pruned weights that decays over the steps ``t`` since the dense phase ended::

      W~ = W * (E + (1 - E) * v)        exp:    v = exp(-decay_coef * t)
                                        linear: v = max(1 - decay_coef * t, 0)

- ``schedule: sdgf`` (structure-decay gradient flow): binary masks whose pattern steps down through
  stages to the target: ``(M-1):M``, then ``M/2:M``, ``M/4:M``, ... while above N, then ``N:M``
  (1:8: 7:8, 4:8, 2:8, 1:8; 2:4: 3:4, 2:4; 1:4: 3:4, 2:4, 1:4). This is ``get_decay_config``'s
  ``sparsify`` list (``(M-1)`` for frame 0, ``M/2^i`` for frame i, ``log2(M/N) + 1`` frames), which
  ends at N:M when M/N is a power of two; *nmtrain* ends every list at N:M (3:8: 7:8, 4:8, 3:8, where
  the authors' list stops at 4:8; 5:8: 7:8, 5:8, where theirs is 7:8 alone) and, where M-1 = N, has
  the one stage N:M (the authors' 1:2 has two equal frames). Stage i starts at
  ``dense + int(i * ((total - dense - fine_tune) / K))`` steps, K stages (their frame starts
  ``int(dense_epochs) + int(i * sparse_frame_size)``, in epochs). Their other structure decays
  (``fine``, SdGf-Geometric 8:64 -> 4:32 -> 2:16 -> 1:8, which changes M; ``densify``; ``custom``) and
  their column-wise masks (``sparse_dim: COL``) are not offered.

Both, following the authors' code:

- Mask: the row-wise N:M magnitude mask of the current |W| (``get_sparse_mask``: the M-N smallest of
  every M consecutive weights along K zeroed; ``SparseConv2D`` groups input channels at each tap,
  nmtrain's ``nhwc``), recomputed at every forward pass (they call it in every ``forward``), in
  evaluation too.
- Backward: straight through, ``dL/dW = dL/dW~`` for every weight (the classes' ``backward`` returns
  ``grad_output``; the SR-STE decay their ``ctx.decay`` holds is never used, so none here).
- ``dense`` (default 0): the first share of the steps trains dense (``get_sparse_weights`` returns the
  plain weight while ``current_epoch < dense_epochs``); the MDGF clock t starts when it ends (their
  ``current_step_num`` subtracts the dense steps).
- ``fine_tune`` (default 0): the last share trains with the binary target mask, still recomputed
  from |W| with the straight-through gradient (they switch ``decay_type`` to ``step``).
- *nmtrain*: both shares are ``round(fraction * total_steps)`` steps (the authors take ``int()`` of
  epochs; their ``train.py`` divides the dense share by 100 once more when it offsets the step count,
  and starts fine-tuning one epoch late with ``>``: nmtrain counts as the comments there say).

Defaults: ``schedule: mdgf`` with ``decay: exp``, MDGF-Exponential, the variant the paper finds best;
``decay_coef`` 1e-4 per step, ``dense`` 0 and ``fine_tune`` 0, as in the authors' shipped recipe
``vit_base_training.yaml`` (``decay_type: EXP``, ``decay_coef: 0.0001``, ``dense_steps: 0``,
``fine_tune_steps: 0``; ``train.py``'s own ``--decay-coef`` default is 0.0002). The coefficient is per
step, as theirs: exp(-1e-4 t) is still 0.37 after 10,000 steps, so a short run exports (below) a network
whose pruned weights were still in use; set ``decay_coef`` to a few over the run's steps, or
``fine_tune``, for the last steps to train the exported network.

Export: the target N:M mask of the final |W|, ``W * E`` (the base ``deployed_weight``); ``masks()`` is
that target mask at every step. GEMM densities, per step: dense phase all dense; MDGF forward dense while
``v > 0`` (every pruned weight still contributes), N/M once ``v`` is 0 or in the fine-tune phase; SDGF
forward the current stage's n/M. Backward-data and the weight gradient are dense (the mask is N:M along
K only, and every weight gets its gradient). Each metrics line records the stage's density
(``pgf_density``, 1.0 dense) and ``v`` (``pgf_mask_value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...sparsity import Pattern, nm_mask
from ...sparsity.nm import decayed_weight, nm_mask_and_decayed
from ..rules import FRACTION, Choice, above, param
from .base import Capabilities, Method, MethodError, register_method
from .ste import joined

SCHEDULES = ("mdgf", "sdgf")
DECAYS = ("exp", "linear")


@dataclass
class PGFParams:
    schedule: str = param("mdgf", choice=Choice(SCHEDULES, listed=True))   # mask decay | structure decay
    decay: str = param("exp", choice=Choice(DECAYS, listed=True))          # MDGF's decay of the mask value
    decay_coef: float = param(1e-4, above(0, "(per step)"))                # MDGF: exp(-c t) or 1 - c t
    dense: float = param(0.0, FRACTION)             # share of the steps trained dense, first
    fine_tune: float = param(0.0, FRACTION)         # share of the steps with the binary target mask, last

    def check(self) -> None:
        if self.dense + self.fine_tune > 1.0:
            raise MethodError(f"method.params.fine_tune: dense + fine_tune must be at most 1, got "
                              f"{self.dense} + {self.fine_tune}; use smaller shares")


def mask_value(decay: str, coef: float, t: int) -> float:
    """MDGF's value of the pruned weights ``t`` steps after the dense phase (``LinearDecay``,
    ``ExponentialDecay``)."""
    if decay == "linear":
        return max(1.0 - coef * t, 0.0)
    return math.exp(-coef * t)


def sdgf_stages(n: int, m: int) -> list[int]:
    """Weights kept per group of ``m`` at each SDGF stage: M-1, then M/2, M/4, ... while above ``n``, then ``n``."""
    stages = [m - 1]
    i = 1
    while m // 2 ** i > n:
        stages.append(m // 2 ** i)
        i += 1
    if stages[-1] != n:
        stages.append(n)
    return stages


def stage_starts(dense: int, span: int, stages: int) -> list[int]:
    """First step of each stage: the ``span`` steps after the ``dense`` ones cut in equal frames."""
    frame = span / stages
    return [dense + int(i * frame) for i in range(stages)]


class _DecayedMask(torch.autograd.Function):
    """``W * (E + (1 - E) * v)`` forward (`decayed_weight`, or ``made``); the gradient passes to every weight
    unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, kept: torch.Tensor, value, made: torch.Tensor | None) -> torch.Tensor:
        return decayed_weight(weight, kept, value) if made is None else made

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


def decayed_mask(weight: torch.Tensor, mask: torch.Tensor, value: float | torch.Tensor,
                 made: torch.Tensor | None = None) -> torch.Tensor:
    """``W * (E + (1 - E) * value)``, straight through; ``value`` a float or a 0-dim tensor (`PGF._value`).
    ``made``: that product (detached), made already for this weight, mask and value (`Method.per_forward`),
    joined to the weight's gradient here (`ste.straight_through`) rather than taking the Function."""
    if (out := joined(weight, made)) is not None:
        return out
    return _DecayedMask.apply(weight, mask, value, made)


@register_method("pgf")
class PGF(Method):
    Params = PGFParams
    caps = Capabilities(sparse_gemms=("forward",), scheduled=True)
    summary = "progressive gradient flow: pruned weights' mask value decays (mdgf) or the pattern steps down (sdgf)"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = Pattern(ctx.pattern.n, ctx.pattern.m)
        total = ctx.total_steps
        self.dense_steps = int(round(params.dense * total))
        self.fine_start = total - int(round(params.fine_tune * total))
        if params.schedule == "sdgf":
            self.stages = sdgf_stages(self.pattern.n, self.pattern.m)
            self.starts = stage_starts(self.dense_steps, max(self.fine_start - self.dense_steps, 0), len(self.stages))
        else:
            self.stages, self.starts = [self.pattern.n], [self.dense_steps]
        self._step = 0          # the step the forward is at (set by before_step)
        # What the forward reads, set by before_step: N of its pattern (None: dense) and the pruned weights'
        # value, as a 0-dim float64 CPU tensor filled in place. A tensor, not a float, so that a compiled
        # forward (train.compile) takes it as an input: a new float every step would be a new graph every
        # step. A 0-dim float64 CPU tensor is what a Python float becomes in ``W * value`` (a CPU scalar, on
        # any device, that leaves W's type as it is): the product is the float's, bit for bit; on the CPU no
        # device copy or sync per step, and any layer's device takes it.
        self._kept: int | None = self.kept_at(0)
        self._value = torch.tensor(self.value_at(0), dtype=torch.float64)

    # --- schedule ---------------------------------------------------------------------------------
    def kept_at(self, step: int) -> int | None:
        """N of the forward's pattern at ``step``; None in the dense phase."""
        if step < self.dense_steps:
            return None
        return next(n for n, start in zip(reversed(self.stages), reversed(self.starts)) if start <= step)

    def value_at(self, step: int) -> float:
        """The pruned weights' mask value at ``step``: 1 dense, MDGF's decay, 0 for binary masks."""
        if step < self.dense_steps:
            return 1.0
        if self.params.schedule == "sdgf" or step >= self.fine_start:
            return 0.0
        return mask_value(self.params.decay, self.params.decay_coef, step - self.dense_steps)

    # --- forward ----------------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self._step = step
        self._kept = self.kept_at(step)
        self._value.fill_(self.value_at(step))

    def forward_weight(self, name, module):
        if self._kept is None:
            return module.weight
        if not torch.compiler.is_compiling():   # every layer's at a step's first training forward (per_forward)
            # M = 4: one compiled pass a layer, shared between two threads on a large model (threads.split_map)
            kept, version, mask, made = self.per_forward(name, module, self._decayed, split=self.pattern.m == 4,
                                                         batch=self._batch if self.pattern.m == 4 else None)
            if kept == self._kept and version == self._value._version:    # made at this N and mask value
                return decayed_mask(module.weight, mask, self._value, made)
        mask = nm_mask(module.weight.detach(), self._kept, self.pattern.m, self.ctx.layout)
        return decayed_mask(module.weight, mask, self._value)

    def _batch(self, weights: list[torch.Tensor]) -> list | None:
        """`per_forward`'s batch: every layer's `_decayed` in one call per thread (`sparsity.batch.LayerMakes`)."""
        made = self._makes.masked(weights, self._kept, self.ctx.layout, self._value)
        version = self._value._version
        return None if made is None else [None if r is None else (self._kept, version, *r) for r in made]

    def _decayed(self, name: str, module: nn.Module) -> tuple:
        # the mask and the decayed weight in one pass at M = 4 on a CPU (sparsity.nm_mask_and_decayed)
        mask, made = nm_mask_and_decayed(module.weight, self._kept, self.pattern.m, self._value, self.ctx.layout)
        return self._kept, self._value._version, mask, made

    # --- results ----------------------------------------------------------------------------------
    def masks(self):
        return self.row_masks(self.pattern)

    def export_pattern(self, name):
        return self.pattern

    def densities(self, name, step):
        kept = self.kept_at(step)
        if kept is None or self.value_at(step) > 0.0:
            return 1.0, 1.0, 1.0
        return kept / self.pattern.m, 1.0, 1.0

    def metric_fields(self):
        # the forward's pattern density (1.0 dense) and the pruned weights' value, at the last step
        kept = self.kept_at(self._step)
        return {"pgf_density": 1.0 if kept is None else kept / self.pattern.m,
                "pgf_mask_value": self.value_at(self._step)}
