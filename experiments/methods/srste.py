"""`srste` (Zhou et al., ICLR 2021): the N:M mask recomputed from |W| at every forward pass.

Train and eval both use ``W~ = E * W`` with ``E`` the row-wise N:M magnitude mask of the current
weights. The gradient with respect to ``W~`` passes straight through to all of ``W``, plus
``decay * (1 - E) * W`` (lambda_W = 2e-4). Only the forward GEMM is N:M sparse: the backward-data
product ``dY W~`` needs W~ N:M along C_out, which a row-wise mask is not, and the weight gradient is
dense. Training MACs: F * (r + 2).

``mvue_dw: true`` (*nmtrain*, off by default: Zhou et al. train with the dense weight gradient) takes the
weight gradient as ``MVUE(dYᵀ) X`` (Hu et al. 2024; methods/wgrad.py): an unbiased 2:4 sample along the
tokens, so that GEMM counts at density 0.5 and training MACs are F * (r + 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...sparsity import Pattern
from ..rules import DECAY, param
from .base import Capabilities, Method, register_method


@dataclass
class SRSTEParams:
    decay: float = param(2e-4, DECAY)      # lambda_W
    mvue_dw: bool = False                  # weight gradient from the MVUE 2:4 sample of dY (methods/wgrad.py)


@register_method("srste")
class SRSTE(Method):
    Params = SRSTEParams
    caps = Capabilities(sparse_gemms=("forward",))
    summary = "SR-STE: N:M mask from |W| every step, straight-through gradient + decay on pruned weights"

    def forward_weight(self, name, module):
        return self.masked_nm_with_decay(name, module, self.ctx.pattern, self.params.decay)

    def masks(self):
        return self.row_masks(self.ctx.pattern)

    def export_pattern(self, name):
        return Pattern(self.ctx.pattern.n, self.ctx.pattern.m)

    def densities(self, name, step):
        return self.ctx.pattern.density, 1.0, self.wgrad_density()
