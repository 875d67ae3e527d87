"""Exactness by cycle cancelling, batched over tiles: the engine of the ``batched`` solver.

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


_SCALE_BITS = 40        # |W| / max|W| of the tile is rounded to multiples of 2**-40, as in ``flow``
_PTR_BITS = 6           # low bits of a packed path: its first hop (M <= 32 < 2**6)
_HOP_BITS = 7           # next bits: minus its number of hops, so that among equal gains fewer hops win
_VAL_SHIFT = _PTR_BITS + _HOP_BITS
_NONE = -(1 << 61)      # "no edge"; two of them still add up without overflowing int64
_BIG = 1 << 50          # pushes impossible add/remove moves far below any real gain (|gain| <= 2**40)
_CHUNK_ELEMENTS = 1 << 18   # tiles per batch * M * M: each batch stays in cache for its M steps

# Counters of the last call, for benchmarks and tests.
stats: dict[str, int] = {"rounds": 0, "cycles": 0, "fallback": 0}


def quantise(scores: torch.Tensor) -> torch.Tensor:
    """Per-tile integer scores, round(|W| / max|W| * 2**40), exactly the costs ``flow`` optimises."""
    w = scores.to(torch.float64)
    top = w.amax((1, 2), keepdim=True)
    scaled = torch.where(top > 0, w / torch.where(top > 0, top, 1.0) * float(1 << _SCALE_BITS), 0.0)
    return torch.round(scaled).to(torch.int64)


def _row_graph(k: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row graph of a batch laid out tile-last, ``k``/``q`` of shape (M, M, A) (row, column, tile).

    Returns the packed path matrix of the one-hop paths, ``(gain << 13) - (1 << 6) + r'`` for edge
    r -> r' (``_NONE`` where no move exists), and the column attaining each edge's gain.
    The tile index is innermost so that every broadcast below runs over contiguous memory.
    """
    m = k.shape[0]
    dev = q.device
    # gain of adding a free (r, c) / removing a kept (r', c); impossible moves sink by _BIG
    add = (q - k * _BIG) << _PTR_BITS
    cols = (m - 1 - torch.arange(m, device=dev)).view(1, m, 1)   # lower column wins ties under max
    rem = ((-q - (1 - k) * _BIG) << _PTR_BITS) + cols
    best = add[:, 0].unsqueeze(1) + rem[:, 0].unsqueeze(0)        # (r, r', tile)
    for c in range(1, m):
        best = torch.maximum(best, add[:, c].unsqueeze(1) + rem[:, c].unsqueeze(0))
    col = (m - 1) - (best & ((1 << _PTR_BITS) - 1))
    gain = best >> _PTR_BITS
    dest = torch.arange(m, device=dev).view(1, m, 1)
    packed = (gain << _VAL_SHIFT) - (1 << _PTR_BITS) + dest
    packed = torch.where(gain > -(_BIG // 2), packed, _NONE)
    return packed, col


def _find_cycles(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Floyd-Warshall in (max, +) on packed paths (M, M, A); stops each tile at its first positive cycle.

    Returns per tile the node k* that closes a positive cycle (-1: the tile is optimal) and the first
    hops of the best paths x -> k* (intermediates < k*) at that moment, shape (M, A).
    """
    m, _, a = d.shape
    dev = d.device
    low = (1 << _PTR_BITS) - 1
    start = torch.full((a,), -1, dtype=torch.long, device=dev)
    snap = torch.zeros((m, a), dtype=torch.long, device=dev)
    for k in range(m):
        # d[k, k] > 0 exactly when the best closed walk k -> k has gain >= 1 (the hop field is < 2**13)
        hit = (d[k, k] > 0) & (start < 0)
        if bool(hit.any()):
            start = torch.where(hit, k, start)
            snap = torch.where(hit, d[:, k] & low, snap)
        if k == m - 1:   # every cycle has been seen at its largest node
            break
        # concatenate x -> k -> y: gains and hop counts add, the first hop stays that of x -> k
        d = torch.maximum(d, d[:, k].unsqueeze(1) + (d[k] & ~low).unsqueeze(0))
    return start, snap


def _apply_cycles(k: torch.Tensor, col: torch.Tensor, start: torch.Tensor,
                  snap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the entries of the cycle start -> snap[start] -> ... -> start in each tile (F, M, M).

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
        c = col[ar, node, nxt]
        step = alive.to(torch.uint8).unsqueeze(1)
        flip.scatter_add_(1, (node * m + c).unsqueeze(1), step)   # add (node, c)
        flip.scatter_add_(1, (nxt * m + c).unsqueeze(1), step)    # remove (nxt, c)
        alive = alive & (nxt != start)
        if not bool(alive.any()):
            break
        node = nxt
    bad = (flip > 1).any(1) | alive
    return k ^ (flip.view(f, m, m) == 1), bad


def cancel_cycles(keep: torch.Tensor, q: torch.Tensor, n: int, max_rounds: int) -> torch.Tensor:
    """Cancel positive cycles in ``keep`` (in place) until none is left; returns tiles needing a fallback."""
    t, m, _ = keep.shape
    dev = keep.device
    step = max(1, _CHUNK_ELEMENTS // (m * m))
    active = torch.arange(t, device=dev)
    failed = torch.zeros(t, dtype=torch.bool, device=dev)
    for _round in range(max_rounds):
        if active.numel() == 0:
            return failed
        stats["rounds"] += 1
        still = []
        for lo in range(0, active.numel(), step):
            ids = active[lo:lo + step]
            k, qq = keep[ids], q[ids]
            packed, col = _row_graph(k.permute(1, 2, 0).to(torch.int64).contiguous(),
                                     qq.permute(1, 2, 0).contiguous())
            start, snap = _find_cycles(packed)
            idx = (start >= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            kf, qf = k[idx], qq[idx]
            new, bad = _apply_cycles(kf, col[:, :, idx].permute(2, 0, 1), start[idx], snap[:, idx].t())
            # Check each swap independently of how it was found: counts kept, exact integer gain > 0.
            gain = (qf * (new.to(torch.int64) - kf.to(torch.int64))).sum((1, 2))
            ok = ~bad & (new.sum(1) == n).all(1) & (new.sum(2) == n).all(1) & (gain > 0)
            stats["cycles"] += int(ok.sum())
            keep[ids[idx[ok]]] = new[ok]
            failed[ids[idx[~ok]]] = True
            still.append(ids[idx[ok]])
        active = torch.cat(still) if still else active[:0]
    failed[active] = True    # still improving after the bound
    return failed


