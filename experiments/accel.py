"""`accel: semi_structured`: real 2:4 sparse kernels for the transposable method's Linear layers.

On an NVIDIA GPU with compute capability >= 8.0, PyTorch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``; cuSPARSELt by default, CUTLASS when
``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set) multiply a dense activation by a 2:4 weight on
the sparse tensor cores. ``F.linear(x, S)`` with ``S = compress(W~)`` computes ``x W~^T``: the forward
GEMM. A transposable 2:4 mask makes ``W~^T`` 2:4 along its rows too, so the backward-data GEMM
``dY W~ = dY (W~^T)^T = F.linear(dY, compress(W~^T))`` runs sparse as well. The weight gradient
``dY^T X`` has no 2:4 operand and stays dense.

torch's semi-structured tensors have no autograd formula of their own that could give the
straight-through gradient to the *dense* W (they are built with ``requires_grad=False`` from a
detached tensor), so the layer is one custom ``torch.autograd.Function`` with the same gradient as
the masked-dense path of ``experiments/methods/ste.py``: dW = dY^T X for all of W, plus
``decay * (~mask) * W`` on the pruned weights.

The pieces, top to bottom:

1. the spec check (``accel`` value, method, pattern): one-line SpecError, before anything runs;
2. a constraint table in the style of torch's ``_DTYPE_SHAPE_CONSTRAINTS`` and
   :func:`linear_unsupported`, which says why a layer cannot run sparse on its device (or None);
3. :class:`SparseLinear`: one layer's compressed ``W~`` and ``W~^T``, refreshed only when the weight
   or the mask changed, and the autograd Function that uses them;
4. :func:`plan_accel`: which layers run sparse, which fall back to masked dense and why, with one
   warning per run listing the fallbacks.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .errors import AccelFallbackWarning  # defined beside ExperimentError: the CLI names it without torch
from .io import first_line
from .spec import SpecError

ACCEL_MODES = ("none", "semi_structured")
DEFAULT_DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# 1. The spec


def check_spec(accel: str, method_cls, pattern) -> None:
    """Refuse an ``accel`` value, method or pattern the sparse path cannot run (one-line SpecError).

    ``method_cls`` is a method class: whether it can use the kernels, and at which N:M, is its
    ``caps.accel_patterns`` (methods/ imports this module, so it is not imported here)."""
    if accel not in ACCEL_MODES:
        raise SpecError(f"accel: {accel!r} is unknown; use one of: {', '.join(ACCEL_MODES)}")
    if accel == "none" or method_cls.caps.accel(pattern):
        return
    if not method_cls.caps.accel_patterns:
        # Other methods' masks are not transposable, so W~^T would not be 2:4 (or they need a
        # sparse dW, which the hardware does not have).
        raise SpecError(f"accel: semi_structured runs only with method transposable (W~ and W~^T both 2:4), "
                        f"not {method_cls.name}; use --method transposable --pattern 2:4-T, or accel=none")
    raise SpecError(f"accel: semi_structured needs pattern 2:4 (the sparse tensor cores' only pattern), "
                    f"not {pattern}; use --pattern 2:4-T, or accel=none")


# ---------------------------------------------------------------------------------------------
# 2. What the installed torch and the GPU can run


@dataclass(frozen=True)
class Backend:
    """One of torch's semi-structured backends, as torch/sparse/semi_structured.py defines it."""
    name: str
    # dtype -> (sparse_min_rows, sparse_min_cols): the compressed operand must be a positive multiple
    # of these (torch's _DTYPE_SHAPE_CONSTRAINTS; the dense operand is padded by torch itself).
    shapes: dict
    # compute capabilities (major) the kernels are built for; None: any >= 8.0
    majors: Optional[tuple[int, ...]] = None


