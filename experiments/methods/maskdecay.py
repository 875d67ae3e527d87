"""`maskdecay` (Hu et al., ICML 2024, arXiv 2404.01847): transposable 2:4 pre-training with masked decay.

Source: huyz2023/2by4-pretrain (``README.md``, "Accelerating Transformer Pre-training with 2:4
Sparsity", and ``sparse/decay.py`` ``masked_add_``) and its nanoGPT example,
thu-ml/2by4-pretrain-acc-examples ``v1/nanoGPT/sparse_ops.py`` (``SparseLinearTranspose``) and
``v1/nanoGPT/train.py``. A run has two phases:

1. **Sparse**, steps ``[0, total - dense_finetune * total)``:

   - The mask ``E`` is transposable N:M (N:M along K and along C_out), chosen exactly (the
     ``exact`` solver; the authors' ``TransposableSparse`` scores every valid 4 x 4 tile pattern, also
     exact), first at step 0 and then every ``mask_interval`` optimizer steps (``sparse_ops.py``:
     ``self.weight.freq = 40``, recomputed at the first forward of every 40th optimizer step, counting
     from 0). Each recompute's flip rate, the share of mask entries that changed, goes to
     metrics.jsonl ``mask_recomputes``: the health signal the authors tune ``alpha`` by.
   - Forward ``W~ = W ⊙ E``; backward-data through ``W~`` (N:M along C_out: sparse too); the weight
     gradient goes straight through to all of ``W`` (``sparse_linear_transpose.backward`` returns the
     dense ``dW~`` as the gradient of the dense weight). With ``mvue_dw`` (default on, as the authors'
     ``grad_weight = mm(to_sparse_semi_structured(grad_output.t(), MVUE24=True), input)``) the weight
     gradient's ``dY`` is the MVUE 2:4 sample along the tokens (the base class's ``sparse_gemm``).
   - **Masked decay**, after gradient clipping and before the optimizer step (``train.py``: the
     ``masked_add_`` loop sits between ``clip_grad_norm_`` and ``scaler.step``)::

         g <- g + alpha * (1 - E) ⊙ W          (pruned entries only; kept entries untouched)

     ``train_step`` clips before ``after_backward``, so it runs there. Unlike SR-STE's decay (inside
     the backward, so clipped with the loss's gradient), this term is not clipped.

2. **Dense fine-tune**, the last ``dense_finetune`` share of the run: the layers become plain dense
   layers (``p.mode = 'dense'`` → ``F.linear(x, self.weight, self.bias)``): all three GEMMs dense, no
   masked decay, no MVUE, no recompute. The exported model is then dense: ``masks()`` are all-ones
   (summary.json's ``sparse_layers`` report density 1.0), ``export_pattern`` None. With
   ``dense_finetune: 0`` the run stays sparse and exports N:M-T weights ``W ⊙ E``.

Defaults, from the authors' code:

- ``alpha`` 6e-5: ``v1/nanoGPT/train.py`` ``alpha = 6e-5 # masked decay factor`` (the repository's
  README: 6e-5 for GPT-2 124M and 774M, 2e-4 for 350M and 1558M).
- ``mask_interval`` 40: ``v1/nanoGPT/sparse_ops.py`` ``self.weight.freq = 40  # update freq``.
- ``dense_finetune`` 1/6: ``train.py`` switches at ``if iter_num == 250000`` of ``max_iters = 300000``
  (``config/train_gpt2.py``), the last 50000 of 300000 iterations. nmtrain's dense phase starts at step
  ``total - round(dense_finetune * total)``; the authors' switch runs after the optimizer step of
  iteration 250000, so their dense forward starts one iteration later (of 300001 iterations).
- ``mvue_dw`` true: the nanoGPT example's weight gradient (above).

GEMM densities: ``(r, r, wgrad_density())`` in the sparse phase, ``(1, 1, 1)`` in the dense fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...sparsity import transposable_mask
from ...sparsity.fused import add_masked_decay_
from ..layers import gemm
from ..rules import DECAY, FRACTION, STEPS, param
from .base import Capabilities, RecomputedMaskMethod, register_method


@dataclass
class MaskDecayParams:
    alpha: float = param(6e-5, DECAY)                 # masked decay on pruned weights, after clipping
    mask_interval: int = param(40, STEPS)             # optimizer steps between two mask recomputes
    dense_finetune: float = param(1 / 6, FRACTION)    # last share of the run trained dense (0: none)
    mvue_dw: bool = True                              # weight gradient through the MVUE 2:4 sample of dY


@register_method("maskdecay")
class MaskDecay(RecomputedMaskMethod):
    Params = MaskDecayParams
    caps = Capabilities(sparse_gemms=("forward", "backward_data", "weight_grad"), needs_transposable=True,
                        accepts_transposable=True, scheduled=True)
    summary = ("Hu et al.: transposable N:M mask every mask_interval steps, masked decay after clipping, "
               "MVUE weight gradient, dense fine-tune at the end")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = self.caps.mask_pattern(ctx.pattern)
        self.dense_start = ctx.total_steps - int(round(params.dense_finetune * ctx.total_steps))
        self._dense = False                 # in the dense fine-tune (from before_step(dense_start) on)

    # --- masks ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_masks(self):
        p = self.pattern
        return {name: transposable_mask(mod.weight, p.n, p.m, solver="exact", layout=self.ctx.layout)
                for name, mod in self.ctx.layers.items()}

    def masks(self):
        if self._dense:     # the fine-tuned layers are dense: that is what they deploy
            return {name: torch.ones_like(mod.weight, dtype=torch.bool) for name, mod in self.ctx.layers.items()}
        return super().masks()

    def in_dense_phase(self, step: int) -> bool:
        return step >= self.dense_start

    # --- step hooks --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.in_dense_phase(step):
            self._dense = True
            return
        self.recompute_when_due(step, self.params.mask_interval, self.init_masks)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """Masked decay, ``g += alpha * (1 - E) ⊙ W``: after the clip, before the optimizer step."""
        if self._dense or not self.params.alpha:
            return
        for name, mod in self.ctx.layers.items():
            if mod.weight.grad is not None:
                masked_decay_(mod.weight.grad, mod.weight, self.mask(name), self.params.alpha)

    # --- forward -----------------------------------------------------------------------------
    def forward_weight(self, name, module):
        # W ⊙ E, dW straight through to all of W (no SR-STE decay: masked decay is added in after_backward);
        # every layer's product made at the step's first training forward, as transposable's
        return self.masked_held_with_decay(name, module, 0.0)

    def layer_forward(self, name, module, x):
        if self._dense:     # a plain dense layer: its own GEMM, no mask, no MVUE
            return gemm(module, x, module.weight)
        return super().layer_forward(name, module, x)

    # --- results -----------------------------------------------------------------------------
    def export_pattern(self, name):
        return None if self._dense else self.pattern

    def densities(self, name, step):
        if self.in_dense_phase(step):
            return 1.0, 1.0, 1.0
        r = self.pattern.density
        return r, r, self.wgrad_density()

    def summary_fields(self):
        return {"dense_finetune_step": self.dense_start if self.dense_start < self.ctx.total_steps else None}

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "dense": self._dense}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._dense = bool(state.get("dense", False))


@torch.no_grad()
def masked_decay_(grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, alpha: float) -> None:
    """``grad += alpha * (1 - mask) * weight`` in place (the authors' ``masked_add_``): pruned entries
    only, kept entries bit-untouched."""
    keep = mask.to(grad.device)
    if not add_masked_decay_(grad, weight, keep, alpha):        # one compiled pass on a CPU layer, else:
        grad.copy_(torch.where(keep, grad, grad + alpha * weight.detach()))
