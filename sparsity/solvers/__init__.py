"""Transposable N:M tile solvers, in a small registry.

Every solver has the same contract: given ``scores`` of shape ``(T, M, M)`` (non-negative
magnitudes, one M x M tile per row of T) and ``n``, return a bool tensor of the same shape that keeps
**exactly** ``n`` entries in every row and every column of every tile, trying to maximise the kept
score. ``exact`` solvers reach the optimum on every tile; ``approx`` ones may not.

A solver may also take the layer's GEMM-view matrix itself (``register_solver(..., matrix=fn)``, ``fn(matrix,
n, m)`` returning a ``TileJob`` or None): the compiled solvers read their tiles from it, so
``transposable_mask`` makes no |W| tensor and no tile copies for them. Results are the same either way.

Register a new one with ``@register_solver("name", exact=..., summary=...)``; ``list_solvers()``
lists them (the CLI checks ``--solver`` against it; its help lists ``cli/choices.py``, tested equal).
"""

from .registry import (SolverFn, SolverInfo, TileJob, get_solver, list_solvers, register_solver,  # noqa: F401
                       trivial_keep, warm_up)

# Importing the modules registers their solvers.
from . import enumerate as _enumerate  # noqa: E402,F401
from . import exact as _exact  # noqa: E402,F401
from . import flow as _flow  # noqa: E402,F401
from . import greedy as _greedy  # noqa: E402,F401
from . import batched as _batched  # noqa: E402,F401
from . import compiled as _compiled  # noqa: E402,F401
