"""`sste` (Hu, Zhu, Chen, NeurIPS 2024): S-STE, a continuous N:M pruning function with a fixed scale.

Source: huyz2023/2by4-pretrain, ``sparse/utils.py`` ``_soft_threshold`` (the 2:4 kernel) and its README's
S-STE section (``SoftThreshold``, ``SparseLinear.init_scale``), used as such by the authors' experiments
(thu-ml/2by4-pretrain-acc-examples ``v2/nanoGPT/sparse_ops.py``, ``model.py``). Every step::

    S(W)  per group of M consecutive weights along K (GEMM view, ``ctx.layout``): t = the (N+1)-th
          largest |w| of the group; S(w) = sign(w) * max(|w| - t, 0)
    W~  = beta * S(W)          the forward weight, also in evaluation
    dW  = dW~                  straight through, unscaled (below)

- ``S(W)`` is N:M (at most the N largest of a group exceed t) and continuous in W: a weight crossing
  the threshold enters at 0. For 2:4 the authors' kernel takes t as
  ``min(max(min(a0,a1), min(a2,a3)), min(max(a0,a1), max(a2,a3)))``, the second smallest of four
  magnitudes = the third largest; nmtrain takes the (N+1)-th largest for any N:M. Entries at or below
  t are exactly +0.0 (a tie at t gives 0 whichever way it is broken), so ``S(W)`` does not depend on
  tie-breaking.
- ``beta = <W, S(W)> / <S(W), S(W)>``, one scalar per tensor (``init_scale``), computed once and then
  held: the authors compute it when the model is built, from its initial weights, and keep it in a
  buffer (the paper found a recomputed scale harmful). *nmtrain*: beta of every layer is set by
  whichever comes first of the first ``before_step``, forward (an evaluation) or export, from the
  weights then; in a run these are always the weights the run starts with (the random init, or
  ``model.init``), since nothing updates them before step 0. Checkpoints keep it, so a resumed run
  goes on with the same beta.
  *nmtrain*: when ``S(W)`` is 0 everywhere (every group tied at its threshold, an all-zero layer) the
  authors' ratio is 0/0; beta is then 1.0, and the forward weight is 0 whatever beta is.
- Backward: the authors' ``SoftThreshold.backward`` returns the incoming gradient as it is, so
  ``dL/dW = dL/dW~`` (not ``beta * dL/dW~``, the chain rule through ``beta * I``; docs/methods.md#s-ste).
  No SR-STE decay, no masked decay: pruned weights get the same straight-through gradient.
- The deployed weight is ``beta * S(W)``, not ``W * mask`` (``deployed_weight``): ``model.pt``,
  ``prune``, ``convert`` and every evaluation see the network the forward trained, bit for bit.
  ``masks()`` is the N:M mask holding ``S(W)``'s non-zeros: the N largest |w| of every group (exactly
  N kept even with ties; S is 0 at a tied threshold entry either way).

Parameters: ``mvue_dw`` (default false): the weight-gradient GEMM takes dY through the MVUE 2:4
sample along the tokens, as the authors' ``fp8_linear`` does with ``MVUE24_approx_triton`` (the base
class's ``sparse_gemm`` implements it). GEMM densities: forward N/M; backward-data dense (``W~`` is N:M
along K, not along C_out); weight gradient 0.5 with ``mvue_dw``, else dense. Training MACs:
F * (r + 1 + d), d = 0.5 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...sparsity import Pattern, fold_mask, from_matrix, to_matrix
from ...sparsity.fused import soft_threshold4
from .base import Capabilities, Method, register_method
from .ste import joined


@dataclass
class SSTEParams:
    mvue_dw: bool = False       # weight gradient through the MVUE 2:4 sample of dY (the authors' fp8_linear)


def soft_threshold(weight: torch.Tensor, n: int, m: int, layout: str = "nhwc") -> torch.Tensor:
    """``S(W)``: in every group of ``m`` consecutive weights along K, t = the (n+1)-th largest |w| and
    ``S(w) = sign(w) * max(|w| - t, 0)``; entries at or below t are +0.0. A new tensor, no gradient."""
    w = to_matrix(weight.detach(), layout)
    rows, k = w.shape
    g = w.reshape(rows, k // m, m)
    a = g.abs()
    t = a.topk(n + 1, dim=-1).values[..., n:]          # the (n+1)-th largest, kept as a (.., 1) column
    s = torch.where(a > t, torch.sign(g) * (a - t), torch.zeros((), dtype=g.dtype, device=g.device))
    return from_matrix(s.reshape(rows, k), weight.shape, layout)


def scale_of(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``beta = <W, S> / <S, S>`` over the whole tensor, a 0-dim tensor of the weight's dtype (1.0 when S = 0)."""
    w, s = weight.detach().reshape(-1), s.reshape(-1)
    ss = torch.dot(s, s)
    if float(ss) == 0.0:
        return torch.ones((), dtype=w.dtype, device=w.device)
    return torch.dot(w, s) / ss


