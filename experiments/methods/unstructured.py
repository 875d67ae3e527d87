"""`unstructured`: magnitude pruning to the pattern's density, anywhere in the layer (or the model).

Keeps the same share of weights as the N:M pattern (N/M) with no structure, the upper bound N:M
methods are compared against. ``scope: layer`` prunes each layer to the density, ``global`` ranks all
sparse layers' weights together. ``gradual: true`` follows Zhu & Gupta's cubic schedule from dense to
the target between ``start`` and ``end`` (fractions of training), recomputing the mask every
``interval`` steps; otherwise the mask is set once at step 0. Pruned weights get no gradient.
Unstructured sparsity is not N:M, so no GEMM counts as accelerated except the weight gradient, which
is needed at kept entries only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...sparsity import magnitude, unstructured_mask
from ..rules import FRACTION, STEPS, Choice, param
from .base import Capabilities, MethodError, StoredMaskMethod, register_method
from .ste import masked_weight


@dataclass
class UnstructuredParams:
    scope: str = param("layer", choice=Choice(("layer", "global")))
    gradual: bool = False
    start: float = param(0.0, FRACTION)     # fraction of training where gradual pruning starts
    end: float = param(0.5, FRACTION)       # ... and reaches the target density
    interval: int = param(50, STEPS)        # steps between mask updates when gradual

    def check(self) -> None:
        """What depends on two parameters (each one's own range and choices are on its field)."""
        if self.start > self.end:
            raise MethodError("method.params.start/end: need 0 <= start <= end <= 1 (fractions of training)")


@register_method("unstructured")
class Unstructured(StoredMaskMethod):
    Params = UnstructuredParams
    caps = Capabilities(sparse_gemms=("weight_grad",), scheduled=True)     # no N:M structure: only dW, at kept entries
    summary = "magnitude pruning to density N/M, no structure (layer or global, fixed or gradual)"

    def target_density(self, step: int) -> float:
        final = self.ctx.pattern.density
        if not self.params.gradual:
            return final
        t0 = self.params.start * self.ctx.total_steps
        t1 = max(self.params.end * self.ctx.total_steps, t0 + 1)
        progress = min(max((step - t0) / (t1 - t0), 0.0), 1.0)
        # cubic: sparsity s_t = s_f * (1 - (1 - progress)^3)
        return 1.0 - (1.0 - final) * (1.0 - (1.0 - progress) ** 3)

    @torch.no_grad()
    def _compute(self, step: int) -> dict[str, torch.Tensor]:
        density = self.target_density(step)
        layers = self.ctx.layers
        if self.params.scope == "layer":
            return {n: unstructured_mask(m.weight, density) for n, m in layers.items()}
        scores = torch.cat([magnitude(m.weight).reshape(-1) for m in layers.values()])
        k = int(round(density * scores.numel()))
        threshold = scores.topk(k).values.min() if k else float("inf")
        return {n: magnitude(m.weight) >= threshold for n, m in layers.items()}

    def init_masks(self):
        return self._compute(0)

    def before_step(self, step: int) -> None:
        if not self._masks or (self.params.gradual and step % self.params.interval == 0
                               and step <= self.params.end * self.ctx.total_steps + self.params.interval):
            self._masks = self._compute(step)

    def forward_weight(self, name, module):
        return masked_weight(module.weight, self.mask_as(name, self.mask(name), module.weight))

    def densities(self, name, step):
        return 1.0, 1.0, self.target_density(step)
