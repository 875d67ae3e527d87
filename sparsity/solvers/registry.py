"""The solver registry: `register_solver`, `get_solver`, `list_solvers`, and the helpers every solver shares.

Its own module so that the solvers import it, not the package that imports them (no import cycle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SparsityError
from ..nm import score_dtype

SolverFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: SolverFn
    exact: bool
    summary: str


_SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, *, exact: bool, summary: str) -> Callable[[SolverFn], SolverFn]:
    def decorator(fn: SolverFn) -> SolverFn:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        _SOLVERS[name] = SolverInfo(name, fn, exact, summary)
        return fn
    return decorator


def list_solvers() -> list[SolverInfo]:
    """Every registered transposable-mask solver (name, whether it is exact, its summary), in order."""
    return list(_SOLVERS.values())


def trivial_keep(scores: torch.Tensor, n: int) -> torch.Tensor | None:
    """The mask when there is nothing to choose (no tiles, keep none, keep all), else None."""
    t, m, _ = scores.shape
    if t == 0 or n in (0, m):
        return torch.full(scores.shape, n == m, dtype=torch.bool, device=scores.device)
    return None


def get_solver(name: str) -> SolverInfo:
    if name not in _SOLVERS:
        raise SparsityError(f"solver {name!r} is unknown; use one of: {', '.join(_SOLVERS)}")
    return _SOLVERS[name]


def warm_up(name: str, n: int, m: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> float:
    """Solve one M x M tile with solver ``name``; returns the seconds it took.

    A solver's first call in a process can do one-time work: the compiled solvers compile their numba
    kernels on first use after an install (about 10 s; numba caches them on disk, so later processes
    only load them), enumeration builds its table of tile masks. Calling this first keeps that work
    out of the time measured for a layer. ``dtype`` is the weight's: the tile has the dtype ``magnitude``
    ranks it in (float32 for half precision).
    """
    tile = torch.arange(m * m, dtype=score_dtype(dtype), device=device).reshape(1, m, m)  # distinct, no RNG draw
    start = time.perf_counter()
    get_solver(name).fn(tile, n)
    return time.perf_counter() - start
