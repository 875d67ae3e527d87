"""The paper's exact formulation: one min-cost flow per M x M tile, solved by networkx.

Hubara et al. (2021), section 4: choose the entries to *prune*. Nodes are a source, one node per
tile row, one per tile column, and a sink. Source->row has capacity M-N (each row prunes M-N),
column->sink capacity M-N, row->column capacity 1 at cost |W_ij|. A flow of value M(M-N) of minimum
cost prunes the least magnitude, so keeps the most, with exactly N kept per row and column.
(The reference code hard-coded the demand for 50% sparsity; here it follows N and M.)

networkx's network simplex is exact only on integer costs, so |W| is scaled per tile to integers
with 40 bits of resolution (Python integers do not overflow). Deterministic tie-breaking: each cost
is multiplied by M**4 and a rank term below M**2 is added, so that among equal magnitudes the entry
with the larger flat index is pruned first; the rank terms of a whole flow sum to less than M**4, so
they never override a real difference in the scaled cost.

This is slow (about a millisecond per tile in Python): it is the reference that the fast solvers are
checked against, and the fallback for sizes nothing faster handles.
"""

from __future__ import annotations

import functools

import networkx as nx
import torch

from .registry import register_solver

_SCALE = 2 ** 40


@functools.lru_cache(maxsize=None)
def _template(m: int, n: int) -> nx.DiGraph:
    g = nx.DiGraph()
    prune = m - n
    g.add_node("s", demand=-m * prune)
    g.add_node("t", demand=m * prune)
    for i in range(m):
        g.add_edge("s", ("r", i), capacity=prune, weight=0)
        g.add_edge(("c", i), "t", capacity=prune, weight=0)
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=0)
    return g


def flow_tile(tile: list[list[float]], n: int) -> list[list[bool]]:
    """Solve one tile (a list of M rows) exactly; returns the keep mask as nested lists."""
    m = len(tile)
    g = _template(m, n).copy()
    top = max(max(row) for row in tile)
    mult = m ** 4
    for i in range(m):
        for j in range(m):
            scaled = round(tile[i][j] / top * _SCALE) if top > 0 else 0
            g[("r", i)][("c", j)]["weight"] = scaled * mult + (m * m - 1 - (i * m + j))
    _cost, flow = nx.network_simplex(g)
    return [[flow[("r", i)][("c", j)] == 0 for j in range(m)] for i in range(m)]


@register_solver("flow", exact=True,
                 summary="min-cost flow per M x M tile (networkx network simplex); the paper's exact method, slow")
def flow_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    tiles = scores.detach().double().cpu().tolist()
    keep = [flow_tile(tile, n) for tile in tiles]
    return torch.tensor(keep, dtype=torch.bool).reshape(scores.shape).to(scores.device)
