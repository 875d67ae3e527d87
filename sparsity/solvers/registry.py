"""The solver registry: `register_solver`, `get_solver`, `list_solvers`, and the helpers every solver shares.

Its own module so that the solvers import it, not the package that imports them (no import cycle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..errors import SparsityError
from ..nm import score_dtype

SolverFn = Callable[[torch.Tensor, int], torch.Tensor]

# why no mask is made for a weight with a NaN or Inf (whichever path finds it)
NOT_FINITE = "the weight has NaN/Inf entries; a magnitude mask is undefined for them"


class TileJob(Protocol):
    """A solver's work on one GEMM-view matrix: ``run(first, last)`` solves tiles ``first..last-1`` (row-major
    M x M tiles), ``keep()`` is the bool mask of the matrix's shape once every tile has run."""
    total: int

    def run(self, first: int, last: int) -> None: ...

    def keep(self) -> torch.Tensor: ...


# (signed GEMM-view matrix, n, m) -> a job on the matrix itself, or None where the solver wants tiles
MatrixFn = Callable[[torch.Tensor, int, int], Optional[TileJob]]


@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: SolverFn
    exact: bool
    summary: str
    # Optional: the solver works on the matrix in place of a (T, M, M) batch of |W| tiles (the compiled
    # solvers read their tiles from it): no |W| tensor and no tile copies, which small layers notice most.
    matrix: Optional[MatrixFn] = None


_SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, *, exact: bool, summary: str,
                    matrix: Optional[MatrixFn] = None) -> Callable[[SolverFn], SolverFn]:
    def decorator(fn: SolverFn) -> SolverFn:
        if name in _SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        _SOLVERS[name] = SolverInfo(name, fn, exact, summary, matrix)
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
    out of the time measured for a layer. ``dtype`` is the weight's: a matrix path gets a tile of it, the
    tile function one in the dtype ``magnitude`` ranks it in (float32 for half precision).
    """
    info = get_solver(name)
    values = torch.arange(m * m, device=device)                  # distinct, no RNG draw
    start = time.perf_counter()
    # the path transposable_mask takes: the solver's matrix path where it serves, else its tile function
    job = info.matrix(values.to(dtype).reshape(m, m), n, m) if info.matrix is not None else None
    if job is not None:
        job.run(0, job.total)
    else:
        info.fn(values.to(score_dtype(dtype)).reshape(1, m, m), n)
    return time.perf_counter() - start
