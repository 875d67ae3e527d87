"""The greedy 2-approximation (Hubara et al., Algorithm 1), vectorised over all tiles, then completed.

Algorithm 1 visits a tile's entries in descending |W| and keeps an entry while its row and its
column both have fewer than N kept. Lemma 1 bounds the pruned magnitude by twice the optimum.
Greedy can stop short: a row and a column may both end with fewer than N kept while every entry that
would join them is blocked. Such a mask is still hardware-valid (at most N) but throws magnitude
away, so nmtrain completes every tile to exactly N per row and column with augmenting paths in the
bipartite residual graph (add a free entry, remove a kept one, add another, ...), which never lowers
the count of any row or column that was already full.

Everything here runs on whole batches of tiles: M*M steps of vector work for the greedy pass, then a
few breadth-first searches (at most 2M levels each) over the tiles that still fall short. That is the
path on a GPU; on a CPU ``approx`` runs the same algorithm compiled, tile by tile (``compiled.py``).
"""

from __future__ import annotations

import torch

from . import compiled
from .registry import register_solver, trivial_keep
from .cycles import cancel_cycles, quantise


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
    n-regular selection exists). A breadth-first search from all short rows at once labels every
    node with the best gain (added minus removed magnitude) of a path reaching it in the fewest hops,
    and the path to the best-labelled short column is applied.

    A path can remove more than it adds, so a completed tile can prune more than Algorithm 1's own
    (short) mask did, and Lemma 1's bound (pruned magnitude < 2x the optimum) is about that mask. So
    the bound is enforced by construction: every tile's optimum prunes at least the larger of its
    row-wise and column-wise relaxations (the M-N smallest entries of every row, or of every column);
    a completed tile that prunes 2x that lower bound or more is brought to its exact optimum by cycle
    cancelling (``cycles.py``). On Gaussian weights this touches almost no tile; on adversarial ones
    (mostly zeros, where the optimum prunes ~nothing) it is what keeps the guarantee.
    """
    done = keep.clone()
    m = keep.shape[-1]
    w = scores.to(torch.float64)
    while True:
        short = (done.sum(2) < n).any(1)
        if not bool(short.any()):
            break
        idx = short.nonzero().squeeze(1)
        done[idx] = _augment_once(done[idx], w[idx], n, m)
    prune = m - n
    lower = torch.maximum(w.sort(2).values[:, :, :prune].sum((1, 2)), w.sort(1).values[:, :prune, :].sum((1, 2)))
    risky = (w * ~done).sum((1, 2)) >= 2 * lower
    if bool(risky.any()):
        idx = risky.nonzero().squeeze(1)
        part = done[idx]
        # improves ``part`` in place, applying only checked cycles: every tile stays valid
        cancel_cycles(part, quantise(scores[idx]), n, max_rounds=4 * m * m)
        done[idx] = part
    return done


def _augment_once(k: torch.Tensor, w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    t = k.shape[0]
    dev = k.device
    ar = torch.arange(t, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=w.dtype, device=dev)
    row_short = k.sum(2) < n
    col_short = k.sum(1) < n
    row_gain = torch.where(row_short, 0.0, neg_inf)    # sources: every short row, gain 0
    col_gain = torch.full((t, m), float("-inf"), dtype=w.dtype, device=dev)
    row_seen = row_short.clone()
    col_seen = torch.zeros_like(col_short)
    frontier = row_short.clone()
    col_parent = torch.full((t, m), -1, dtype=torch.long, device=dev)  # row that adds (row, col)
    row_parent = torch.full((t, m), -1, dtype=torch.long, device=dev)  # col whose kept entry is removed
    for _level in range(m):
        if not bool(frontier.any()):
            break
        # row -> column over free entries, to columns not reached yet: best gain of getting there
        add = frontier.unsqueeze(2) & ~k & ~col_seen.unsqueeze(1)
        gain, best_row = torch.where(add, row_gain.unsqueeze(2) + w, neg_inf).max(1)
        new_cols = add.any(1)
        col_parent = torch.where(new_cols, best_row, col_parent)
        col_gain = torch.where(new_cols, gain, col_gain)
        col_seen |= new_cols
        # column -> row over kept entries (removing one), to rows not reached yet
        rem = new_cols.unsqueeze(1) & k & ~row_seen.unsqueeze(2)
        gain, best_col = torch.where(rem, col_gain.unsqueeze(1) - w, neg_inf).max(2)
        new_rows = rem.any(2)
        row_parent = torch.where(new_rows, best_col, row_parent)
        row_gain = torch.where(new_rows, gain, row_gain)
        row_seen |= new_rows
        frontier = new_rows
    ends = col_seen & col_short
    if not bool(ends.any(1).all()):  # impossible for a valid partial mask; guard against misuse
        raise RuntimeError("transposable completion found no augmenting path; the input mask is invalid")
    end_col = torch.where(ends, col_gain, neg_inf).argmax(1)
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


def vectorised_approx(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The tensor path (any device): Algorithm 1 over the whole batch, then ``complete``."""
    return complete(greedy_keep(scores, n), scores, n)


@register_solver("approx", exact=False,
                 summary="greedy 2-approximation (Algorithm 1) completed to exactly N per row/column; "
                         "compiled per tile on CPU, vectorised tensor code on GPU",
                 matrix=lambda matrix, n, m: compiled.on_matrix(matrix, n, m, exact=False))
def approx_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    m = scores.shape[-1]
    trivial = trivial_keep(scores, n)
    if trivial is not None:
        return trivial
    if scores.device.type == "cpu" and compiled.available() and m <= compiled.MAX_M:
        # the same algorithm tile by tile (``compiled.py``): several times faster on a CPU
        return compiled.compiled_keep(scores, n, exact=False)
    return vectorised_approx(scores, n)
