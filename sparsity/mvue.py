"""MVUE 2:4: an unbiased random 2:4 sample of a tensor, along its last dimension in groups of 4.

Source: Hu, Zhu, Chen (ICML 2024, arXiv 2404.01847), code huyz2023/2by4-pretrain ``sparse/utils.py``
``_MVUE24_approx`` (driven by ``sparse/triton_ops.py``; the same scheme in torch: ``sparse/legacy.py``
``MVUE24_approx_torch``). They sample ``dYᵀ`` this way along the tokens so that the weight-gradient GEMM
``dW = MVUE(dYᵀ) X`` takes a 2:4 operand (docs/methods.md#mvue-weight-gradients).

For one group ``x0..x3``: ``a_i = |x_i| + ε`` (ε = 1.19209e-07, the authors' constant: float32's machine
epsilon, so an all-zero group still has a distribution), ``t_i = a_i / Σa``. The first kept index is
drawn with probabilities ``t_i``; the second among the other three in proportion to their ``a``. Index
``i`` is then kept with probability

    p_i = t_i + a_i · (Σ_j t_j / (Σa − a_j) − t_i / (Σa − a_i))

(first draw, or second after some ``j ≠ i``), and a kept entry is written as ``x_i / p_i``, the others 0:
``E[MVUE(x)] = x`` exactly, and each entry's variance is ``x_i² (1/p_i − 1)``.

Draws: two uniforms per group from ``generator`` (``torch.rand``'s numbers, in ``[0, 1)``; float32 on a CPU
drawn by `uniform.uniforms`, the same numbers faster), the first picking the index by the cumulative
``t``, the second by the cumulative ``a`` of the three left, as the authors'
kernel compares ``random0`` and ``random1 · Σ`` with the running sums. Their kernel uses ``<=`` with
Triton's ``[0, 1)`` uniforms, which would take the first index twice when ``random1`` is exactly 0; here
the comparisons are strict (``u < cumsum``), which for ``u`` in ``[0, 1)`` never picks an index of
weight 0, and a second index that rounding pushes onto the first one (only possible when the first is
the last index) falls back to the last one left.

Precision: the probabilities and the sample are computed in float32 (float64 for a float64 input) and
returned in the input's dtype. A last dimension that is not a multiple of 4 is padded with zeros to one,
sampled, and trimmed: the trailing partial group keeps at most 2 of its entries (a padded zero can take
a kept slot, with probability ~ε/Σa), and every entry stays unbiased.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .fused import mvue24_runs, mvue24_sample
from .uniform import uniforms

EPS = 1.19209e-07       # _MVUE24_approx's eps
GROUP = 4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _groups(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype, the last dimension zero-padded to a multiple of 4 and split into groups:
    shape ``(..., ceil(K / 4), 4)``."""
    k = x.shape[-1]
    pad = (-k) % GROUP
    xc = x.to(_compute_dtype(x.dtype))
    if pad:
        xc = F.pad(xc, (0, pad))
    return xc.reshape(*xc.shape[:-1], xc.shape[-1] // GROUP, GROUP)


def _ungroup(g: torch.Tensor, k: int) -> torch.Tensor:
    return g.reshape(*g.shape[:-2], -1)[..., :k]


def _sum4(v: torch.Tensor) -> torch.Tensor:
    """v0 + v1 + v2 + v3 in the kernel's order, kept as a trailing dimension of 1."""
    return (v[..., 0] + v[..., 1] + v[..., 2] + v[..., 3]).unsqueeze(-1)


def _weights_and_probabilities(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups ``g`` (..., 4): ``a``, ``t`` and the keep probabilities ``p``, as ``_MVUE24_approx``."""
    a = g.abs() + EPS
    total = _sum4(a)
    t = a / total
    k = t / (total - a)              # k_j = t_j / (Σa − a_j)
    p = t + a * (_sum4(k) - k)
    return a, t, p


def mvue24_keep_probability(x: torch.Tensor) -> torch.Tensor:
    """The probability ``p_i`` that `mvue24` keeps each entry of ``x`` (same shape; compute dtype)."""
    _, _, p = _weights_and_probabilities(_groups(x))
    return _ungroup(p, x.shape[-1])


def mvue24_variance(x: torch.Tensor) -> torch.Tensor:
    """Each entry's variance under `mvue24`: ``x_i² (1/p_i − 1)`` (same shape; compute dtype)."""
    p = mvue24_keep_probability(x)
    return x.to(p.dtype).square() * (1.0 / p - 1.0)


def _uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """The draws of one sample: ``torch.rand(shape)`` on ``device`` in the compute dtype of ``dtype``."""
    dtype = _compute_dtype(dtype)
    # float32 on the CPU: the same numbers from a compiled copy of torch's engine, 10x faster (sparsity.uniform)
    u = uniforms(shape, generator) if device.type == "cpu" and dtype == torch.float32 else None
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) if u is None else u


def mvue24(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One unbiased 2:4 sample of ``x`` along its last dimension (same shape and dtype as ``x``).

    ``generator``: the source of the two uniforms per group (on ``x``'s device; None: torch's default).
    Draws ``2 · numel / 4`` uniforms (after padding), so a run that samples the same shapes in the same
    order consumes its generator identically."""
    return _sample(x, _uniforms((*x.shape[:-1], -(-x.shape[-1] // GROUP), 2), generator, x.device, x.dtype))


def mvue24_by_channel(dy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A conv weight gradient's sample of its ``dY`` (B, C, *spatial): ``mvue24`` of ``dYᵀ`` viewed (C, B·H·W),
    groups of 4 along the tokens of each channel, returned in ``dy``'s own layout. The same draws and the
    same numbers as ``mvue24(dy.transpose(0, 1).reshape(C, -1), generator)`` reshaped back; on a CPU, with
    H·W a multiple of 4, one compiled pass over ``dy`` as it lies (`fused.mvue24_runs`), without the two
    transposing copies."""
    c = dy.shape[1]
    u = _uniforms((c, -(-(dy.numel() // c) // GROUP), 2), generator, dy.device, dy.dtype)
    sampled = mvue24_runs(dy.reshape(dy.shape[0], c, -1), u, EPS) if dy.is_contiguous() else None
    if sampled is not None:
        return sampled.view(dy.shape)
    return _sample(dy.transpose(0, 1).reshape(c, -1), u).reshape(c, dy.shape[0], *dy.shape[2:]).transpose(0, 1)


def _sample(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The sample of ``x`` from its uniforms ``u`` (..., groups, 2): on a CPU matrix one compiled pass
    (`fused.mvue24_sample`), elsewhere the tensor formula; the same numbers, bit for bit."""
    sampled = mvue24_sample(x, u, EPS)
    if sampled is not None:
        return sampled
    g = _groups(x)
    a, t, p = _weights_and_probabilities(g)
    # First index: the first i with u0 < t_0 + ... + t_i; past t_0 + t_1 + t_2 it is 3.
    first = (torch.cumsum(t[..., :3], -1) <= u[..., :1]).sum(-1, keepdim=True)
    index = torch.arange(GROUP, device=g.device)
    taken = index == first
    # Second index: among the other three in proportion to a (the first's weight set to 0).
    left = torch.where(taken, torch.zeros((), dtype=a.dtype, device=a.device), a)
    cum = torch.cumsum(left, -1)
    second = (cum[..., :3] <= u[..., 1:] * cum[..., 3:]).sum(-1, keepdim=True)
    second = second - (second == first).long()      # rounding onto the first (= 3): the last one left, 2
    keep = taken | (index == second)
    y = torch.where(keep, g / p, torch.zeros((), dtype=g.dtype, device=g.device))
    return _ungroup(y, x.shape[-1]).to(x.dtype)


def mvue24_violation(y: torch.Tensor) -> str | None:
    """Why ``y`` is not a 2:4 sample along its last dimension (None: at most 2 non-zeros in every group of
    4, the trailing partial group included)."""
    k = y.shape[-1]
    nz = _groups((y != 0).to(torch.float32)).sum(-1)
    bad = nz > 2
    if not bool(bad.any()):
        return None
    where = tuple(int(i) for i in bad.nonzero()[0])
    *lead, group = where
    lo, hi = group * GROUP, min(group * GROUP + GROUP, k) - 1
    return (f"index {tuple(lead)}, entries {lo}..{hi} of the last dimension hold {int(nz[where])} non-zeros, "
            "want at most 2")


def is_mvue24(y: torch.Tensor) -> bool:
    return mvue24_violation(y) is None
