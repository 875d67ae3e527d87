"""``nmtrain convert --to semi-structured``: 2:4 Linear weights as PyTorch's semi-structured tensors
(2:4 sparse tensor cores, CUDA compute capability >= 8.0), timed against dense on the same GPU.

Training on these kernels is `accel.py`'s; this module only measures a finished model's layers.
"""

from __future__ import annotations

import os
import time

import torch

from ..sparsity import Pattern, nm_violation, shape_violation
from .convert import load_source
from .errors import ConvertError


def semi_structured_unavailable() -> str | None:
    """Why ``torch.sparse.to_sparse_semi_structured`` cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return ("--to semi-structured needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores); "
                "this machine has no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"--to semi-structured needs compute capability >= 8.0 (2:4 sparse tensor cores); "
                f"{torch.cuda.get_device_name()} has {major}.{minor}")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "--to semi-structured: this PyTorch build has no torch.sparse.to_sparse_semi_structured"
    return None


def _time_cuda(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def semi_structured_benchmark(source: str | os.PathLike, pattern: str | None = None, layout: str | None = None,
                              dtype: str = "float16", batch: int = 4096, reps: int = 50) -> dict:
    """2:4 Linear weights as semi-structured tensors: latency of ``x @ W^T`` sparse vs dense, same run.

    Every 2-D N:M weight whose mask also satisfies 2:4 (at most 2 of every 4 kept along K) is converted;
    the others are reported as skipped with the reason. Returns a JSON-able report.
    """
    why = semi_structured_unavailable()
    if why is not None:
        raise ConvertError(why)
    from torch.sparse import to_sparse_semi_structured
    from torch.nn import functional as F

    if dtype not in ("float16", "bfloat16"):
        raise ConvertError(f"--dtype {dtype!r}: semi-structured needs float16 or bfloat16")
    dt = getattr(torch, dtype)
    loaded = load_source(source, pattern, layout)
    two_four = Pattern(2, 4)
    rows, skipped = {}, {}
    for name, fmt in loaded.layers.items():
        w = loaded.state[name]
        if w.dim() != 2:
            skipped[name] = "not a Linear weight"
            continue
        problem = shape_violation(w.shape, two_four, "nhwc") or nm_violation(w, two_four, "nhwc")
        if problem is not None:
            skipped[name] = f"not 2:4 ({problem})"
            continue
        dense = w.detach().to("cuda", dt).contiguous()
        try:
            sparse = to_sparse_semi_structured(dense)
        except (RuntimeError, ValueError) as exc:
            skipped[name] = (str(exc).strip().splitlines() or ["unsupported"])[0]
            continue
        x = torch.randn(batch, w.shape[1], device="cuda", dtype=dt)
        with torch.inference_mode():
            ref = F.linear(x, dense)
            got = F.linear(x, sparse)
            err = float((got.float() - ref.float()).abs().max())
            t_dense = _time_cuda(lambda: F.linear(x, dense), reps)
            t_sparse = _time_cuda(lambda: F.linear(x, sparse), reps)
        rows[name] = {"shape": list(w.shape), "pattern": str(fmt.pattern), "dense_ms": t_dense,
                      "sparse_ms": t_sparse, "speedup": t_dense / t_sparse, "max_abs_diff": err}
    if not rows:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:2]) or "no N:M layer declared (pass --pattern)"
        raise ConvertError(f"--to semi-structured: no Linear weight could be converted ({reasons})")
    return {"device": torch.cuda.get_device_name(), "dtype": dtype, "batch": batch, "reps": reps,
            "layers": rows, "skipped": skipped, "torch": torch.__version__, "time": time.time()}
