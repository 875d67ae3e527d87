"""MVUE weight gradients: a sparse layer's GEMM whose weight gradient takes a 2:4 sample of ``dYᵀ``.

Source: Hu, Zhu, Chen (ICML 2024, arXiv 2404.01847), code huyz2023/2by4-pretrain ``README.md`` (the
sparse Linear's backward: ``grad_weight = torch.mm(to_sparse_semi_structured(grad_output.t(),
MVUE24=True), input)``); docs/methods.md#mvue-weight-gradients. With ``method.params.mvue_dw: true``,
`Method.sparse_gemm` runs a layer through `mvue_gemm`:

- forward: exactly the layer's own operation (``layers.gemm``: ``F.linear``, or the Conv2d's
  convolution with its stride, padding, padding mode, dilation and groups);
- backward-data and bias: exact, the products autograd computes (``dY W``, ``Σ dY``);
- weight gradient: ``dW = MVUE(dYᵀ) X``, with ``sparsity.mvue24`` taking its groups of 4 along the
  GEMM's reduction dimension, the tokens: every leading dimension of a Linear's input flattened, or
  batch x output positions for a Conv2d (``dY`` viewed as ``(C_out, B·H·W)``, the weight gradient then
  ``torch.ops.aten.convolution_backward`` with the sampled ``dY``). ``E[dW]`` is the dense ``dW``, and
  the GEMM takes a 2:4 operand, so training FLOPs count it at density 0.5 (`Method.wgrad_density`).

``weight`` is whatever the method's forward uses (``E ⊙ W`` through an STE, say); its gradient flows
back through that function to ``module.weight`` as autograd's would.

The draws come from `WeightGradSampler`: one ``torch.Generator`` per device, created on the device of
the first gradient it samples and seeded from the run's seed mixed with a fixed tag (its own stream,
not the data order's ``seed + epoch`` nor torch's global one). Its state is part of the method's
``state_dict``, so a resumed run draws what the uninterrupted one drew. Only a backward pass draws:
evaluation, which has none, leaves the stream where it was. Every process of a multi-process run starts
from the same state (each samples its own ``dY``, so the samples differ; a checkpoint, written by rank 0,
then restores all of them alike). A checkpoint resumed on another device type starts that device's
generator afresh from the seed: still unbiased, no longer the same draws.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...sparsity import mvue24, mvue24_by_channel

TAG = 0x4D565545            # "MVUE": the mixing tag that gives the sampler its own stream


class WeightGradSampler:
    """The random source of a method's MVUE weight gradients, one generator per device."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending: dict[str, torch.Tensor] = {}     # loaded states of generators not created yet

    def stream_seed(self) -> int:
        """The run's seed mixed with `TAG` into one 63-bit seed (a fixed mix, the same in every process)."""
        value = 0
        for part in (self.seed, TAG):
            value = (value * 1_000_003 + int(part) + 0x9E3779B97F4A7C15) % (1 << 63)
        return value

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            state = self._pending.pop(key, None)
            if state is None:
                gen.manual_seed(self.stream_seed())
            else:
                gen.set_state(state)
            self._generators[key] = gen
        return gen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self._pending, **{key: gen.get_state() for key, gen in self._generators.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # States are CPU byte tensors (a checkpoint loader may have moved them to the run's device).
        self._pending = {key: value.detach().to("cpu", torch.uint8) for key, value in state.items()}
        self._generators = {}


# --- the layers' GEMMs -----------------------------------------------------------------------


class _Linear:
    """``F.linear`` and its backward products, the tokens being all leading dimensions flattened."""

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def backward_data(dy, x, weight, need_x, need_bias):
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dy2.mm(weight).reshape(x.shape) if need_x else None
        return dx, (dy2.sum(0) if need_bias else None)

    @staticmethod
    def weight_grad(dy, x, weight, generator):
        dy_t = dy.reshape(-1, dy.shape[-1]).t()                  # (C_out, tokens): 2:4 along the tokens
        return mvue24(dy_t, generator).mm(x.reshape(-1, x.shape[-1]))


class _Conv2d:
    """The convolution ``F.conv2d(x, w, b, stride, padding, dilation, groups)`` on an input already padded
    where the layer pads otherwise (see `_conv_input`), and its backward products."""

    def __init__(self, module: nn.Conv2d, padding: tuple[int, int]):
        self.stride, self.padding, self.dilation = module.stride, padding, module.dilation
        self.groups = module.groups

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _backward(self, dy, x, weight, mask, bias_size=None):
        return torch.ops.aten.convolution_backward(
            dy, x, weight, bias_size, self.stride, self.padding, self.dilation, False, [0, 0], self.groups, mask)

    def backward_data(self, dy, x, weight, need_x, need_bias):
        dx, _, db = self._backward(dy, x, weight, [need_x, False, need_bias], [weight.shape[0]] if need_bias else None)
        return dx, db

    def weight_grad(self, dy, x, weight, generator):
        sampled = mvue24_by_channel(dy, generator)      # dYᵀ (C_out, B·H·W) sampled, in dY's own layout
        return self._backward(sampled, x, weight, [False, True, False])[1]


class _MVUEGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, op, generator_for):
        ctx.save_for_backward(x, weight)
        ctx.op, ctx.generator_for, ctx.has_bias = op, generator_for, bias is not None
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, db = ctx.op.backward_data(dy, x, weight, need_x, need_b and ctx.has_bias)
        dw = ctx.op.weight_grad(dy, x, weight, ctx.generator_for(dy.device)) if need_w else None
        return dx, dw, db, None, None


def _conv_input(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` padded as the layer's own forward pads it outside the convolution, and the padding left to
    the convolution: a padding mode other than zeros pads first (as ``Conv2d._conv_forward``), and
    ``padding='same'`` with an odd total pads its extra row/column on the far side first (as aten's
    ``_convolution_mode``); ``'valid'`` is 0."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if module.padding == "valid":
        return x, (0, 0)
    if module.padding != "same":
        return x, tuple(module.padding)
    totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    extra = [t % 2 for t in totals]
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, tuple(t // 2 for t in totals)


def mvue_gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
              generator_for: Callable[[torch.device], torch.Generator]) -> torch.Tensor:
    """The layer's operation with ``weight`` (and its own bias), its weight gradient ``MVUE(dYᵀ) X``.

    ``generator_for(device)``: the generator the backward draws from (`WeightGradSampler.generator`)."""
    if isinstance(module, nn.Linear):
        return _MVUEGemm.apply(x, weight, module.bias, _Linear, generator_for)
    x, padding = _conv_input(module, x)
    unbatched = x.dim() == 3
    y = _MVUEGemm.apply(x.unsqueeze(0) if unbatched else x, weight, module.bias, _Conv2d(module, padding),
                        generator_for)
    return y.squeeze(0) if unbatched else y
