"""How a weight tensor is seen as the GEMM operand whose groups of M get pruned.

A layer's weight is the GEMM operand ``W`` of shape ``C_out x K``: for a Linear it is the weight
itself; for a Conv2d ``K = C_in*kh*kw`` and the order of K depends on the layout:

- ``nhwc`` (default): hardware (cuDNN, ASP) groups M consecutive *input channels* at one kernel tap,
  i.e. the weight seen as ``(C_out, kh, kw, C_in)``. A transposable mask then covers, for every tap,
  the ``C_out x C_in`` slice with M x M tiles.
- ``flatten``: groups along the flattened ``(C_in, kh, kw)`` vector, as in SR-STE's paper and
  Bi-Mask's code.

Row-wise N:M runs along K (rows of the matrix), the forward GEMM's reduction axis. Transposable N:M
additionally holds along C_out (columns), the backward-data GEMM's reduction axis.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import SparsityError
from .pattern import Pattern

LAYOUTS = ("nhwc", "flatten")


class LayoutError(SparsityError):
    """A weight shape that cannot hold a pattern under a layout; the message names the constraint."""


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise LayoutError(f"layout {layout!r} is unknown; use one of: {', '.join(LAYOUTS)}")


def grouped_dims(shape: Sequence[int], layout: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """Names and sizes of (the dimension grouped by row-wise N:M, the C_out dimension)."""
    if len(shape) == 2:
        return ("in_features", shape[1]), ("out_features", shape[0])
    if layout == "nhwc":
        return ("C_in", shape[1]), ("C_out", shape[0])
    return ("C_in*kh*kw", shape[1] * shape[2] * shape[3]), ("C_out", shape[0])


# (constraint name, applies(pattern), check(shape, layout, m), message). First failure wins.
_SHAPE_CONSTRAINTS = (
    ("2-D or 4-D", lambda p: True,
     lambda shape, layout, m: len(shape) in (2, 4),
     "a {ndim}-D tensor has no N:M layout (only 2-D Linear and 4-D Conv2d weights do)"),
    ("grouped dim % M == 0", lambda p: True,
     lambda shape, layout, m: grouped_dims(shape, layout)[0][1] % m == 0,
     "{gname}={gsize} is not a multiple of M={m}"),
    ("C_out % M == 0 (transposable)", lambda p: p.transposable,
     lambda shape, layout, m: grouped_dims(shape, layout)[1][1] % m == 0,
     "{oname}={osize} is not a multiple of M={m}, which transposable M x M tiles need"),
)


def shape_violation(shape: Sequence[int], pattern: Pattern, layout: str = "nhwc") -> str | None:
    """Why ``shape`` cannot hold ``pattern`` under ``layout``, or None when it can."""
    check_layout(layout)
    shape = tuple(int(s) for s in shape)
    for _name, applies, check, message in _SHAPE_CONSTRAINTS:
        if applies(pattern) and not check(shape, layout, pattern.m):
            fields = {"ndim": len(shape), "m": pattern.m}
            if len(shape) in (2, 4):
                (gname, gsize), (oname, osize) = grouped_dims(shape, layout)
                fields.update(gname=gname, gsize=gsize, oname=oname, osize=osize)
            return message.format(**fields)
    return None


def require_fits(shape: Sequence[int], pattern: Pattern, layout: str = "nhwc") -> None:
    problem = shape_violation(shape, pattern, layout)
    if problem is not None:
        raise LayoutError(f"shape {tuple(shape)} cannot hold {pattern.describe()}: {problem}")


def to_matrix(weight: torch.Tensor, layout: str = "nhwc") -> torch.Tensor:
    """The GEMM operand ``C_out x K`` (a view when possible, a copy for ``nhwc`` convs)."""
    check_layout(layout)
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise LayoutError(f"a {weight.dim()}-D tensor has no N:M layout (only 2-D and 4-D weights do)")
    if layout == "nhwc":
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: Sequence[int], layout: str = "nhwc") -> torch.Tensor:
    """Inverse of :func:`to_matrix`: back to the weight's own shape."""
    check_layout(layout)
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape)
    c_out, c_in, kh, kw = shape
    if layout == "nhwc":
        return matrix.reshape(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    return matrix.reshape(shape)


def grouped(tensor: torch.Tensor, m: int, layout: str = "nhwc") -> tuple[torch.Tensor, int]:
    """``tensor`` (a weight, or a mask of its shape) with its groups of M along K as one dimension, and that
    dimension: ``(C_out, K/M, M)``, dim 2, for a Linear or a ``flatten`` conv; ``(C_out, C_in/M, M, kh, kw)``,
    dim 2, for an ``nhwc`` conv. Always a view (no copy, unlike ``to_matrix`` for ``nhwc``), so per-group
    reductions and in-place edits work on the tensor itself; ``view``'s RuntimeError where the memory order
    allows none (a ``flatten`` view of a channels-last conv weight)."""
    check_layout(layout)
    if tensor.dim() == 4 and layout == "nhwc":
        c_out, c_in, kh, kw = tensor.shape
        return tensor.view(c_out, c_in // m, m, kh, kw), 2
    if tensor.dim() not in (2, 4):
        raise LayoutError(f"a {tensor.dim()}-D tensor has no N:M layout (only 2-D and 4-D weights do)")
    return tensor.view(tensor.shape[0], -1, m), 2


def to_tiles(matrix: torch.Tensor, m: int) -> torch.Tensor:
    """``R x K`` matrix -> ``(R/m * K/m, m, m)`` tiles of m consecutive rows and m consecutive columns."""
    r, k = matrix.shape
    return matrix.reshape(r // m, m, k // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)


def from_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`."""
    m = tiles.shape[-1]
    return tiles.reshape(rows // m, cols // m, m, m).permute(0, 2, 1, 3).reshape(rows, cols)
