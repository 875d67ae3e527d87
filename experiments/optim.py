"""AdamW with torch's numbers, bit for bit, that takes the pruned weights' zero second moments at full speed on
a CPU.

Why: a weight a mask prunes from the start gets a gradient of exactly zero (``fixed``, ``unstructured``), so
AdamW's second moment ``exp_avg_sq`` holds a zero there for good. torch's AdamW then takes
``exp_avg_sq.sqrt()`` of it every step, and on a CPU a float ``sqrt`` runs through MKL's VML, which sends
each zero down its rare-value path: on the GPT of the language-model task, with half of each matrix's moments
zero, AdamW's denominator took 2.9 ms a step against 0.85 ms for moments of the same shapes without zeros, 7%
of dense's whole step (docs/speed.md, the eighteenth session). `fused.adam_denominator` makes the same
denominator, VML's own square roots included, without sending a zero to VML.

`AdamW` is torch's `torch.optim.AdamW` (a subclass: the same arguments, state, ``state_dict`` and hooks) whose
step, for a parameter group torch itself would update with its single-tensor loop (CPU parameters, real,
no ``amsgrad``, ``maximize``, ``foreach``, ``fused``, ``capturable`` or ``differentiable``, plain-number
``lr`` and betas), runs that loop's operations in its order, with the denominator from the kernel where it
serves. Every other group goes to torch's own update, as `torch.optim.AdamW.step` calls it.
tests/test_optim.py checks parameters and state against torch's AdamW bit for bit.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam
from torch.optim.optimizer import _use_grad_for_differentiable

from ..sparsity import fused


def _torch_loop(group: dict, params: list[torch.Tensor], has_complex: bool) -> bool:
    """Whether torch's AdamW updates this group with its single-tensor loop, which `_update` reproduces."""
    return not (has_complex or group["amsgrad"] or group["maximize"] or group["foreach"] or group["fused"]
                or group["capturable"] or group["differentiable"] or not group["decoupled_weight_decay"]
                or any(isinstance(x, torch.Tensor) for x in (group["lr"], *group["betas"]))
                or torch.compiler.is_compiling() or not all(p.is_cpu for p in params))


LOOK_EVERY = 16     # steps between two looks for zeros in the moments of a matrix whose last look found none


def _update(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
            exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], looks: dict[torch.Tensor, float]) -> None:
    """torch's single-tensor AdamW update (``torch.optim.adam._single_tensor_adam`` with decoupled weight decay,
    torch 2.14): the same operations on the same operands in the same order, so the same roundings.

    ``looks``: per matrix, the step from which to ask the kernel again, where it last found no zero (a dense
    gradient's moments). Its call, cold inside a step, took about 8 µs a matrix (0.15 ms of the GPT's dense
    step); a mask that starts pruning later is seen within `LOOK_EVERY` steps. Only the time depends on it."""
    beta1, beta2 = group["betas"]
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        # a mask prunes matrices and convs: a bias's or a norm's moments are left to the formula, which spares
        # them the kernel's look for zeros (ViT-Tiny has 36 of them)
        denom = None
        if param.dim() >= 2 and looks.get(param, 0) <= step:
            denom = fused.adam_denominator(exp_avg_sq, bias_correction2_sqrt, eps)
            if denom is None:
                looks[param] = step + LOOK_EVERY
        if denom is None:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(torch.optim.AdamW):
    """`torch.optim.AdamW`, the same numbers bit for bit; see the module's docstring for what differs (time)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._looks: dict[torch.Tensor, float] = {}        # `_update`'s: where to skip the kernel for a while

    @_use_grad_for_differentiable
    def step(self, closure=None):
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)  # AMP's
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            max_exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            if grad_scale is None and found_inf is None and _torch_loop(group, params, has_complex):
                _update(group, params, grads, exp_avgs, exp_avg_sqs, steps, self._looks)
                continue
            beta1, beta2 = group["betas"]       # torch's own update, as torch.optim.AdamW.step calls it
            adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=group["amsgrad"],
                 has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                 foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                 fused=group["fused"], grad_scale=grad_scale, found_inf=found_inf,
                 decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss
