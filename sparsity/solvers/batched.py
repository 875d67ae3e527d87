"""Exact transposable N:M masks for any M, batched over tiles: greedy warm start + cycle cancelling.

The problem per tile is a maximum-weight b-matching on the complete bipartite graph rows x columns
with every degree equal to N (the LP is totally unimodular, so this is the paper's min-cost flow).

Warm start: the greedy 2-approximation, completed to exactly N per row/column (``approx``).

Exchange cycles. With K the kept set, an *exchange* adds a free entry (r, c) and removes a kept entry
(r', c) from the same column: row r gains one, row r' loses one, column c is unchanged, and the
kept magnitude changes by ``w[r, c] - w[r', c]``. Eliminating the column nodes gives the *row graph*
on the M rows, with edge r -> r' of gain ``G[r, r'] = max_c { w[r,c] - w[r',c] : K[r,c]=0, K[r',c]=1 }``
(the column that attains it is remembered). Following a simple cycle r1 -> r2 -> ... -> r1 of this
graph changes no row or column count (every row gains one and loses one, every used column gains
and loses one per visit) and touches distinct entries, so it maps a valid mask to a valid mask and
raises the kept magnitude by the cycle's gain.

Why it is exact. Two valid masks differ by a union of alternating cycles of the bipartite graph
(the symmetric difference has equal added/removed degree at every node). Each alternating cycle
visits every row at most once, so it is a simple cycle of the row graph whose gain is at most the
row graph's (which takes the best column per edge). Hence a mask is optimal iff the row graph has
no positive cycle; this is the min-cost-flow optimality condition (no negative residual cycle).

Finding positive cycles for all tiles at once: Floyd-Warshall in (max, +) on the row graph, over the
batch of still-active tiles. Before relaxing through node k, ``D[k, k]`` is the best closed walk
k -> k whose intermediate nodes are all < k. Let k* be the first k with ``D[k, k] > eps``. No cycle
inside {0..k*-1} is positive (it would have been seen at its largest node), so the successor
pointers towards k* describe a simple positive cycle through k*; it is read out, checked (valid
counts, real gain > eps) and applied. If no k triggers, every simple cycle has gain <= eps: the
tile is optimal up to a few eps and leaves the active set. Each applied cycle raises the kept
magnitude by more than eps, so the loop cannot cycle on float noise; gains are computed in float64
and ``eps`` is ``1e-9`` of the tile's largest score (the flow reference resolves 2**-40 of it).

Rounds are bounded; a tile still active after the bound, or whose extracted cycle does not check
out, is solved by the ``flow`` reference (``stats['fallback']`` counts them; it should stay 0).

Everything is whole-batch tensor work (M steps per Floyd-Warshall), so it runs on any device, and
it is deterministic: ties go to the lowest index everywhere (argmax, strict improvements).
"""

from __future__ import annotations

import torch

from . import register_solver
from .flow import flow_solver
from .greedy import approx_solver

REL_EPS = 1e-9              # gains below this share of the tile's largest score count as zero
_CHUNK_ELEMENTS = 1 << 18   # tiles per batch * M * M: small enough to stay in cache across rounds

# Counters of the last call, for benchmarks and tests.
stats: dict[str, int] = {"rounds": 0, "cycles": 0, "fallback": 0}


def _row_graph(k: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G[t, r, r'] = best gain of adding (r, c) and removing (r', c), and the column c attaining it."""
    a, m, _ = k.shape
    neg_inf = torch.tensor(float("-inf"), dtype=w.dtype, device=w.device)
    add = torch.where(k, neg_inf, w)     # (t, r, c): gain of adding a free entry
    rem = torch.where(k, -w, neg_inf)    # (t, r', c): gain of removing a kept entry
    if m <= 8:   # one broadcast of M**3 values per tile is cheapest while it is small
        g, col = (add.unsqueeze(2) + rem.unsqueeze(1)).max(3)   # max returns the first best column
        return g, col.to(torch.uint8)
    g = torch.full((a, m, m), float("-inf"), dtype=w.dtype, device=w.device)
    col = torch.zeros((a, m, m), dtype=torch.uint8, device=w.device)
    for c in range(m):
        cand = add[:, :, c].unsqueeze(2) + rem[:, :, c].unsqueeze(1)
        better = cand > g                # strict: the lowest column wins ties
        g = torch.maximum(g, cand)
        col.masked_fill_(better, c)
    return g, col


def _find_cycles(g: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile: the node k* that closes a positive cycle (-1: none), and the pointers towards k*."""
    a, m, _ = g.shape
    dev = g.device
    d = g.clone()
    # nxt[t, i, j]: first hop of the best i -> j path found so far (uint8: M <= 255)
    nxt = torch.arange(m, dtype=torch.uint8, device=dev).expand(a, m, m).clone()
    start = torch.full((a,), -1, dtype=torch.long, device=dev)
    snap = torch.zeros((a, m), dtype=torch.uint8, device=dev)
    for k in range(m):
        hit = (d[:, k, k] > eps) & (start < 0)
        if bool(hit.any()):
            start.masked_fill_(hit, k)
            snap = torch.where(hit.unsqueeze(1), nxt[:, :, k], snap)
        if k == m - 1:   # every cycle has been seen at its largest node
            break
        cand = d[:, :, k].unsqueeze(2) + d[:, k, :].unsqueeze(1)
        better = cand > d                # strict, so ties keep the earlier (shorter) path
        d = torch.maximum(d, cand)
        nxt = torch.where(better, nxt[:, :, k].unsqueeze(2), nxt)
    return start, snap.long()


def _apply_cycles(k: torch.Tensor, col: torch.Tensor, start: torch.Tensor,
                  snap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the entries of the cycle start -> snap[start] -> ... -> start in each tile.

    Returns the new masks and a flag per tile for a malformed cycle (not closed within M hops, or an
    entry touched twice), which the caller rejects.
    """
    f, m, _ = k.shape
    ar = torch.arange(f, device=k.device)
    flip = torch.zeros((f, m * m), dtype=torch.uint8, device=k.device)
    node = start
    alive = torch.ones(f, dtype=torch.bool, device=k.device)
    for _hop in range(m):
        nxt = snap[ar, node]
        c = col[ar, node, nxt].long()
        step = alive.to(torch.uint8).unsqueeze(1)
        flip.scatter_add_(1, (node * m + c).unsqueeze(1), step)   # add (node, c)
        flip.scatter_add_(1, (nxt * m + c).unsqueeze(1), step)    # remove (nxt, c)
        alive = alive & (nxt != start)
        node = nxt
    bad = (flip > 1).any(1) | alive
    return k ^ (flip.view(f, m, m) == 1), bad


def _improve_chunk(keep: torch.Tensor, w: torch.Tensor, eps: torch.Tensor, n: int,
                   max_rounds: int) -> torch.Tensor:
    """Cancel positive cycles in ``keep`` (in place) until none is left; returns tiles needing a fallback."""
    t, m, _ = keep.shape
    dev = keep.device
    active = torch.arange(t, device=dev)
    failed = torch.zeros(t, dtype=torch.bool, device=dev)
    for _round in range(max_rounds):
        stats["rounds"] = max(stats["rounds"], _round + 1)
        k, ww, ee = keep[active], w[active], eps[active]
        g, col = _row_graph(k, ww)
        start, snap = _find_cycles(g, ee)
        idx = (start >= 0).nonzero().squeeze(1)
        if idx.numel() == 0:     # every remaining tile is certified optimal
            return failed
        kf, wf = k[idx], ww[idx]
        new, bad = _apply_cycles(kf, col[idx], start[idx], snap[idx])
        # Check the swap independently of how it was found: counts kept, real gain in float64.
        gain = (wf * (new.to(wf.dtype) - kf.to(wf.dtype))).sum((1, 2))
        ok = ~bad & (new.sum(1) == n).all(1) & (new.sum(2) == n).all(1) & (gain > ee[idx] * 0.5)
        stats["cycles"] += int(ok.sum())
        keep[active[idx[ok]]] = new[ok]
        failed[active[idx[~ok]]] = True
        active = active[idx[ok]]
    failed[active] = True    # still improving after the bound
    return failed


@register_solver("batched", exact=True,
                 summary="greedy warm start + positive-cycle cancelling (Floyd-Warshall), batched over tiles; any N:M")
def batched_solver(scores: torch.Tensor, n: int, max_rounds: int | None = None) -> torch.Tensor:
    t, m, _ = scores.shape
    for key in stats:
        stats[key] = 0
    if t == 0 or n in (0, m):
        return torch.full(scores.shape, n == m, dtype=torch.bool, device=scores.device)
    keep = approx_solver(scores, n)
    w = scores.to(torch.float64)
    eps = w.amax((1, 2)) * REL_EPS
    failed = torch.zeros(t, dtype=torch.bool, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // (m * m))
    for lo in range(0, t, step):
        sl = slice(lo, lo + step)
        failed[sl] = _improve_chunk(keep[sl], w[sl], eps[sl], n, max_rounds or 4 * m * m)
    if bool(failed.any()):
        idx = failed.nonzero().squeeze(1)
        stats["fallback"] = idx.numel()
        keep[idx] = flow_solver(scores[idx], n)
    return keep
