"""Per-tile transposable solvers compiled with numba: the fast CPU path of ``exact`` and ``approx``.

The tensor solvers (``batched.py``, ``greedy.py``) move whole (T, M, M) batches through memory once
per step of their algorithm. A tile is tiny (an 8x8 tile is 64 numbers), so on a CPU it is much
cheaper to take one tile at a time through the whole algorithm while it sits in L1, and to spread
the tiles over the cores (``prange``). Each tile runs:

1. Scores to integers, ``round(|W| / max|W| * 2**40)`` per tile: exactly the costs ``flow`` (the
   networkx reference) and ``cycles.quantise`` optimise, so "optimal" means the same for all solvers.
   The tile is read straight from the layer's GEMM-view matrix (signed; |W| is taken here), and its mask
   written straight into the matrix-shaped result: no |W| tensor, no tile copies (``MatrixJob``).
2. Algorithm 1 (Hubara et al.): visit the entries in descending score (lower flat index first among
   equals) and keep one while its row and its column both have fewer than N kept. ``approx`` sorts the
   tile for this. ``exact`` only needs a warm start (step 4 makes any start optimal), so it walks the
   entries counting-sorted into M*M buckets of equal width: two passes instead of a sort, which was
   the larger part of the warm start's time. On Gaussian 1024x1024 weights it leaves as many improving
   cycles for step 4 as the sorted walk (1.59 against 1.58 per tile at 4:8-T, 16.9 against 16.9 at
   16:32-T). Where several masks are optimal (exactly tied magnitudes) the two starts can end at
   different optimal masks; where the optimum is unique, at the same one.
3. Completion to exactly N per row and column by augmenting paths (as ``greedy.complete``): a
   layered search from every short row; the best-gain path among the fewest-hop ones to a short
   column is applied, until no row is short.
4. ``exact``: cancel improving cycles until none is left. The residual graph has a node per row and
   per column, an edge row -> column for every free entry (cost -q: adding it gains q) and column ->
   row for every kept entry (cost +q). A negative cycle alternates add/remove, keeps every count and
   raises the kept score; a mask is optimal iff there is none (the min-cost-flow optimality
   condition; ``cycles.py`` gives the argument). Bellman-Ford from all-zero labels either settles
   (the labels are then feasible potentials: the certificate of optimality) or its parent pointers
   close a cycle, which is always a negative one; it is checked in exact integers, applied, and the
   search goes on from the current labels. Integer costs make every cycle gain >= 1, so it ends.
   A pass is written without branches on the data (a min-reduction into each row over keys that pack
   the label with its column, then elementwise selects out of it) so that the compiler vectorises it;
   it computes the same labels and parents as the entry-by-entry loop it replaced, so the same cycles
   and, on tied tiles, the same optimum (``tests/test_solver_choices.py`` holds that choice).
   ``approx`` runs this step only on tiles where Lemma 1's 2x bound is at risk (see
   ``greedy.complete``), so the bound holds by construction on the CPU path too.

A tile that exceeds its bounds (it should never happen) is flagged, and the caller solves it with
``flow``; a tile with a NaN or Inf is flagged apart, and the caller raises ValueError. Everything about a tile happens in one thread in a fixed order, so results are
deterministic and do not depend on the thread count. The first call in a fresh checkout compiles
(about 10 s); the machine code is cached on disk after that.
"""

from __future__ import annotations

import numpy as np
import torch

from ..threads import numba_threads, usable
from .registry import NOT_FINITE, register_solver, trivial_keep
from .flow import flow_solver

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; without it the tensor solvers serve
    numba = None