# The values of torch 2.14's SparseSemiStructuredTensorCUSPARSELT / ...CUTLASS tables, restricted to the
# dtypes the sparse tensor cores train in (fp16, bf16). tests/test_accel.py checks them against the
# installed torch, so a torch upgrade that changes them fails a test instead of a GPU run.
BACKENDS = {
    "cusparselt": Backend("cusparselt", {torch.bfloat16: (16, 16), torch.float16: (16, 16)}),
    # torch's CUTLASS 2:4 kernels are compiled for sm 8.x only ("Supported only on GPUs with compute
    # capability 8.x" on sm 9.0 and later), so on an H100/H200 only cuSPARSELt runs.
    "cutlass": Backend("cutlass", {torch.bfloat16: (32, 64), torch.float16: (32, 64)}, majors=(8,)),
}
MIN_CAPABILITY = (8, 0)    # sparse tensor cores: Ampere and newer


def torch_api() -> str | None:
    """Why the installed torch cannot build semi-structured tensors, or None."""
    sparse = getattr(torch, "sparse", None)
    for name in ("to_sparse_semi_structured", "SparseSemiStructuredTensor"):
        if not hasattr(sparse, name):
            return f"torch {torch.__version__} lacks torch.sparse.{name}"
    return None


def backend_name() -> str:
    """The backend ``to_sparse_semi_structured`` picks: CUTLASS only when forced (torch's own rule)."""
    forced = torch_api() is None and getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    return "cutlass" if forced else "cusparselt"


def _backend_available(backend: Backend, capability: tuple[int, int]) -> str | None:
    if backend.majors is not None and capability[0] not in backend.majors:
        return (f"the {backend.name} 2:4 kernels are built for compute capability "
                f"{'/'.join(f'{m}.x' for m in backend.majors)} only, this GPU is {capability[0]}.{capability[1]}")
    if backend.name == "cusparselt":
        cusparselt = getattr(torch.backends, "cusparselt", None)
        if cusparselt is None or not cusparselt.is_available():
            return ("this torch build has no cuSPARSELt; set torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS"
                    " = True to use CUTLASS (compute capability 8.x only)")
    return None


def shape_reason(out_features: int, in_features: int, dtype: torch.dtype, backend: Backend) -> str | None:
    """Why a (out, in) weight cannot be compressed as W~ (out x in) *and* W~^T (in x out), or None."""
    if dtype not in backend.shapes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.shapes)
        return f"dtype {str(dtype).replace('torch.', '')}: the 2:4 kernels compute in {names}"
    rows, cols = backend.shapes[dtype]
    # Both orientations are compressed, so each dimension serves once as rows and once as columns.
    step = math.lcm(rows, cols)
    bad = [f"{name}={size}" for name, size in (("in_features", in_features), ("out_features", out_features))
           if size < step or size % step]
    if bad:
        return (f"{' and '.join(bad)} not a multiple of {step} ({backend.name} {str(dtype).replace('torch.', '')} "
                f"needs {rows} x {cols} blocks for W~ and W~^T)")
    return None


_PROBES: dict[tuple, str | None] = {}


