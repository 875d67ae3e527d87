"""Straight-through masking with SR-STE's sparse-refined decay (Zhou et al., ICLR 2021).

Forward: ``W~ = E * W``. Backward: the gradient with respect to ``W~`` passes straight through to
all of ``W`` (pruned weights keep learning, so masks can change), plus ``decay * (1 - E) * W`` on the
pruned weights, which pulls them towards zero and so stabilises the mask. With ``decay = 0`` this is
plain STE.

The methods call it with ``decay = 0`` (`Method.masked_with_decay`) and add the decay once per optimizer
step instead (`Method.add_pruned_decay`): added in the backward, it would be added once per micro-batch
under gradient accumulation, divided by AMP's loss scale, and clipped with the loss's gradient. The
``decay`` argument stays as the formula's transcription (the sparse kernels' tests compare with it).
"""

from __future__ import annotations

import torch

from ...sparsity import nm_mask
from ...sparsity.fused import masked
from ...sparsity.nm import nm_mask_and_product


class _STEMask(torch.autograd.Function):
    """``W * mask`` through `product`; the gradient straight through, plus the decay term where one is given
    (only then is anything saved for the backward)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, decay: float, made: torch.Tensor | None):
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return product(weight, mask) if made is None else made

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.decay:
            weight, mask = ctx.saved_tensors
            # weight first: ``decay * (~mask)`` would be a float32 tensor, rounding decay for a float64 weight
            grad = grad + ctx.decay * (weight * ~mask)
        return grad, None, None, None


class _STENM(torch.autograd.Function):
    """``W * E``, ``E`` the row-wise N:M mask of W itself, both made in one pass (`sparsity.nm_mask_and_product`);
    the gradient straight through. ``E`` is a second output, not differentiable."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, n: int, m: int, layout: str, made: tuple | None):
        keep, out = nm_mask_and_product(weight, n, m, layout) if made is None else made
        ctx.mark_non_differentiable(keep)
        # the backward never reads E's gradient: left unmaterialised, autograd does not make a zero tensor of
        # E's shape for it at every backward (on the GPT's SR-STE step, 12 zero-fills a step, about 0.2 ms)
        ctx.set_materialize_grads(False)
        return out, keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _keep_grad):
        return grad, None, None, None, None


class _Masked(torch.autograd.Function):
    """``W * mask`` through `product`, with autograd's masked gradient ``dW~ * mask``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return product(weight, mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return product(grad, mask), None            # a graph-building grad (create_graph) takes the tensor path


def product(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values * mask``, in one serial pass on a CPU layer (`sparsity.fused.masked`: no thread wake-up, no cast
    of a bool mask), bit for bit; elsewhere, and traced by torch.compile, the tensor product."""
    if torch.compiler.is_compiling():
        return values * mask
    # with grad mode off nothing records the product, so the kernel may serve a tensor that requires grad
    # (a weight, in a Function's forward or backward); with it on (create_graph) the product stays autograd's
    out = masked(values if torch.is_grad_enabled() else values.detach(), mask)
    return values * mask if out is None else out


def straight_through(weight: torch.Tensor, made: torch.Tensor) -> torch.Tensor:
    """``made`` (``W * E`` of ``weight``, detached) as the forward weight whose gradient passes straight through to
    ``weight`` by autograd's own node, with no pass over either: ``weight.view_as(weight)``, whose backward hands
    the gradient on as it comes, its data then set to ``made``'s (``.data``: the view's autograd record stays
    ``weight``'s, its values and storage are ``made``'s). The same values and the same gradient, bit for bit, as
    `ste_mask` and `ste_nm` give with ``made``. ``made`` itself where the Function is the only path: a weight that
    takes no gradient, grad mode off, or traced by torch.compile.

    Why: a Python Function's node costs its layer 10-15 µs a backward, run cold between the GEMMs (the engine
    takes the GIL and calls ``backward``), and its forward's call more; the view's node is C++ and copies
    nothing. Before it, layers under torch's parallel grain took ``weight.clone()`` with ``made`` copied in (two
    passes; a larger layer's would wake torch's threads, so those kept the Function): against that, the GPT's
    steps of SR-STE, S-STE, PGF and transposable took 1.5-3.5% less, ViT-Tiny's 0.4-1.4%, LeNet-5's about 1%
    (docs/speed.md, the nineteenth session).

    Autograd takes the result for a view of ``weight``, sharing its version counter: an in-place change of
    ``weight`` between this forward and its backward is refused as for any view saved for the backward (no
    method makes one: the optimizer steps after the backward). Joined at the layer's own forward, where the
    Function's node was made; ``made`` already joined is returned as it is."""
    if linked(made) or not (weight.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return made
    out = weight.view_as(weight)
    out.data = made
    return out


def linked(made: torch.Tensor | None) -> bool:
    """Whether ``made`` is `straight_through`'s: a forward weight already joined to its weight's gradient."""
    return made is not None and made.requires_grad


def joined(weight: torch.Tensor, made: torch.Tensor | None) -> torch.Tensor | None:
    """`straight_through` of ``made`` where it joins; None where it does not (or nothing was made), and the
    caller's Function takes ``made``."""
    out = None if made is None else straight_through(weight, made)
    return out if linked(out) else None


def ste_mask(weight: torch.Tensor, mask: torch.Tensor, decay: float = 0.0,
             made: torch.Tensor | None = None) -> torch.Tensor:
    """``W * mask`` forward, the gradient straight through (plus SR-STE's ``decay`` term where it is given).
    ``made``: ``W * mask`` (detached) made already for this weight and mask (`Method.per_forward`); without
    ``decay``, joined to the weight's gradient here (`straight_through`) rather than taking the Function."""
    if not decay and (out := joined(weight, made)) is not None:
        return out
    return _STEMask.apply(weight, mask, decay, made)


def ste_nm(weight: torch.Tensor, n: int, m: int, layout: str,
           made: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SR-STE's forward weight and its mask: ``(W * E, E)``, ``E`` the row-wise N:M magnitude mask of the current
    ``weight`` (`sparsity.nm_mask`), the gradient straight through. The same values as ``ste_mask(weight,
    nm_mask(weight, ...))``, in one call and, at M = 4 on a CPU, one pass over the weight where those take two,
    each with its own Python on the way. ``made``: ``(E, W * E)`` as `sparsity.nm_mask_and_product` gave them
    for this weight already (`Method.per_forward`), its ``W * E`` joined to the weight's gradient here
    (`straight_through`) rather than taking the Function."""
    if torch.compiler.is_compiling():       # traced: the two tensor formulas
        mask = nm_mask(weight.detach(), n, m, layout)
        return ste_mask(weight, mask), mask
    if made is not None and (out := joined(weight, made[1])) is not None:
        return out, made[0]
    return _STENM.apply(weight, n, m, layout, made)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W * mask`` with autograd's gradient of it, ``dW~ * mask``: the pruned weights get none. The same
    values as ``weight * mask`` forward and backward; with a bool mask each product is one pass on a CPU
    layer (`product`). A mask already cast to the weight's type (`Method.mask_as`) takes autograd's own
    product: its C++ node costs less than a Python Function's, and there is no cast to spare."""
    if torch.compiler.is_compiling() or mask.dtype != torch.bool:
        return weight * mask
    return _Masked.apply(weight, mask)


def change_rate(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """Share of mask entries that flipped between two snapshots (0.0 when there is nothing to compare)."""
    flipped = total = 0
    for name, mask in new.items():
        if name in old:
            flipped += int((old[name] != mask).sum())
            total += mask.numel()
    return flipped / total if total else 0.0