_SCALE = float(1 << 40)
_LARGEST = float(np.finfo(np.float64).max)
_CHUNK = 1024           # most tiles per parallel task (scratch buffers are allocated once per task)
_MIN_CHUNK = 64         # fewest: a small layer is still spread over every thread
_APPROX, _EXACT = 0, 1
_BIG = np.iinfo(np.int64).max // 4    # above any label and any packed (label << 6) | column
_NO_PATH = np.iinfo(np.int64).min // 2  # below any packed (gain << 6) | column of ``_augment``
_LOWEST = -(1 << 54)    # labels below it flag the tile (``_cancel_cycles``): (label << 6) stays above -2**61
_OK, _FLOW, _NOT_FINITE = 0, 1, 2     # per-tile outcome codes of ``_solve`` (and of any kernel `MatrixJob` runs)
MAX_M = 45              # a tile's row and column fit 6 bits each, the greedy's sort key's 12 low bits
_POS = (1 << 12) - 1


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(cache=True, nogil=True)
    def _quantise(w, q):
        """q = round(|w| / max|w| * 2**40) for one tile; False (q undefined) when an entry is NaN or Inf."""
        m = q.shape[0]
        top = 0.0
        finite = True
        for i in range(m):
            for j in range(m):
                v = abs(np.float64(w[i, j]))
                finite &= v <= _LARGEST                  # False for Inf and for NaN
                if v > top:
                    top = v
        if not finite:
            return False
        for i in range(m):
            for j in range(m):
                # (|w| / top) * 2**40 in float64, then round half to even: bit for bit ``cycles.quantise``
                q[i, j] = np.int64(np.rint(abs(np.float64(w[i, j])) / top * _SCALE)) if top > 0.0 else 0
        return True

    @njit(cache=True, nogil=True, inline="always")
    def _admit(r, c, n, keep, rc, cc):
        """Algorithm 1's step: keep (r, c) if its row and its column both have fewer than n kept; 1 if kept.

        Without a branch: whether an entry is kept is as unpredictable as the data, and a mispredicted
        branch per entry cost more than the two counters' stores (the walk took 0.71x the time). ``keep``
        is False at (r, c) before (each entry is visited once), so writing ``ok`` there is the same."""
        ok = (rc[r] < n) & (cc[c] < n)
        keep[r, c] = ok
        rc[r] += ok
        cc[c] += ok
        return ok

    @njit(cache=True, nogil=True)
    def _greedy(q, n, keep, rc, cc, key):
        """Algorithm 1; leaves the tile's entries sorted ascending in ``key`` (for ``_lemma1_at_risk``)."""
        m = q.shape[0]
        for i in range(m):
            for j in range(m):
                # score and position in one int64 (q <= 2**40; the position (i << 6) | j, in 12 bits,
                # orders like the flat index i*M + j and decodes with shifts, not a division by M):
                # ascending keys order by score, and among equal scores the lower position sorts later,
                # so walking from the end visits descending scores with the lower index first
                key[i * m + j] = (q[i, j] << 12) | (_POS - ((i << 6) | j))
        if m * m <= 64:
            # insertion sort: measured faster than the library sort on 16 and 64 keys
            for i in range(1, m * m):
                x = key[i]
                j = i - 1
                while j >= 0 and key[j] > x:
                    key[j + 1] = key[j]
                    j -= 1
                key[j + 1] = x
        else:
            key.sort()
        kept = 0
        for s in range(m * m - 1, -1, -1):
            pos = _POS - (key[s] & _POS)
            kept += _admit(pos >> 6, pos & 63, n, keep, rc, cc)
            if kept == m * n:
                break

    @njit(cache=True, nogil=True)
    def _bucket_greedy(q, n, keep, rc, cc, order, cnt, slots):
        """``exact``'s warm start: Algorithm 1's walk over the entries counting-sorted, descending, into
        M*M buckets of equal width in q (lower flat index first within a bucket). ``slots``: M*M of scratch,
        each entry's bucket, computed once for the count and the placement."""
        m = q.shape[0]
        buckets = m * m
        for b in range(buckets + 1):
            cnt[b] = 0
        for i in range(m):
            for j in range(m):
                # q <= 2**40 and M*M < 2**11: the product fits; the maximum (q = 2**40) joins the top bucket
                slots[i * m + j] = buckets - 1 - min((q[i, j] * buckets) >> 40, buckets - 1)
        for e in range(buckets):
            cnt[slots[e] + 1] += 1
        for b in range(buckets):
            cnt[b + 1] += cnt[b]
        for i in range(m):
            for j in range(m):
                slot = slots[i * m + j]
                order[cnt[slot]] = (i << 6) | j          # decoded with shifts, not a division by M
                cnt[slot] += 1
        kept = 0
        for s in range(buckets):
            kept += _admit(order[s] >> 6, order[s] & 63, n, keep, rc, cc)
            if kept == m * n:
                break

    @njit(cache=True, nogil=True)
    def _augment(q, n, keep, rc, cc, gain, parent, seen, fresh, col_best, col_arg):
        """One augmenting path from a short row to a short column; False if none exists.

        Scratch arrays of 2M (rows first, then columns): ``gain`` of the best path reaching a node,
        ``parent`` (the column a row was reached from by removing, the row a column was reached from
        by adding), ``seen``; ``fresh`` marks the nodes reached on the current level. ``col_best``, ``col_arg``: M
        of scratch for one level's per-column search.
        """
        m = q.shape[0]
        neg = np.iinfo(np.int64).min // 4       # no path: below any path's gain (|gain| <= 2M * 2**40)
        for v in range(2 * m):
            short = v < m and rc[v] < n
            gain[v] = 0 if short else neg
            seen[v] = short
            fresh[v] = short
            parent[v] = -1
        for _level in range(m):
            # rows of the frontier -> new columns, adding a free entry: per column the best row (the first
            # among equals), found row by row with elementwise selects over the columns (vectorised)
            for c in range(m):
                fresh[m + c] = False
                col_best[c] = neg
                col_arg[c] = -1
            for r in range(m):
                if not fresh[r]:
                    continue
                g = gain[r]
                for c in range(m):
                    v = g + q[r, c]
                    better = (not seen[m + c]) and (not keep[r, c]) and (col_arg[c] < 0 or v > col_best[c])
                    col_best[c] = v if better else col_best[c]
                    col_arg[c] = r if better else col_arg[c]
            any_col = False
            for c in range(m):
                if col_arg[c] >= 0:
                    parent[m + c] = col_arg[c]
                    gain[m + c] = col_best[c]
                    seen[m + c] = True
                    fresh[m + c] = True
                    any_col = True
            if not any_col:
                break
            any_row = False
            for r in range(m):                  # new columns -> new rows, removing a kept entry
                fresh[r] = False
                if seen[r]:
                    continue
                # the best column (the first among equals): one max-reduction over (gain << 6) | (63 - c),
                # the column in the low bits, so that among equal gains the first column is the largest key
                # (as in `_cancel_cycles`: no second, branching scan for the argmax)
                best = _NO_PATH
                for c in range(m):
                    v = ((gain[m + c] - q[r, c]) << 6) | (63 - c) if fresh[m + c] and keep[r, c] else _NO_PATH
                    best = v if v > best else best
                if best > _NO_PATH:
                    parent[r] = 63 - (best & 63)
                    gain[r] = best >> 6
                    seen[r] = True
                    fresh[r] = True
                    any_row = True
            if not any_row:
                break
        end = -1
        for c in range(m):
            if seen[m + c] and cc[c] < n and (end < 0 or gain[m + c] > gain[m + end]):
                end = c
        if end < 0:
            return False
        cc[end] += 1
        c = end
        for _step in range(m + 1):
            r = parent[m + c]
            keep[r, c] = True
            prev = parent[r]
            if prev < 0:
                rc[r] += 1
                return True
            keep[r, prev] = False
            c = prev
        return False

    @njit(cache=True, nogil=True)
    def _parent_cycle(parent, stamp):
        """A row on a cycle of the parent pointers, or -1: the cycle that a walk from every node in turn
        (rows 0..M-1, then columns) first closes on itself.

        Only the rows are walked, row to row through their parent columns: every cycle holds a row (a
        row's parent is a column and a column's a row), and once the rows are walked every column
        walk would stop at a row already stamped. So it is the cycle the walk over all 2M nodes finds,
        with half the stamps and half the branches (the cancelling took 0.78-0.94x the time)."""
        m = parent.shape[0] // 2
        for r in range(m):
            stamp[r] = -1
        for s in range(m):
            v = s
            while stamp[v] < 0:
                stamp[v] = s
                c = parent[v]
                if c < 0:
                    break
                v = parent[c]
                if v < 0:
                    break
            else:
                if stamp[v] == s:
                    return v
        return -1

    @njit(cache=True, nogil=True)
    def _cancel_cycles(q, keep, dist, parent, stamp, max_cycles):
        """Apply improving cycles until none is left; False if the tile needs the fallback.

        Every parent edge satisfies d(v) >= d(parent) + cost (equal when set; labels only fall), so a
        cycle of parent pointers is a negative cycle. After applying one, the labels are kept
        (Bellman-Ford converges from any labels once no negative cycle is left) and the parents are
        reset, since the cycle's edges were reversed.

        Labels start at 0 and fall by less than 4M * 2**40 between two cycles (at the end of a pass
        the parent pointers form a forest whose roots kept their labels, and one pass chains at most
        2M hops), so checking them against ``_LOWEST`` after every cycle keeps ``label << 6`` in the
        int64 range: a tile whose labels sink that far is flagged, never solved with a wrapped key.
        """
        m = q.shape[0]
        v_count = 2 * m                 # rows 0..m-1, columns m..2m-1
        dist[:] = 0
        parent[:] = -1
        cycles = 0
        passes = 0
        while True:
            changed = False
            for r in range(m):
                # Into row r over its kept entries first, then out of it over its free ones, so that a
                # better label travels two hops per visit. In: one min-reduction over (label << 6) | c,
                # the column in the low bits (M <= 45 < 64), gives the least label and, among equals,
                # the first column reaching it, as an entry-by-entry scan finds: the parent without a
                # second, branching scan (a sixth of the cancelling's time at 4:8-T went to it). Out:
                # elementwise, a column's label stored as a min rather than a select, so that it is a
                # whole-vector store: the next row's loads of the labels can be forwarded from it,
                # which they cannot from the masked store a select compiles to. Neither loop branches
                # on the data, so both vectorise.
                d_row = dist[r]
                best = _BIG
                for c in range(m):
                    # column c -> row r: remove (r, c)
                    to_row = ((dist[m + c] + q[r, c]) << 6) | c if keep[r, c] else _BIG
                    best = to_row if to_row < best else best
                lower = (best >> 6) < d_row
                parent[r] = m + (best & 63) if lower else parent[r]
                d_row = best >> 6 if lower else d_row
                dist[r] = d_row
                changed |= lower
                out = False
                for c in range(m):
                    to_col = d_row - q[r, c] if not keep[r, c] else _BIG   # row r -> column c: add the free (r, c)
                    better = to_col < dist[m + c]
                    parent[m + c] = r if better else parent[m + c]
                    dist[m + c] = min(to_col, dist[m + c])
                    out |= better
                changed |= out
            if not changed:
                return True             # feasible potentials: no improving cycle, the mask is optimal
            passes += 1
            on_cycle = _parent_cycle(parent, stamp)
            if on_cycle < 0:
                if passes > 2 * v_count:
                    return False
                continue
            gain = 0                    # check the cycle in exact integers before touching the mask
            u = on_cycle
            for _hop in range(v_count + 1):
                p = parent[u]
                gain += -q[u, p - m] if u < m else q[p, u - m]
                u = p
                if u == on_cycle:
                    break
            if u != on_cycle or gain <= 0:
                return False
            u = on_cycle
            for _hop in range(v_count + 1):
                p = parent[u]
                if u < m:
                    keep[u, p - m] = False      # column p -> row u: remove (u, p)
                else:
                    keep[p, u - m] = True       # row p -> column u: add (p, u)
                u = p
                if u == on_cycle:
                    break
            parent[:] = -1
            passes = 0
            cycles += 1
            if cycles > max_cycles or dist.min() < _LOWEST:
                return False

    @njit(cache=True, nogil=True)
    def _lemma1_at_risk(q, keep, n, key, rc, cc):
        """Pruned score >= 2x the larger of the row-wise and column-wise relaxation bounds.

        ``key`` holds the tile's entries in ascending order (from ``_greedy``): one walk picks the
        M - N smallest of every row and of every column at the same time.
        """
        m = q.shape[0]
        pruned = 0
        for i in range(m):
            for j in range(m):
                if not keep[i, j]:
                    pruned += q[i, j]
        low_rows = 0
        low_cols = 0
        rc[:] = 0
        cc[:] = 0
        for s in range(m * m):
            pos = _POS - (key[s] & _POS)
            r = pos >> 6
            c = pos & 63
            if rc[r] < m - n:
                rc[r] += 1
                low_rows += q[r, c]
            if cc[c] < m - n:
                cc[c] += 1
                low_cols += q[r, c]
        return pruned >= 2 * max(low_rows, low_cols)

    @njit(parallel=True, cache=True)
    def _solve(w, m, n, mode, keep, outcome, first, last, chunk):
        """Tiles ``first..last-1`` of the matrix ``w`` (row-major: tile t is rows (t // (K/M)) * M... and
        columns (t % (K/M)) * M... of it), their masks written into ``keep`` (w's shape), one outcome code
        per tile into ``outcome``."""
        per_band = w.shape[1] // m
        for task in prange((last - first + chunk - 1) // chunk):
            q = np.empty((m, m), np.int64)
            k = np.empty((m, m), np.bool_)
            rc = np.empty(m, np.int64)
            cc = np.empty(m, np.int64)
            key = np.empty(m * m, np.int64)
            cnt = np.empty(m * m + 1, np.int64)
            slots = np.empty(m * m, np.int64)
            gain = np.empty(2 * m, np.int64)
            parent = np.empty(2 * m, np.int64)
            stamp = np.empty(m, np.int64)          # one per row: `_parent_cycle` walks the rows
            seen = np.empty(2 * m, np.bool_)
            fresh = np.empty(2 * m, np.bool_)
            col_best = np.empty(m, np.int64)
            col_arg = np.empty(m, np.int64)
            for t in range(first + task * chunk, min(last, first + (task + 1) * chunk)):
                r0 = (t // per_band) * m
                c0 = (t % per_band) * m
                if not _quantise(w[r0:r0 + m, c0:c0 + m], q):
                    outcome[t] = _NOT_FINITE
                    continue
                k[:] = False
                rc[:] = 0
                cc[:] = 0
                if mode == _EXACT:
                    _bucket_greedy(q, n, k, rc, cc, key, cnt, slots)
                else:
                    _greedy(q, n, k, rc, cc, key)
                ok = True
                for r in range(m):
                    while ok and rc[r] < n:
                        ok = _augment(q, n, k, rc, cc, gain, parent, seen, fresh, col_best, col_arg)
                if ok and (mode == _EXACT or _lemma1_at_risk(q, k, n, key, rc, cc)):
                    ok = _cancel_cycles(q, k, gain, parent, stamp, 4 * m * m)
                outcome[t] = _OK if ok else _FLOW
                for i in range(m):
                    for j in range(m):
                        keep[r0 + i, c0 + j] = k[i, j]


# Counters of the last call, for benchmarks and tests: tiles solved by ``flow`` because the compiled
# solver flagged them (it has stayed 0 in every test and benchmark).
stats: dict[str, int] = {"fallback": 0}


def parallel_tiles(kernel, first: int, last: int, *args) -> None:
    """``kernel(*args, first, last, chunk)``: a parallel kernel over tiles ``first..last-1``, on torch's
    thread count (`threads.numba_threads`)."""
    if numba is None:
        raise RuntimeError("the compiled solvers need numba (pip install numba)")
    with numba_threads() as workers:
        # about 8 tasks per thread (so uneven tiles even out), within [_MIN_CHUNK, _CHUNK] tiles each
        chunk = min(_CHUNK, max(_MIN_CHUNK, -(-(last - first) // (8 * workers))))
        usable(kernel)(*args, first, last, chunk)


def solve_range(w: np.ndarray, n: int, m: int, exact: bool, keep: np.ndarray, outcome: np.ndarray,
                first: int, last: int) -> None:
    """The greedy (+ cycle cancelling when ``exact``) kernel on tiles ``first..last-1`` of the CPU matrix ``w``."""
    parallel_tiles(_solve, first, last, w, m, n, _EXACT if exact else _APPROX, keep, outcome)


class MatrixJob:
    """A compiled solver on a layer's GEMM-view matrix (``C_out x K``, signed weights, any float type):
    ``run(first, last)`` solves a range of its M x M tiles (row-major), ``keep()`` is the bool mask of the
    matrix's shape. Tiles the kernel flags are solved by ``flow``; a NaN or Inf raises ValueError.
    ``solve(w, n, m, keep, outcome, first, last)`` is the kernel's range function; by default the greedy
    (``exact``: with cycle cancelling) of `solve_range`; `enumerate.py` passes its enumeration (``exact``
    then unused)."""

    def __init__(self, matrix: torch.Tensor, n: int, m: int, exact: bool = True, solve=None):
        rows, cols = matrix.shape
        if rows % m or cols % m:
            raise ValueError(f"the matrix {rows}x{cols} is not made of {m}x{m} tiles")
        w = matrix.detach().to("cpu")
        if w.dtype not in (torch.float32, torch.float64):
            w = w.float()                    # fp16/bf16 upcast exactly
        self.matrix, self.device = w.contiguous(), matrix.device
        self.n, self.m = n, m
        # solve_range looked up at each call (tests replace it to flag tiles)
        self.solve = solve or (lambda w, n, m, keep, outcome, first, last:
                               solve_range(w, n, m, exact, keep, outcome, first, last))
        self.total = rows // m * (cols // m)
        self._keep = np.empty((rows, cols), dtype=np.bool_)     # every tile's run writes its mask
        self._outcome = np.zeros(self.total, dtype=np.int8)
        stats["fallback"] = 0

    def run(self, first: int, last: int) -> None:
        if self.n in (0, self.m):
            self._keep[:] = self.n == self.m
            return
        self.solve(self.matrix.numpy(), self.n, self.m, self._keep, self._outcome, first, last)
        outcome = self._outcome[first:last]
        if (outcome == _NOT_FINITE).any():
            raise ValueError(f"transposable_mask: {NOT_FINITE}")
        flagged = np.nonzero(outcome == _FLOW)[0] + first
        if flagged.size:
            self._fall_back(flagged)

    def _fall_back(self, tiles: np.ndarray) -> None:
        m, per_band = self.m, self.matrix.shape[1] // self.m
        spans = [(int(t) // per_band * m, int(t) % per_band * m) for t in tiles]
        scores = torch.stack([self.matrix[r:r + m, c:c + m].abs() for r, c in spans])
        for (r, c), tile in zip(spans, flow_solver(scores, self.n)):
            self._keep[r:r + m, c:c + m] = tile.numpy()
        stats["fallback"] += len(spans)

    def keep(self) -> torch.Tensor:
        return torch.from_numpy(self._keep).to(self.device)


def compiled_keep(scores: torch.Tensor, n: int, exact: bool) -> torch.Tensor:
    """Masks for a (T, M, M) batch, the flagged tiles solved by ``flow`` (exact either way): a ``MatrixJob`` on
    the batch seen as a ``T*M x M`` matrix."""
    t, m, _ = scores.shape
    job = MatrixJob(scores.reshape(t * m, m), n, m, exact)
    job.run(0, t)
    return job.keep().view(t, m, m)


def on_matrix(matrix: torch.Tensor, n: int, m: int, exact: bool) -> MatrixJob | None:
    """The matrix path where the compiled kernel serves (a CPU tensor, numba present, M <= MAX_M), else None."""
    if matrix.device.type != "cpu" or numba is None or m > MAX_M:
        return None
    return MatrixJob(matrix, n, m, exact)


@register_solver("compiled", exact=True,
                 summary="greedy warm start + Bellman-Ford cycle cancelling per tile, numba-compiled, "
                         "threads over tiles (CPU); any N:M with M <= 45",
                 matrix=lambda matrix, n, m: on_matrix(matrix, n, m, exact=True))
def compiled_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    trivial = trivial_keep(scores, n)
    if trivial is not None:
        return trivial
    return compiled_keep(scores, n, exact=True)
