"""`transposable` (Hubara et al., NeurIPS 2021): SR-STE-style training with a transposable N:M mask.

The mask is N:M along K and along C_out, so the forward GEMM ``X W~^T`` and the backward-data GEMM
``dY W~`` both take an N:M operand. The reference recipe computes the first mask exactly and then
recomputes it every ``mask_interval`` (40) iterations with the 2-approximation; nmtrain's default
``solver: null`` uses ``sparsity.solver`` (``exact``), which is fast enough to replace the
approximation; set ``solver: approx`` for the paper's recipe. Weight gradient straight through to
all weights, with the SR-STE decay on pruned ones. Training MACs: F * (2r + 1).

``mvue_dw: true`` (*nmtrain*, off by default: Hubara et al. keep the weight gradient dense) takes the
weight gradient as ``MVUE(dYᵀ) X`` (Hu et al. 2024, who pair it with a transposable mask;
methods/wgrad.py): an unbiased 2:4 sample along the tokens, so all three GEMMs take an N:M operand and
training MACs are F * (2r + 0.5). Not with ``accel: semi_structured``, whose kernels compute dW dense.

Pruned weights are bounded (``bound_pruned``, *nmtrain*, default on). Between two recomputes the mask is
fixed, and a pruned weight's straight-through gradient does not depend on its own value (it is masked
out of the loss): it integrates the same push for ``mask_interval`` steps, with momentum, and the decay
(2e-4) cannot hold it. The pruned weights outgrow the kept ones and the next recompute flips a large
share of the mask at once onto weights the loss never tested: LeNet-5 at 1:4-T with interval 40 flipped
up to 23% of its mask at one recompute and ended at chance on 2 of 3 seeds (README "Transposable
training"). After every optimizer step nmtrain clamps each pruned weight's magnitude to the largest kept
magnitude of its group of M along K (sign kept), so a recompute swaps weights of comparable size, as a
per-step recompute would; the largest flip falls to 1-3% and every seed trains. ``bound_pruned: false``
gives the unbounded reference behaviour. Every recompute's change rate goes to metrics.jsonl
(``mask_recomputes``).

With ``accel: semi_structured`` (2:4 only) the Linear layers that the GPU and torch can run go
through real 2:4 kernels for the forward and backward-data GEMMs (``experiments/accel.py``); the
others, and every Conv2d, run the masked-dense path below, named in one warning and in summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...sparsity import grouped, transposable_mask
from ...sparsity.fused import clamp_pruned_, clamp_pruned_masked_
from ..accel import plan_accel
from ..rules import DECAY, STEPS, param
from .base import Capabilities, MethodError, RecomputedMaskMethod, register_method


@dataclass
class TransposableParams:
    mask_interval: int = param(40, STEPS)
    solver: Optional[str] = None        # None: sparsity.solver
    first_solver: str = "exact"         # the first mask
    decay: float = param(2e-4, DECAY)
    bound_pruned: bool = True           # pruned weights stay within their group's kept magnitudes (see below)
    mvue_dw: bool = False               # weight gradient from the MVUE 2:4 sample of dY (methods/wgrad.py)


@register_method("transposable")
class Transposable(RecomputedMaskMethod):
    Params = TransposableParams
    # W~ and W~^T both N:M: the only method whose masks the 2:4 kernels can run in both GEMMs
    caps = Capabilities(sparse_gemms=("forward", "backward_data"), needs_transposable=True,
                        accepts_transposable=True, accel_patterns=((2, 4),))
    summary = "Hubara et al.: transposable N:M mask (forward and backward-data sparse), recomputed every mask_interval steps"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = self.caps.mask_pattern(ctx.pattern)
        self.accel = None
        if ctx.accel == "semi_structured":
            if not self.caps.accel(self.pattern):
                raise MethodError(f"accel: semi_structured needs pattern 2:4, not {self.pattern}")
            if params.mvue_dw:
                raise MethodError("method.params.mvue_dw: the accel: semi_structured kernels compute the weight "
                                  "gradient dense; use mvue_dw=false, or accel=none")   # as build.py refuses it
            self.accel = plan_accel(ctx.layers)

    @torch.no_grad()
    def _compute(self, solver: str) -> dict[str, torch.Tensor]:
        p = self.pattern
        return {name: transposable_mask(mod.weight, p.n, p.m, solver=solver, layout=self.ctx.layout)
                for name, mod in self.ctx.layers.items()}

    def init_masks(self):
        return self._compute(self.params.first_solver)

    def before_step(self, step: int) -> None:     # the first (exact) mask, then the solver's every interval
        self.recompute_when_due(step, self.params.mask_interval,
                                lambda: self._compute(self.params.solver or self.ctx.solver))

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if not (self.params.bound_pruned and self._masks):
            return
        # the next masked-dense forward's W ⊙ E of the bounded weight, made in the bound's pass while the weight
        # is in cache (Method.hold_for_forward; the forward takes it only if neither the weight nor the mask has
        # changed since); not for the accel kernels' forward, nor a compiled one, which make their own
        ahead = self.accel is None and self.forwards_eagerly
        weights = self.trained_weights() if ahead else None
        # every layer's bound and product in one compiled call per thread (sparsity.batch), into products kept
        # from step to step
        batched = None if weights is None else self._makes.bound(
            weights, [self._masks[name] for name in self.ctx.layers], self.pattern.m, self.ctx.layout)
        for (name, mod), made in zip(self.ctx.layers.items(), batched or [None] * len(self.ctx.layers)):
            mask = self._masks[name]
            if made is None and ahead:
                made = clamp_pruned_masked_(mod.weight, mask, self.pattern.m, self.ctx.layout)
            if made is None:
                bound_pruned(mod.weight, mask, self.pattern.m, self.ctx.layout)
            else:
                self.hold_product(name, mod, made)

    def forward_weight(self, name, module):
        return self.masked_held_with_decay(name, module, self.params.decay)

    def layer_forward(self, name, module, x):
        sparse = self.accel.sparse.get(name) if self.accel is not None else None
        if sparse is None:      # masked dense: W~ = W * E through the layer's own GEMM
            return super().layer_forward(name, module, x)
        self.note_decay(name, module, self.mask(name), self.params.decay)
        return sparse(x, module.weight, module.bias, self.mask(name))

    def accel_report(self):
        return None if self.accel is None else self.accel.report()

    def export_pattern(self, name):
        return self.pattern

    def densities(self, name, step):
        r = self.pattern.density
        return r, r, self.wgrad_density()


@torch.no_grad()
def bound_pruned(weight: torch.Tensor, mask: torch.Tensor, m: int, layout: str) -> None:
    """Clamp, in place, every pruned weight's magnitude to the largest kept magnitude of its group of M
    (along K, GEMM view); kept weights and signs are untouched.

    It runs after every optimizer step, so it works on the weight itself (`grouped` views, no copies): one
    clamp of the whole group to ±cap leaves the kept weights as they are, since |kept| <= cap by definition.
    (Only where every kept weight of a group is exactly 0 may a pruned zero come out with the other sign.)
    On a CPU layer one fused pass does it (`sparsity.fused.clamp_pruned_`: the same result).
    """
    if clamp_pruned_(weight, mask, m, layout):
        return
    try:
        wg, dim = grouped(weight, m, layout)
    except RuntimeError:        # a memory order with no grouped view: edit a contiguous copy, copy it back
        copy = weight.contiguous()
        bound_pruned(copy, mask.contiguous(), m, layout)
        weight.copy_(copy)
        return
    eg, _ = grouped(mask.to(weight.device).contiguous(), m, layout)
    cap = torch.where(eg, wg.abs(), torch.zeros((), dtype=wg.dtype, device=wg.device)).amax(dim, keepdim=True)
    wg.clamp_(-cap, cap)
