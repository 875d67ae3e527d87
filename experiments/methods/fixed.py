"""`fixed` (ASP-style): prune once by magnitude, then train with the mask fixed.

The mask is computed at step 0 from the weights the run starts with (set ``model.init`` to start from
a trained checkpoint, as ASP does). The forward uses ``W * E``; autograd then zeroes the gradients of
the pruned weights, so they never come back. With ``sparsity.transposable`` the mask is N:M-T.
"""

from __future__ import annotations

import torch

from ...sparsity import make_mask
from .base import Capabilities, StoredMaskMethod, register_method
from .ste import masked_weight


@register_method("fixed")
class Fixed(StoredMaskMethod):
    # backward-data only with sparsity.transposable (the mask is then N:M along C_out too)
    caps = Capabilities(sparse_gemms=("forward", "backward_data", "weight_grad"), accepts_transposable=True)
    summary = "ASP-style: magnitude N:M mask computed once, then fixed"

    @torch.no_grad()
    def init_masks(self):
        return {name: make_mask(mod.weight, self.ctx.pattern, self.ctx.layout, self.ctx.solver)
                for name, mod in self.ctx.layers.items()}

    def before_step(self, step: int) -> None:
        self.masks()    # computed once, at the first step, from the weights the run starts with

    def forward_weight(self, name, module):
        return masked_weight(module.weight, self.mask_as(name, self.mask(name), module.weight))

    def export_pattern(self, name):
        return self.ctx.pattern

    def densities(self, name, step):
        r = self.ctx.pattern.density
        # forward N:M along K; backward-data N:M along C_out only for -T; dW needed at kept entries only
        return r, (r if self.ctx.pattern.transposable else 1.0), r
