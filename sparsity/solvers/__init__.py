"""Transposable N:M tile solvers, in a small registry.

Every solver has the same contract: given ``scores`` of shape ``(T, M, M)`` (non-negative
magnitudes, one M x M tile per row of T) and ``n``, return a bool tensor of the same shape that keeps
**exactly** ``n`` entries in every row and every column of every tile, trying to maximise the kept
score. ``exact`` solvers reach the optimum on every tile; ``approx`` ones may not.

Register a new one with ``@register_solver("name", exact=..., summary=...)``; ``list_solvers()``
lists them (the CLI checks ``--solver`` against it; its help lists ``cli/choices.py``, tested equal).
"""

from .registry import SolverFn, SolverInfo, get_solver, list_solvers, register_solver, trivial_keep, warm_up  # noqa: F401

# Importing the modules registers their solvers.
from . import enumerate as _enumerate  # noqa: E402,F401
from . import exact as _exact  # noqa: E402,F401
from . import flow as _flow  # noqa: E402,F401
from . import greedy as _greedy  # noqa: E402,F401
from . import batched as _batched  # noqa: E402,F401
from . import compiled as _compiled  # noqa: E402,F401
