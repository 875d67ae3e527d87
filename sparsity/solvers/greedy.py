"""The greedy 2-approximation (Hubara et al., Algorithm 1), vectorised over all tiles, then completed.

Algorithm 1 visits a tile's entries in descending |W| and keeps an entry while its row and its
column both have fewer than N kept. Lemma 1 bounds the pruned magnitude by twice the optimum.
Greedy can stop short: a row and a column may both end with fewer than N kept while every entry that
would join them is blocked. Such a mask is still hardware-valid (at most N) but throws magnitude
away, so nmtrain completes every tile to exactly N per row and column with augmenting paths in the
bipartite residual graph (add a free entry, remove a kept one, add another, ...), which never lowers
the count of any row or column that was already full.

Everything runs on whole batches of tiles: M*M steps of vector work for the greedy pass, then a few
breadth-first searches (at most 2M levels each) over the tiles that still fall short.
"""

from __future__ import annotations

import torch

from . import register_solver


def greedy_keep(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Algorithm 1 on every tile at once: keep = (T, M, M) bool with at most n per row and column."""
    t, m, _ = scores.shape
    device = scores.device
    # Stable descending sort: among equal magnitudes the lower flat index is visited first.
    order = torch.sort(scores.reshape(t, m * m), dim=1, descending=True, stable=True).indices
    # Step s visits one entry per tile. Its row counter and its column counter live in one flat
    # (2*T*M,) vector (rows first, then columns), so a step is one gather and one index_add over
    # 2T slots instead of separate row and column updates.
    base = torch.arange(t, device=device).unsqueeze(1) * m
    slots = torch.stack(((base + order // m).t(), (base + order % m).t() + t * m), 1).reshape(m * m, 2 * t)
    counts = torch.zeros(2 * t * m, dtype=torch.int32, device=device)
    taken = torch.empty(m * m, t, dtype=torch.bool, device=device)   # taken[s, tile]: entry of step s kept
    for step in range(m * m):
        slot = slots[step]
        free = (counts[slot] < n).view(2, t)
        ok = free[0] & free[1]
        taken[step] = ok
        # each tile touches one row and one column per step: no two slots collide
        counts.index_add_(0, slot, ok.to(torch.int32).repeat(2))
    keep = torch.zeros(t, m * m, dtype=torch.bool, device=device)
    keep.scatter_(1, order, taken.t())     # one scatter at the end instead of one per step
    return keep.reshape(t, m, m)


def complete(keep: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Grow a mask with at most n per row/column to exactly n, one augmenting path per tile per round.

    A path starts at a row with fewer than n kept, adds a free entry (row -> column), and while that
    column is full removes one of its kept entries (column -> row) and continues from that row, until
    it adds an entry in a column with fewer than n kept. Rows and columns on the path keep their
    counts; the two ends gain one. Such a path always exists while the mask is short (a perfect
    n-regular selection exists), and breadth-first search finds a shortest one; among equally short
    ones it prefers adding heavy entries and removing light ones.
    """
    keep = keep.clone()
    m = keep.shape[-1]
    while True:
        short = (keep.sum(2) < n).any(1)
        if not bool(short.any()):
            return keep
        idx = short.nonzero().squeeze(1)
        keep[idx] = _augment_once(keep[idx], scores[idx].to(torch.float64), n, m)


def _augment_once(k: torch.Tensor, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    t = k.shape[0]
    dev = k.device
    ar = torch.arange(t, device=dev)
    row_short = k.sum(2) < n
    col_short = k.sum(1) < n
    row_seen = row_short.clone()       # sources: every short row
    col_seen = torch.zeros_like(col_short)
    frontier = row_short.clone()
    col_parent = torch.full((t, m), -1, dtype=torch.long, device=dev)  # row that adds (row, col)
    row_parent = torch.full((t, m), -1, dtype=torch.long, device=dev)  # col whose kept entry is removed
    end_col = torch.full((t,), -1, dtype=torch.long, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=w.dtype, device=dev)
    pos_inf = torch.tensor(float("inf"), dtype=w.dtype, device=dev)
    for _level in range(m + 1):
        active = end_col < 0
        if not bool(active.any()):
            break
        # row -> column over free entries, to columns not reached yet
        add = frontier.unsqueeze(2) & ~k & ~col_seen.unsqueeze(1) & active.view(t, 1, 1)
        best_add, best_row = torch.where(add, w, neg_inf).max(1)
        new_cols = add.any(1)
        col_parent = torch.where(new_cols, best_row, col_parent)
        col_seen |= new_cols
        # a short column reached ends the path: take the heaviest such addition
        ends = new_cols & col_short
        found = ends.any(1) & active
        end_choice = torch.where(ends, best_add, neg_inf).argmax(1)
        end_col = torch.where(found, end_choice, end_col)
        # column -> row over kept entries (remove the lightest), to rows not reached yet
        rem = new_cols.unsqueeze(1) & k & ~row_seen.unsqueeze(2) & (~found & active).view(t, 1, 1)
        best_col = torch.where(rem, w, pos_inf).argmin(2)
        new_rows = rem.any(2)
        row_parent = torch.where(new_rows, best_col, row_parent)
        row_seen |= new_rows
        frontier = new_rows
    if bool((end_col < 0).any()):  # impossible for a valid partial mask; guard against misuse
        raise RuntimeError("transposable completion found no augmenting path; the input mask is invalid")
    # Walk back from the end column: add (row, col), then remove (row, row_parent[row]), ...
    k = k.clone()
    col = end_col
    alive = torch.ones(t, dtype=torch.bool, device=dev)
    for _step in range(m + 1):
        row = col_parent[ar, col]
        k[ar[alive], row[alive], col[alive]] = True
        prev = row_parent[ar, row]
        alive = alive & (prev >= 0)
        if not bool(alive.any()):
            break
        k[ar[alive], row[alive], prev[alive]] = False
        col = torch.where(alive, prev, col)
    return k


@register_solver("approx", exact=False,
                 summary="greedy 2-approximation (Algorithm 1), vectorised, completed to exactly N per row/column")
def approx_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    return complete(greedy_keep(scores, n), scores, n)
