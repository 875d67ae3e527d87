"""Training FLOPs: GEMM multiply-accumulates of forward, backward-data and backward-weight.

Each Conv2d/Linear does one GEMM of ``F`` MACs per sample forward; backward-data and backward-weight
each cost ``F`` again when dense. A method says, per layer and step, which share of each GEMM N:M
sparse tensor cores must do (``Method.densities``): an operand counts as sparse only where it is N:M
along that GEMM's reduction dimension (forward: along K; backward-data: along C_out), and the weight
gradient counts as sparse only where the method needs it at kept entries alone, or at 0.5 where it
takes the MVUE 2:4 sample of dY along the tokens (``method.params.mvue_dw``, methods/wgrad.py). With
density r on the sparse layers this gives SR-STE ``F(r + 2)`` (``F(r + 1.5)`` with mvue_dw),
transposable and Bi-Mask ``F(2r + 1)`` (transposable ``F(2r + 0.5)`` with mvue_dw), fully sparse
``3rF``; dense layers add ``3F_d``. (By the papers' convention, the first layer's
backward-data GEMM is counted too, although autograd skips it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .evaluate import eval_mode


def macs_per_sample(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Forward GEMM MACs of every Conv2d/Linear for one sample (measured with hooks on one pass), of
    every module that declares ``matmul_macs(output)`` (activation x activation products, always dense)
    and of every nn.MultiheadAttention. GEMMs another module runs on a Linear's ``.weight`` itself (as
    torchvision's Swin attention does) are not seen, hence not counted."""
    macs: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            def hook(module, inputs, output, _name=name):
                macs[_name] = macs.get(_name, 0) + layer_macs(module, output) // output.shape[0]
            hooks.append(mod.register_forward_hook(hook))
        elif hasattr(mod, "matmul_macs"):
            # products of two activations (attention's Q K^T and A V): dense GEMMs with no weight
            def hook(module, inputs, output, _name=name):
                macs[_name] = macs.get(_name, 0) + module.matmul_macs(output)
            hooks.append(mod.register_forward_hook(hook))
        elif isinstance(mod, nn.MultiheadAttention):
            # It multiplies by in_proj_weight and out_proj.weight itself (no Linear forward runs), so its
            # projections and activation products are counted here, all dense.
            def hook(module, args, kwargs, output, _name=name):
                macs[_name] = macs.get(_name, 0) + attention_macs(module, *_query_key(args, kwargs))
            hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), eval_mode(model):
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one forward call of a Linear or Conv2d that produced ``output``."""
    per_out = module.in_features if isinstance(module, nn.Linear) else \
        module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return output.numel() * per_out


def _query_key(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (args[0] if args else kwargs["query"]), (args[1] if len(args) > 1 else kwargs["key"])


def attention_macs(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> int:
    """MACs per sample of nn.MultiheadAttention: q, k, v and output projections, Q K^T and A V."""
    axis = 0 if query.dim() == 2 or not module.batch_first else 1     # the token axis
    tq, tk, d = query.shape[axis], key.shape[axis], module.embed_dim
    return tq * d * d + tk * module.kdim * d + tk * module.vdim * d + tq * d * d + 2 * tq * tk * d


@dataclass
class FlopCounter:
    macs: dict[str, int]                 # per-sample forward MACs by layer
    forward: int = 0
    backward_data: int = 0
    backward_weight: int = 0
    dense_total: int = 0
    per_layer: dict[str, list[float]] = field(default_factory=dict)

    def add_step(self, batch: int, densities: dict[str, tuple[float, float, float]]) -> None:
        """Account one training step of ``batch`` samples; layers missing from ``densities`` are dense."""
        self.add_macs({name: batch * f for name, f in self.macs.items()}, densities)

    def add_macs(self, macs: dict[str, int], densities: dict[str, tuple[float, float, float]]) -> None:
        """Account one training step whose forward GEMMs did ``macs`` by layer (`nmtrain.sparsify` measures
        them on the step's own forward passes); layers missing from ``densities`` are dense."""
        for name, f in macs.items():
            df, dd, dw = densities.get(name, (1.0, 1.0, 1.0))
            self.forward += round(f * df)
            self.backward_data += round(f * dd)
            self.backward_weight += round(f * dw)
            self.dense_total += 3 * f

    def summary(self) -> dict:
        total = self.forward + self.backward_data + self.backward_weight
        return {"forward": self.forward, "backward_data": self.backward_data,
                "backward_weight": self.backward_weight, "total": total, "dense_total": self.dense_total,
                "ratio": total / self.dense_total if self.dense_total else 1.0,
                "dense_over_run": self.dense_total / total if total else 1.0}