def scaled_soft_threshold(weight: torch.Tensor, beta: torch.Tensor, n: int, m: int, layout: str) -> torch.Tensor:
    """``beta * S(W)``: at M = 4 on a CPU layer one compiled pass (`sparsity.fused.soft_threshold4`, bit for bit
    the formula), else (and traced by torch.compile) the tensor formula."""
    if m == 4 and not torch.compiler.is_compiling():
        out = soft_threshold4(to_matrix(weight.detach(), layout), n, beta)
        if out is not None:
            return from_matrix(out, weight.shape, layout)
    return beta * soft_threshold(weight, n, m, layout)


class _SoftThreshold(torch.autograd.Function):
    """``beta * S(W)`` forward; the gradient passes to W unchanged (the authors' ``SoftThreshold``)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, beta: torch.Tensor, n: int, m: int, layout: str,
                made: torch.Tensor | None) -> torch.Tensor:
        return scaled_soft_threshold(weight, beta, n, m, layout) if made is None else made

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None, None, None


@register_method("sste")
class SSTE(Method):
    Params = SSTEParams
    # weight_grad is sparse only with mvue_dw (off by default): densities() says which, per run
    caps = Capabilities(sparse_gemms=("forward",))
    summary = "S-STE: soft-threshold N:M weight beta*S(W), beta fixed per tensor, straight-through gradient"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = Pattern(ctx.pattern.n, ctx.pattern.m)
        self._beta: dict[str, torch.Tensor] = {}     # per layer, 0-dim; set once (see the module docstring)

    # --- beta -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _set_scales(self) -> None:
        """beta of every layer from its weights now; only where it is not set yet (it never changes after)."""
        p = self.pattern
        for name, mod in self.ctx.layers.items():
            if name not in self._beta:
                self._beta[name] = scale_of(mod.weight, soft_threshold(mod.weight, p.n, p.m, self.ctx.layout))

    def beta(self, name: str) -> torch.Tensor:
        if name not in self._beta:
            self._set_scales()
        beta = self._beta[name]
        device = self.ctx.layers[name].weight.device
        if beta.device != device:
            beta = self._beta[name] = beta.to(device)
        return beta

    # --- forward and export -----------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        self._set_scales()          # sparse training starts: beta from the weights the run starts with

    def forward_weight(self, name, module):
        p, beta = self.pattern, self.beta(name)
        made = None
        if not torch.compiler.is_compiling():   # every layer's at a step's first training forward (per_forward)
            used, made = self.per_forward(name, module, self._thresholded,
                                          batch=self._batch if p.m == 4 else None)
            made = made if used is beta else None
            if (out := joined(module.weight, made)) is not None:   # through autograd's own node (`ste.joined`)
                return out
        return _SoftThreshold.apply(module.weight, beta, p.n, p.m, self.ctx.layout, made)

    def _batch(self, weights: list[torch.Tensor]) -> list | None:
        """`per_forward`'s batch: every layer's `_thresholded` in one call per thread (`sparsity.batch.LayerMakes`),
        where each layer's GEMM view is its own memory (a Linear, or a ``flatten`` conv)."""
        if not self.own_matrix_views(weights):
            return None
        betas = [self.beta(name) for name in self.ctx.layers]
        made = self._makes.soft(weights, betas, self.pattern.n)
        return None if made is None else [None if out is None else (beta, out) for beta, out in zip(betas, made)]

    def _thresholded(self, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        p, beta = self.pattern, self.beta(name)
        return beta, scaled_soft_threshold(module.weight.detach(), beta, p.n, p.m, self.ctx.layout)

    @torch.no_grad()
    def deployed_weight(self, name, module, mask):
        # The forward's own function, so model.pt holds the very tensor the last forward used; the
        # mask keeps every non-zero of S(W), and fold_mask makes the pruned zeros +0.0.
        return fold_mask(self.forward_weight(name, module), mask)

    def masks(self):
        return self.row_masks(self.pattern)

    def export_pattern(self, name):
        return self.pattern

    def densities(self, name, step):
        return self.pattern.density, 1.0, self.wgrad_density()

    def summary_fields(self):
        return {"beta": {name: float(self.beta(name)) for name in self.ctx.layers}}

    # --- checkpoints ------------------------------------------------------------------------------
    # super(): the base class keeps what its sparse_gemm needs to resume (the MVUE draws' state)
    def state_dict(self):
        return {**super().state_dict(), "beta": dict(self._beta)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._beta = dict(state.get("beta", {}))