def _probe(device: torch.device, dtype: torch.dtype, backend: Backend,
           compress: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Run one tiny sparse product on ``device``: the table cannot know about a driver or library that
    refuses this GPU (e.g. cuSPARSELt's 'architecture mismatch'). Cached per device, dtype and backend."""
    key = (str(device), dtype, backend.name, compress)
    if key not in _PROBES:
        try:
            rows, cols = backend.shapes[dtype]
            size = math.lcm(rows, cols) * 2
            gen = torch.Generator(device=device).manual_seed(0)   # leave the run's RNG streams alone
            w = torch.randn(size, size, device=device, generator=gen).to(dtype)
            w = w * torch.tensor([1, 1, 0, 0], device=device, dtype=dtype).repeat(size, size // 4)
            x = torch.randn(32, size, device=device, generator=gen).to(dtype)
            got = F.linear(x, compress(w)).float()
            want = F.linear(x.float(), w.float())
            err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)
            _PROBES[key] = None if err < 5e-2 else f"a {backend.name} probe product was off by {err:.2g} (relative)"
        except Exception as exc:   # any failure means: do not run this path here
            _PROBES[key] = f"a {backend.name} probe product failed: {first_line(exc)}"
    return _PROBES[key]


def linear_unsupported(out_features: int, in_features: int, device: torch.device | str,
                       dtype: torch.dtype = DEFAULT_DTYPE, probe: bool = True,
                       compress: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str | None:
    """None when a Linear layer of this shape can run forward and backward-data sparse on ``device``
    in ``dtype``; else a one-line reason naming the first violated constraint."""
    device = torch.device(device)
    problem = torch_api()
    if problem is not None:
        return problem
    if device.type != "cuda":
        return f"no CUDA: the layer is on {device.type} (2:4 sparse kernels run on NVIDIA GPUs only)"
    if not torch.cuda.is_available():
        return "no CUDA: torch.cuda.is_available() is False (2:4 sparse kernels run on NVIDIA GPUs only)"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                "(sparse tensor cores need Ampere or newer)")
    backend = BACKENDS[backend_name()]
    problem = _backend_available(backend, capability) or shape_reason(out_features, in_features, dtype, backend)
    if problem is None and probe:
        problem = _probe(device, dtype, backend, compress or compress_semi_structured)
    return problem


# ---------------------------------------------------------------------------------------------
# 3. One sparse layer: cached compressed operands and the autograd Function


def compress_semi_structured(dense: torch.Tensor) -> torch.Tensor:
    """``torch.sparse.to_sparse_semi_structured`` without its once-per-process 'prototype' UserWarning
    (the first call also loads the subclass's dispatch table, so it must still go through torch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor is in prototype")
        return torch.sparse.to_sparse_semi_structured(dense)


class SparseLinear:
    """The sparse execution of one Linear layer.

    Holds ``S = compress(W~)`` (forward) and ``S_T = compress(W~^T)`` (backward-data), built from the
    layer's weight and the method's mask and rebuilt only when either changed: the weight's in-place
    version counter (every optimizer step bumps it) and the mask tensor's identity and version are
    the cache key, so one training step compresses each operand once and an evaluation reuses the
    forward one. ``S_T`` is made on the first backward only (evaluation needs none).

    ``compress`` is injectable: tests on CPU pass a dense stand-in (the identity) to check the
    custom backward's mathematics without a GPU.
    """

    def __init__(self, dtype: torch.dtype = DEFAULT_DTYPE,
                 compress: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.dtype = dtype
        self.compress = compress or compress_semi_structured
        self.compressions = 0          # compress() calls so far (tests and the benchmark read it)
        self._weight = self._mask = None
        self._key: tuple | None = None
        self._s = self._s_t = None

    def invalidate(self) -> None:
        """Forget the compressed operands (the benchmark uses it to time compression every step)."""
        self._weight = self._mask = self._key = self._s = self._s_t = None

    def _refresh(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        key = (weight._version, weight.data_ptr(), mask._version)
        if self._weight is weight and self._mask is mask and self._key == key:
            return
        # Holding the mask keeps its id from being reused by a later tensor while cached.
        self._weight, self._mask, self._key = weight, mask, key
        self._s = self._s_t = None

    @torch.no_grad()
    def _masked(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Masking before the cast keeps the zeros exact: W~ in the compute dtype is still 2:4.
        return (weight.detach() * mask).to(self.dtype)

    def forward_operand(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._refresh(weight, mask)
        if self._s is None:
            with torch.no_grad():
                self._s = self.compress(self._masked(weight, mask).contiguous())
            self.compressions += 1
        return self._s

    def backward_operand(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._refresh(weight, mask)
        if self._s_t is None:
            with torch.no_grad():
                self._s_t = self.compress(self._masked(weight, mask).t().contiguous())
            self.compressions += 1
        return self._s_t

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                 decay: float = 0.0) -> torch.Tensor:
        # The kernels take matrices: leading batch dimensions are flattened here, outside the Function,
        # so the reshapes are ordinary autograd views (an in-place ReLU after the layer stays legal).
        y = _SparseLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, mask, float(decay), self)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


class _SparseLinearFunction(torch.autograd.Function):
    """y = x W~^T + b for a 2-D x, with W~ = W * mask, computed on compressed 2:4 operands.

    Forward: y = F.linear(x_c, S), x_c = x in the compute dtype; y cast back to x's dtype, then + b.
    Backward: dX = F.linear(dY_c, S_T) = dY W~; dW = dY_c^T x_c (dense, straight through to all of W)
    + decay * (~mask) * W; db = sum of dY.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, decay, layer):
        x_c = x.to(layer.dtype).contiguous()
        y = F.linear(x_c, layer.forward_operand(weight, mask)).to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        elif y._is_view():
            # an output that is a view may not be modified in place later; never hand one out
            y = y.clone()
        # Saving weight and mask also makes autograd refuse a backward after either changed in place,
        # so the backward operand is always compressed from the forward's weights.
        ctx.save_for_backward(x_c, weight, mask)
        ctx.layer, ctx.decay, ctx.x_dtype = layer, decay, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, mask = ctx.saved_tensors
        layer = ctx.layer
        g = grad_out
        g_c = g.to(layer.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.linear(g_c, layer.backward_operand(weight, mask)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g_c.t() @ x_c).to(weight.dtype)
            if ctx.decay:   # SR-STE's decay on the pruned weights, as in ste._STEMask
                grad_w = grad_w + ctx.decay * (weight * ~mask)     # weight first: decay not rounded to float32
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


# ---------------------------------------------------------------------------------------------
# 4. The plan for a run: sparse layers, fallbacks, one warning


CONV_REASON = "Conv2d: the 2:4 kernels cover Linear layers only (runs masked dense)"


@dataclass
class AccelPlan:
    mode: str
    sparse: dict[str, SparseLinear] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)     # layer name -> reason
    dtype: torch.dtype = DEFAULT_DTYPE

    def report(self) -> dict:
        """What summary.json records under ``accel``."""
        return {"mode": self.mode, "backend": backend_name() if self.sparse else None,
                "compute_dtype": str(self.dtype).replace("torch.", ""),
                "sparse_layers": list(self.sparse), "fallback": dict(self.fallback)}

    def warning(self) -> str | None:
        """One line naming every fallback layer, grouped by reason (None when every layer runs sparse)."""
        if not self.fallback:
            return None
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.fallback.items():
            by_reason.setdefault(reason, []).append(name)
        parts = "; ".join(f"{_some(names)}: {reason}" for reason, names in by_reason.items())
        total = len(self.fallback) + len(self.sparse)
        return (f"accel semi_structured: {len(self.fallback)} of {total} sparse layers run masked dense "
                f"instead of the 2:4 kernels ({parts})")


def _some(names: list[str], shown: int = 4) -> str:
    """A few layer names and how many more (a ViT has dozens; summary.json lists them all)."""
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


def plan_accel(layers: dict[str, nn.Module], dtype: torch.dtype = DEFAULT_DTYPE,
               compress: Callable[[torch.Tensor], torch.Tensor] | None = None,
               warn: bool = True) -> AccelPlan:
    """Decide per layer: sparse kernels where :func:`linear_unsupported` allows, else masked dense.
    With ``warn``, one AccelFallbackWarning lists the fallbacks (once per run, not per step)."""
    plan = AccelPlan("semi_structured", dtype=dtype)
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            plan.fallback[name] = CONV_REASON if isinstance(module, nn.Conv2d) else \
                f"{type(module).__name__}: not a Linear layer (runs masked dense)"
            continue
        reason = linear_unsupported(module.out_features, module.in_features, module.weight.device, dtype,
                                    compress=compress)
        if reason is None:
            plan.sparse[name] = SparseLinear(dtype, compress)
        else:
            plan.fallback[name] = reason
    message = plan.warning()
    if warn and message is not None:
        warnings.warn(message, AccelFallbackWarning, stacklevel=3)
    return plan
