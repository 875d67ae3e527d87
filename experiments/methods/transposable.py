"""`transposable` (Hubara et al., NeurIPS 2021): SR-STE-style training with a transposable N:M mask.

The mask is N:M along K and along C_out, so the forward GEMM ``X W~^T`` and the backward-data GEMM
``dY W~`` both take an N:M operand. The reference recipe computes the first mask exactly and then
recomputes it every ``mask_interval`` (40) iterations with the 2-approximation; nmtrain's default
``solver: null`` uses ``sparsity.solver`` (``exact``), which is fast enough to replace the
approximation; set ``solver: approx`` for the paper's recipe. Weight gradient straight through to
all weights, with the SR-STE decay on pruned ones. Training MACs: F * (2r + 1).

With ``accel: semi_structured`` (2:4 only) the Linear layers that the GPU and torch can run go
through real 2:4 kernels for the forward and backward-data GEMMs (``experiments/accel.py``); the
others, and every Conv2d, run the masked-dense path below, named in one warning and in summary.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...sparsity import Pattern, transposable_mask
from ..accel import plan_accel
from . import MethodError, StoredMaskMethod, register_method
from .ste import ste_mask


@dataclass
class TransposableParams:
    mask_interval: int = 40
    solver: Optional[str] = None        # None: sparsity.solver
    first_solver: str = "exact"         # the first mask
    decay: float = 2e-4


@register_method("transposable")
class Transposable(StoredMaskMethod):
    accepts_transposable = True
    Params = TransposableParams
    needs_transposable = True
    summary = "Hubara et al.: transposable N:M mask (forward and backward-data sparse), recomputed every mask_interval steps"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = Pattern(ctx.pattern.n, ctx.pattern.m, transposable=True)
        self.accel = None
        if ctx.accel == "semi_structured":
            if (self.pattern.n, self.pattern.m) != (2, 4):
                raise MethodError(f"accel: semi_structured needs pattern 2:4, not {self.pattern}")
            self.accel = plan_accel(ctx.layers)

    @torch.no_grad()
    def _compute(self, solver: str) -> dict[str, torch.Tensor]:
        p = self.pattern
        return {name: transposable_mask(mod.weight, p.n, p.m, solver=solver, layout=self.ctx.layout)
                for name, mod in self.ctx.layers.items()}

    def init_masks(self):
        return self._compute(self.params.first_solver)

    def before_step(self, step: int) -> None:
        if not self._masks:
            self._masks = self.init_masks()
        elif step % self.params.mask_interval == 0:
            self._masks = self._compute(self.params.solver or self.ctx.solver)

    def forward_weight(self, name, module):
        return ste_mask(module.weight, self.mask(name), self.params.decay)

    def layer_forward(self, name, module, x):
        sparse = self.accel.sparse.get(name) if self.accel is not None else None
        if sparse is None:      # masked dense: W~ = W * E through the layer's own GEMM
            return super().layer_forward(name, module, x)
        return sparse(x, module.weight, module.bias, self.mask(name), self.params.decay)

    def accel_report(self):
        return None if self.accel is None else self.accel.report()

    def export_pattern(self, name):
        return self.pattern

    def densities(self, name, step):
        r = self.pattern.density
        return r, r, 1.0
