"""`fixed` (ASP-style): prune once by magnitude, then train with the mask fixed.

The mask is computed at step 0 from the weights the run starts with (set ``model.init`` to start from
a trained checkpoint, as ASP does). The forward uses ``W * E``; autograd then zeroes the gradients of
the pruned weights, so they never come back. With ``sparsity.transposable`` the mask is N:M-T.
"""

from __future__ import annotations

import torch

from ...sparsity import make_mask
from . import Method, register_method


@register_method("fixed")
class Fixed(Method):
    accepts_transposable = True
    summary = "ASP-style: magnitude N:M mask computed once, then fixed"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self._masks: dict[str, torch.Tensor] = {}

    def before_step(self, step: int) -> None:
        if not self._masks:
            with torch.no_grad():
                for name, mod in self.ctx.layers.items():
                    self._masks[name] = make_mask(mod.weight, self.ctx.pattern, self.ctx.layout, self.ctx.solver)

    def forward_weight(self, name, module):
        if name not in self._masks:   # evaluation before the first step
            self.before_step(0)
        return module.weight * self._masks[name]

    def masks(self):
        if not self._masks:
            self.before_step(0)
        return dict(self._masks)

    def export_pattern(self, name):
        return self.ctx.pattern

    def densities(self, name, step):
        r = self.ctx.pattern.density
        # forward N:M along K; backward-data N:M along C_out only for -T; dW needed at kept entries only
        return r, (r if self.ctx.pattern.transposable else 1.0), r

    def state_dict(self):
        return {"masks": dict(self._masks)}

    def load_state_dict(self, state):
        self._masks = dict(state.get("masks", {}))
