"""Fused CPU kernels for the mask arithmetic of a training step: SR-STE's decay added to a gradient,
``grad += decay · (1 − keep) ⊙ W`` (`methods.base.pruned_decay`, then ``add_``: three tensor operations),
the bound on pruned weights (`methods.transposable.bound_pruned`: five; with the next forward's ``W ⊙ E``,
`clamp_pruned_masked_`), and the row-wise N:4 mask that SR-STE and its kin recompute every step
(`nm.nm_mask`: |W|, topk, a zero-filled mask and a scatter), the masked weight ``W ⊙ E`` itself with its
masked gradient (`masked`), Bi-Mask's backward mask (`column_nm4_mask`; with its forward mask and both masked
weights in one call, `bimask_operands4`), S-STE's soft-thresholded weight (`soft_threshold4`), PGF's decayed mask
(`decayed`) and the MVUE 2:4 sample of a weight gradient's dYᵀ (`mvue24_sample`; a conv's dY where it lies,
`mvue24_runs`), each one pass; and AdamW's denominator over the zero second moments of pruned weights
(`adam_denominator`, two passes beside torch's own square root).

Why: on a CPU every tensor operation on more than torch's parallel grain (32K entries) wakes the thread
pool, tens of microseconds each under ``OMP_WAIT_POLICY=PASSIVE``; on a transformer's small layers those
wake-ups, not the arithmetic, are most of what they cost (measured on the GPT: decay 0.06x to 0.08x of a
step against dense, bound 0.09x). On a 64K-entry layer one serial pass takes about 40 µs (decay) and 70 µs
(bound), the tensor operations about 120-200 µs and 230 µs; the whole N:4 ``nm_mask`` call on a 384x128
weight about 70 µs, against 420 µs through topk.

The N:4 mask keeps what ``topk`` keeps, ties included, without knowing topk's algorithm: a comparison
sort's choice among four values depends only on their weak order (which are equal, which greater), so a
table from each of the 75 weak orders to the kept four bits, filled once by running ``torch.topk`` itself
on one representative of each, reproduces this build of torch's choices on every group. Where the four are
distinct that choice is a few comparisons (keep those fewer than N others exceed), which vectorise; the table
is read only for the blocks of groups that hold a tie. The comparisons are combined as booleans, never
counted or or-ed as integers: numba widens integer arithmetic to 64 bits, and 64-bit lanes halve a vector's
width (the N:4 masks ran up to 1.6x, Bi-Mask's backward mask up to 1.5x and the bound up to 1.4x slower so).

Masks reach the kernels as bytes (numpy uint8 views of the bool tensors) and the kernels compute with them
as numbers: read as numpy bools, or used to pick an index, they kept every loop here scalar (2-3x slower).

Each function does its work where its kernel serves: CPU tensors of float32 or float64 (the MVUE sample:
float32), contiguous (the MVUE sample: any strides), of at most `MAX_ENTRIES` entries (above that, the
tensor operations' own threads win; the MVUE sample, a parallel kernel on torch's threads, takes any size),
numba present. There an in-place one returns True and one that makes a tensor returns it; otherwise it
changes nothing and returns False or None, and the caller runs the formula. The kernels compute what the
formulas compute, bit for bit: the same IEEE operations, each rounded in the tensor's type (numba
contracts no multiply-add unless asked), checked against the formulas on random, signed-zero and
non-finite inputs (tests/test_fused.py) and by tests/test_step_identity.py.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from .layout import LAYOUTS, grouped_dims
from .threads import forked_from_pool, numba_threads

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; without it the tensor formulas serve
    njit = None

MAX_ENTRIES = 1 << 20
_MVUE_BLOCK = 16        # the shortest run of groups of 4 `mvue24_runs` samples in place (with B > 1)
_MVUE_CHUNK = 64        # groups of 4 per chunk of `_mvue_rows`
_MVUE_TILE_GROUPS = 4   # a tile of `_mvue_tiles`: 4 groups of 4 tokens, every channel (4 and 8 timed alike)
_PAD = 16               # floats after each row of `_mvue_tiles`' laid-out uniforms
_PARALLEL_ENTRIES = 1 << 17     # the MVUE kernels' smallest job for both threads: below it the other's wake-up
                                # costs more than it saves (the tile kernel, PASSIVE: 256x256 0.066 ms on one
                                # thread, 0.080 on two; 384x1024 0.39 against 0.25)
_RANK_BLOCK = 256       # groups of 4 per block of `_mask4`: a block with a tie is read again from the table


def _served(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    if njit is None or first.numel() > MAX_ENTRIES or first.dtype not in (torch.float32, torch.float64):
        return False
    shape = first.shape
    for t in tensors:   # a loop, not all() over a generator: this runs for every layer at every step
        if not (t.is_cpu and t.is_contiguous() and t.shape == shape) or t.requires_grad:
            return False    # (a gradient made with create_graph=True stays autograd's)
    return True


def _bytes(keep: torch.Tensor) -> np.ndarray:
    """A bool mask's flat bytes (0 or 1) as numpy uint8: a kernel that reads a bool mask as bytes and computes
    with them as numbers vectorises, where reading numpy bools (or indexing with them) kept its loop scalar:
    2-3x slower on the GPT's layers. Made in numpy (one torch call, not three): see `_flat`."""
    return _flat(keep).view(np.uint8)


def _flat(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's entries as a flat numpy view. Why numpy's reshape, not torch's ``view(-1)``:
    each torch call goes through the dispatcher, and in a training step, between large GEMMs that have evicted
    its code from the caches, the first of them takes 10-30 µs (measured on LeNet-5's step); a numpy reshape
    takes a fraction of that."""
    return t.numpy().reshape(-1)


def _group_spread(weight: torch.Tensor, m: int, layout: str) -> int:
    """How far apart in memory the M entries of a group along K of a contiguous ``weight`` lie: 1 for a matrix
    and a ``flatten`` conv, kh*kw for an ``nhwc`` conv (its groups run along C_in at each kernel tap); 0 where
    the layout or the groups' fit fails, as the formula's `layout.grouped` view checks them. From the shape
    alone: a view is a torch call, and after the optimizer's step its first one costs tens of µs."""
    if layout not in LAYOUTS or weight.dim() not in (2, 4) or grouped_dims(weight.shape, layout)[0][1] % m:
        return 0
    return weight.shape[2] * weight.shape[3] if weight.dim() == 4 and layout == "nhwc" else 1


if njit is not None:

    @njit(cache=True, nogil=True)
    def _add_decay(grad, weight, keep, factors):
        # grad += weight * (0 if kept else decay): `methods.base.pruned_decay`'s product, then ``add_``
        kept, pruned = factors[0], factors[1]
        for i in range(grad.shape[0]):
            grad[i] = grad[i] + weight[i] * (kept if keep[i] else pruned)

    @njit(cache=True, nogil=True)
    def _masked_decay(grad, weight, keep, factor):
        # torch.where(keep, grad, grad + alpha * weight): the product and the sum each rounded, as two operations
        alpha = factor[0]
        for i in range(grad.shape[0]):
            grad[i] = grad[i] if keep[i] else grad[i] + alpha * weight[i]

    @njit(cache=True, nogil=True)
    def _bound(flat, keep, a_n, m, b_n, caps, out):
        """``flat`` and ``keep`` (bytes): flat views of (A, M, B) tensors, groups along axis 1 (entry (a, i, b)
        at ``(a*M + i)*B + b``; its group's cap at ``a*B + b``). False, with nothing changed, where a weight is
        NaN or a group's cap is 0 (there torch's clamp picks NaN bits and signed zeros its own way: the
        caller's tensor formula decides); else every weight clamped to [-cap, cap] of its group, True, and,
        unless ``out`` is empty, ``out = flat * keep`` of the clamped weights (`_product`'s arithmetic).
        ``caps`` arrives zeroed: its first entry is a zero of the tensor's type, so every value stays in that
        type. The innermost loop runs over the groups of one (i, b), branch-free, so that it vectorises."""
        zero = caps[0]
        special = False
        for i in range(m):
            for b in range(b_n):
                for a in range(a_n):
                    at = (a * m + i) * b_n + b
                    v = abs(flat[at])
                    special |= v != v
                    caps[a * b_n + b] = max(caps[a * b_n + b], v if keep[at] else zero)
        for j in range(a_n * b_n):
            special |= caps[j] == zero
        if special:
            return False
        product = out.shape[0] > 0
        for i in range(m):
            for b in range(b_n):
                for a in range(a_n):
                    at = (a * m + i) * b_n + b
                    # within [-cap, cap] a weight stays as it is, -0.0 included
                    v = min(max(flat[at], -caps[a * b_n + b]), caps[a * b_n + b])
                    flat[at] = v
                    if product:
                        out[at] = v * flat.dtype.type(keep[at])
        return True

    @njit(cache=True, nogil=True)
    def _clamped4(flat, keep, g, zero):
        """Group ``g`` of 4 consecutive entries (M = 4, B = 1: a Linear's or a flatten conv's rows) clamped to
        ± its largest kept magnitude, `_bound`'s arithmetic, and whether the group is one `_bound` leaves to
        the formula (a NaN, or a cap of 0): then its entries as they are. Branch-free on the keep bytes."""
        w0, w1, w2, w3 = flat[4 * g], flat[4 * g + 1], flat[4 * g + 2], flat[4 * g + 3]
        cap = max(max(abs(w0) if keep[4 * g] else zero, abs(w1) if keep[4 * g + 1] else zero),
                  max(abs(w2) if keep[4 * g + 2] else zero, abs(w3) if keep[4 * g + 3] else zero))
        special = (w0 != w0) | (w1 != w1) | (w2 != w2) | (w3 != w3) | (cap == zero)
        return (w0 if special else min(max(w0, -cap), cap), w1 if special else min(max(w1, -cap), cap),
                w2 if special else min(max(w2, -cap), cap), w3 if special else min(max(w3, -cap), cap), special)

    @njit(cache=True, nogil=True)
    def _bound4(flat, keep, out):
        """`_bound` where the groups are 4 consecutive entries, in one pass: each group's cap and clamp while its
        four entries are in registers (`_bound`'s loops stride over the whole weight once per group entry: 3x
        slower here; a pass for the caps and one for the clamp read the weight twice: on the GPT's weights,
        caches flushed, 0.70x the time), and ``out = flat * keep`` of the clamped weights unless ``out`` is
        empty (two loops: no test of it inside one). True where a group holds a NaN or has a cap of 0: that
        group is left as it was, the others are clamped (the formula, run after it, clamps them again to the
        same caps, which changes nothing). (The flag is a boolean: numba widens integer flags to 64 bits.)"""
        zero = flat.dtype.type(0)
        special = False
        if out.shape[0] == 0:
            for g in range(flat.shape[0] // 4):
                v0, v1, v2, v3, bad = _clamped4(flat, keep, g, zero)
                special |= bad
                flat[4 * g], flat[4 * g + 1], flat[4 * g + 2], flat[4 * g + 3] = v0, v1, v2, v3
            return special
        for g in range(flat.shape[0] // 4):
            v0, v1, v2, v3, bad = _clamped4(flat, keep, g, zero)
            special |= bad
            flat[4 * g], flat[4 * g + 1], flat[4 * g + 2], flat[4 * g + 3] = v0, v1, v2, v3
            out[4 * g] = v0 * flat.dtype.type(keep[4 * g])
            out[4 * g + 1] = v1 * flat.dtype.type(keep[4 * g + 1])
            out[4 * g + 2] = v2 * flat.dtype.type(keep[4 * g + 2])
            out[4 * g + 3] = v3 * flat.dtype.type(keep[4 * g + 3])
        return special


@functools.lru_cache(maxsize=256)
def _scalars(values: tuple[float, ...], single: bool) -> np.ndarray:
    """``values`` as a read-only float32 (``single``) or float64 array, made once per run's constants: building a
    numpy array took about 20 µs at a training step's first call after the backward, where its code is cold."""
    out = np.array(values, dtype=np.float32 if single else np.float64)
    out.flags.writeable = False
    return out


def add_pruned_decay_(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> bool:
    """``grad += decay · (1 − keep) ⊙ weight`` in place, as ``grad.add_(pruned_decay(weight, keep, decay))``
    computes it, where the kernel serves (True); else nothing changed (False)."""
    if not (_served(grad, weight, keep) and grad.dtype == weight.dtype and keep.dtype == torch.bool):
        return False
    # the kept entries' factor +0 and the pruned ones' decay, both in the weight's type, as the formula's where
    factors = _scalars((0.0, decay), weight.dtype == torch.float32)
    _add_decay(_flat(grad), _flat(weight.detach()), _bytes(keep), factors)
    torch.autograd.graph.increment_version(grad)      # written through numpy, as add_ would count it
    return True


def add_masked_decay_(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, alpha: float) -> bool:
    """``grad = torch.where(keep, grad, grad + alpha * weight)`` in place (masked decay's formula: the kept
    entries' gradient bit-untouched, -0.0 included), where the kernel serves (True); else nothing changed."""
    if not (_served(grad, weight.detach(), keep) and grad.dtype == weight.dtype and keep.dtype == torch.bool):
        return False
    # alpha in the weight's type, as torch's product takes a Python float
    factor = _scalars((alpha,), weight.dtype == torch.float32)
    _masked_decay(_flat(grad), _flat(weight.detach()), _bytes(keep), factor)
    torch.autograd.graph.increment_version(grad)
    return True


def clamp_pruned_(weight: torch.Tensor, keep: torch.Tensor, m: int, layout: str) -> bool:
    """Clamp, in place, every weight of each group of M along K (GEMM view) to ± the largest kept magnitude
    of its group, as ``transposable.bound_pruned``'s tensor formula does, where the kernel serves (True);
    else False: where it does not serve, nothing changed; where a weight is NaN or a group's largest kept
    magnitude is 0, such groups left as they were and, at M = 4 along a matrix's rows, the others clamped
    already. Either way the caller's formula then gives its own result everywhere: a group clamped to the cap
    of its kept weights, which are within it, is what a second clamp to that cap leaves."""
    return _clamp_pruned(weight, keep, m, layout, product=False)[0]


def clamp_pruned_masked_(weight: torch.Tensor, keep: torch.Tensor, m: int, layout: str) -> torch.Tensor | None:
    """`clamp_pruned_`, and ``weight ⊙ keep`` of the clamped weight, made in the same pass and returned (`masked`'s
    product, bit for bit); None where `clamp_pruned_` returns False. Why: a transposable layer's
    next forward multiplies the weight this bound has just read by the same held mask (`Method.hold_for_forward`)."""
    served, out = _clamp_pruned(weight, keep, m, layout, product=True)
    return out if served else None


def _clamp_pruned(weight: torch.Tensor, keep: torch.Tensor, m: int, layout: str,
                  product: bool) -> tuple[bool, torch.Tensor | None]:
    w = weight.detach()
    if not (_served(w, keep) and keep.dtype == torch.bool and w.numel() > 0):
        return False, None
    # (A, M, B), groups along axis 1: a Linear's or a flatten conv's rows cut in M-runs (B = 1), an nhwc
    # conv's groups of M input channels at each kernel tap (B = kh*kw)
    b = _group_spread(w, m, layout)
    if not b:
        return False, None
    flat, keep_bytes = _flat(w), _bytes(keep)
    out = torch.empty_like(w) if product else None
    target = flat[:0] if out is None else _flat(out)        # an empty target: no product
    if m == 4 and b == 1:           # groups of 4 consecutive entries, one pass (writes even where not served)
        served = not _bound4(flat, keep_bytes, target)
    else:                           # writes nothing where not served
        a = w.numel() // (m * b)
        served = _bound(flat, keep_bytes, a, m, b, np.zeros(a * b, dtype=flat.dtype), target)
        if not served:
            return False, None
    # written through numpy: tell autograd and version-keyed caches (accel's compressed operands) it changed
    torch.autograd.graph.increment_version(weight)
    return served, out if served else None


# ------------------------------------------------------------------------------------------------
# AdamW's denominator over the pruned weights' zero second moments

if njit is not None:

    @njit(cache=True, nogil=True)
    def _holds_zero(values):
        # whether a ±0 lies in one of four runs of 64 entries spread over ``values``: a pruned weight's moment
        # is zero in every group of M and in most runs of an unstructured mask; a dense gradient's, rarely
        n, run = values.shape[0], 64
        for r in range(4):
            start = max(n - run, 0) * r // 3
            for i in range(start, min(start + run, n)):
                if values[i] == 0:
                    return True
        return False

    @njit(cache=True, nogil=True)
    def _zeros_to_one(values, out):
        # out = values with every ±0 replaced by 1, whose square root takes VML's common path
        one = values.dtype.type(1)
        for i in range(values.shape[0]):
            x = values[i]
            out[i] = x if x != 0 else one

    @njit(cache=True, nogil=True)
    def _denominator(roots, values, scalars):
        # roots = (sqrt(values) / b) + eps, two IEEE operations in the values' type, where ``roots`` holds VML's
        # square roots of `_zeros_to_one`'s values: at a ±0 the root is that ±0 (IEEE: sqrt(±0) = ±0)
        b, eps = scalars[0], scalars[1]
        for i in range(values.shape[0]):
            x = values[i]
            roots[i] = (roots[i] if x != 0 else x) / b + eps


def adam_denominator(exp_avg_sq: torch.Tensor, bias_correction2_sqrt: float, eps: float) -> torch.Tensor | None:
    """AdamW's ``(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` as a new tensor, bit for bit, where the
    kernels serve; None where they do not, and the caller runs the formula.

    Why: a pruned weight's gradient is exactly zero (fixed and unstructured masks), so its second moment is 0,
    and torch takes a float ``sqrt`` on a CPU through MKL's VML, which sends each zero down its rare-value
    path: 1M zeros take about 2-3 ms against 0.2-0.3 ms for other numbers (the GPT's pruned weights: 2.2 ms
    of a 30 ms step). The square roots here are still VML's own, taken by ``torch.sqrt_`` on a
    copy whose zeros are ones; the zeros' roots, ±0, are put back as the division reads them. Not numpy's or the
    CPU's ``sqrt``: VML's is not correctly rounded (about 1 float32 in 170 lands one ulp below IEEE's), and the
    bits must stay torch's.

    Where a sample of the moments holds no zero (`_holds_zero`: a dense gradient's), None as well: torch's own
    three operations, on both threads, are faster there than these serial passes (a 64K-entry tensor without
    zeros: 45 µs against 57). The sample decides only the time; either way the bits are the formula's."""
    if not (_served(exp_avg_sq) and exp_avg_sq.numel() > 0):
        return None
    values = _flat(exp_avg_sq)
    if not _holds_zero(values):
        return None
    out = torch.empty_like(exp_avg_sq)
    roots = _flat(out)
    _zeros_to_one(values, roots)
    out.sqrt_()
    # b and eps in the tensor's type, as torch converts a Python float operand (one rounding each)
    _denominator(roots, values, np.array((bias_correction2_sqrt, eps), dtype=values.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# The masked weight W ⊙ E of every forward (and the masked gradient dW~ ⊙ E of the backward)

if njit is not None:

    @njit(cache=True, nogil=True)
    def _product(out, values, keep):
        # values * keep: the keep byte (0 or 1) converted to the values' type, which is what ``values * keep``
        # does once torch has cast the bool to it
        for i in range(values.shape[0]):
            out[i] = values[i] * values.dtype.type(keep[i])

    @njit(cache=True, nogil=True)
    def _decayed(out, values, keep, value):
        # torch.where(keep, values, values * value): value[0] already in the values' type, as torch's CPU
        # product takes a scalar operand (converted to the type it computes in, then one multiply)
        v = value[0]
        for i in range(values.shape[0]):
            out[i] = values[i] if keep[i] else values[i] * v


def masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """``values * keep`` for a bool ``keep`` as a new tensor, one serial pass, bit for bit the product; None
    where the kernel does not serve, and the caller multiplies.

    Why: ``W * E`` with a bool mask first makes a float copy of the mask, then multiplies, each operation
    above torch's parallel grain waking the thread pool: about 95 µs on a 384x128 weight, against 14 µs here.
    That is the case of a mask made afresh every step (SR-STE's and its kin's, Bi-Mask's, BAME's). A
    persistent mask is cast once (`Method.mask_as`) and multiplied by torch on both threads, which measured
    faster end to end than this serial pass once the weight has left the cache: a float mask is left to it."""
    if not (_served(values, keep) and keep.dtype == torch.bool):
        return None
    out = torch.empty_like(values)
    flat_values = _flat(values)
    _product(_flat(out), flat_values, _bytes(keep))
    return out


def decayed(values: torch.Tensor, keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor | None:
    """PGF's forward weight ``torch.where(keep, values, values * value)`` (``value`` a 0-dim CPU tensor, the
    pruned weights' mask value) as a new tensor, one serial pass, bit for bit; None where the kernel does not
    serve (as `masked`, with a bool ``keep``; any size: the where and the product are two tensor passes)."""
    if not (_served(values, keep) and keep.dtype == torch.bool and value.dim() == 0 and value.device.type == "cpu"):
        return None
    out = torch.empty_like(values)
    flat = _flat(values)
    _decayed(_flat(out), flat, _bytes(keep), np.array([value.item()], dtype=flat.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# Row-wise N:4 masks (SR-STE's every step): topk's choice, from a table topk itself fills

if njit is not None:

    @njit(cache=True, nogil=True, inline="always")
    def _order4(a0, a1, a2, a3):
        """The weak order of four values as a code < 3**6: per pair (i < j), 0 if a_i < a_j, 1 if equal, 2
        if a_i > a_j. A comparison sort's choice among them depends on nothing else."""
        code = 0
        for x, y in ((a0, a1), (a0, a2), (a0, a3), (a1, a2), (a1, a3), (a2, a3)):
            code = code * 3 + (np.int64(x > y) * 2 + np.int64(x == y))     # arithmetic, not branches
        return code

    @njit(cache=True, nogil=True, inline="always")
    def _split(x, y):
        """(the larger, the smaller) of two values as selects, which compile to vector max and min: numba's
        ``max`` and ``min`` test for NaN and branch, which keeps a loop scalar."""
        return (x if x > y else y), (y if x > y else x)

    @njit(cache=True, nogil=True, inline="always")
    def _bounds4(a0, a1, a2, a3, n):
        """The n-th and the (n+1)-th largest of four values (no NaN among them; with one, anything): a sorting
        network of five compare-exchanges. topk(n) keeps exactly the values at or above the first wherever the
        two differ; where they are equal, which of the tied values it keeps is its own choice (the table's).
        The loops that call it are compiled once per N, so ``n`` is a constant there and one pair is left."""
        h01, l01 = _split(a0, a1)
        h23, l23 = _split(a2, a3)
        s0, x = _split(h01, h23)        # s0 >= s1 >= s2 >= s3: the four in order
        y, s3 = _split(l01, l23)
        s1, s2 = _split(x, y)
        if n == 1:
            return s0, s1
        if n == 2:
            return s1, s2
        return s2, s3

    @njit(cache=True, nogil=True, inline="always")
    def _nan4(a0, a1, a2, a3):
        """Whether one of four magnitudes (each >= 0 or NaN) is NaN: their sum is NaN exactly then (Inf + Inf is
        Inf), one compare where four took longer."""
        total = a0 + a1 + a2 + a3
        return total != total

    @njit(cache=True, nogil=True, inline="always")
    def _ranked4(a0, a1, a2, a3, n):
        """One group of 4 magnitudes: whether topk(n)'s choice among them is a tie (its n-th and (n+1)-th
        largest equal: only the table knows which it keeps), whether one is NaN, and the keep bytes of the
        values at or above the n-th largest (`_bounds4`), topk's choice wherever it is not a tie. Branch-free,
        so that the loops calling it vectorise. (Counting, for each value, the others above it, with the
        comparisons' boolean algebra and a tie test on every pair, made a layer's mask and product in 1.2-1.4x
        the time: `benchmarks/kernels.py`.)"""
        t, u = _bounds4(a0, a1, a2, a3, n)
        return (t == u, _nan4(a0, a1, a2, a3),
                np.uint8(a0 >= t), np.uint8(a1 >= t), np.uint8(a2 >= t), np.uint8(a3 >= t))

    @njit(cache=True, nogil=True, inline="always")
    def _rank_run(weight, n, keep):
        tie, nan = False, False
        for g in range(weight.shape[0] // 4):
            t, x, keep[4 * g], keep[4 * g + 1], keep[4 * g + 2], keep[4 * g + 3] = _ranked4(
                abs(weight[4 * g]), abs(weight[4 * g + 1]), abs(weight[4 * g + 2]), abs(weight[4 * g + 3]), n)
            tie |= t
            nan |= x
        return np.int32(tie) | (np.int32(nan) << 1)

    @njit(cache=True, nogil=True)
    def _rank_pass(weight, n, keep):
        """`_ranked4` on every group of 4 consecutive |w| of the flat ``weight``, into ``keep``; the groups'
        flags or-ed together: 1 if a group holds a tie, 2 if one holds a NaN. One loop per N (see `_bounds4`)."""
        if n == 1:
            return _rank_run(weight, 1, keep)
        if n == 2:
            return _rank_run(weight, 2, keep)
        return _rank_run(weight, 3, keep)

    @njit(cache=True, nogil=True)
    def _mask4(weight, n, table, keep, out, value):
        """``keep`` (bytes): per group of 4 consecutive |w| of the flat ``weight``, ``table[n - 1, order]``'s 4
        bits. Ranked by comparisons (`_rank_pass`) a block of groups at a time; a block where a group's choice
        is a tie (`_ranked4`) is then read from the table, group by group (the table's gather keeps a loop scalar:
        3x slower). False where a weight is NaN (topk ranks NaN its own way; ``keep`` is then garbage). The
        NaN test is a flag read after the loop, not an exit from it: loops without exits run faster here.
        ``out``, unless empty: ``weight * keep`` too (`_product`), block by block while the block is in cache;
        with a ``value`` (one entry, in the weight's type; else empty) PGF's ``where(keep, weight, weight *
        value)`` instead (`_decayed`)."""
        nan = np.int32(0)
        product = out.shape[0] > 0
        row = table[n - 1]
        groups = weight.shape[0] // 4
        for start in range(0, groups, _RANK_BLOCK):
            stop = min(start + _RANK_BLOCK, groups)
            # the block as views: indices from 0 let the compiler see the groups' stride and vectorise
            flags = _rank_pass(weight[4 * start:4 * stop], n, keep[4 * start:4 * stop])
            nan |= flags >> 1
            if flags & 1:
                for g in range(start, stop):
                    bits = row[_order4(abs(weight[4 * g]), abs(weight[4 * g + 1]), abs(weight[4 * g + 2]),
                                       abs(weight[4 * g + 3]))]
                    keep[4 * g], keep[4 * g + 1] = bits & 1, (bits >> 1) & 1
                    keep[4 * g + 2], keep[4 * g + 3] = (bits >> 2) & 1, (bits >> 3) & 1
            if product and value.shape[0]:
                _decayed(out[4 * start:4 * stop], weight[4 * start:4 * stop], keep[4 * start:4 * stop], value)
            elif product:
                _product(out[4 * start:4 * stop], weight[4 * start:4 * stop], keep[4 * start:4 * stop])
        return nan == 0

    @njit(cache=True, nogil=True, inline="always")
    def _spread_run(weight, n, table, keep, out, spread, value):
        """`_mask4` where the flat ``weight`` runs as (blocks, 4, spread): group (b, s) is the 4 entries
        ``b*4*spread + i*spread + s``, i = 0..3 in that order (an nhwc conv's (C_out, C_in, kh, kw) weight, its
        groups along C_in at every kernel position: spread = kh*kw). ``keep`` and ``out`` in the weight's own
        order, so no copy into the GEMM view and back. Ranked by comparisons a block at a time, the loop over s
        reading each channel's run in order; a block with a tie is read again from the table. Indices are
        unsigned: with signed ones numba guards each against wrapping around, and the loop stays scalar."""
        nan = False
        row = table[n - 1]
        step = np.uint64(spread)
        for b in range(weight.shape[0] // (4 * spread)):
            at = np.uint64(4) * step * np.uint64(b)
            tie = False
            for s in range(spread):
                i0 = at + np.uint64(s)
                i1, i2, i3 = i0 + step, i0 + np.uint64(2) * step, i0 + np.uint64(3) * step
                t, x, keep[i0], keep[i1], keep[i2], keep[i3] = _ranked4(
                    abs(weight[i0]), abs(weight[i1]), abs(weight[i2]), abs(weight[i3]), n)
                tie |= t
                nan |= x
            if tie:
                for s in range(spread):
                    i0 = at + np.uint64(s)
                    i1, i2, i3 = i0 + step, i0 + np.uint64(2) * step, i0 + np.uint64(3) * step
                    bits = row[_order4(abs(weight[i0]), abs(weight[i1]), abs(weight[i2]), abs(weight[i3]))]
                    keep[i0], keep[i1], keep[i2], keep[i3] = bits & 1, (bits >> 1) & 1, (bits >> 2) & 1, (bits >> 3) & 1
        if out.shape[0] > 0 and value.shape[0]:
            _decayed(out, weight, keep, value)
        elif out.shape[0] > 0:
            _product(out, weight, keep)
        return not nan

    @njit(cache=True, nogil=True)
    def _mask4_spread(weight, n, table, keep, out, spread, value):
        """`_spread_run`, one loop per N (see `_bounds4`)."""
        if n == 1:
            return _spread_run(weight, 1, table, keep, out, spread, value)
        if n == 2:
            return _spread_run(weight, 2, table, keep, out, spread, value)
        return _spread_run(weight, 3, table, keep, out, spread, value)

    @njit(cache=True, nogil=True, inline="always")
    def _column_run(scores, fmask, perm, n, table, keep, out):
        """``keep[perm[4g + i], c]`` (bytes, as ``fmask``): per group g of 4 permuted rows and per column c,
        ``table[n - 1, order]``'s bit i of the values ``|scores| * fmask`` there, and ``fmask`` itself. Ranked
        by comparisons along the columns (as `_mask4`); a group of rows where a column's choice is a tie among
        values ``fmask`` keeps one of is then read again from the table. A tie among values ``fmask`` prunes
        (the many zeros it makes) needs no table: whichever topk picks, the and with ``fmask`` drops it. False
        where a value is NaN (an Inf score times a pruned 0; ``keep`` is then garbage); as in `_mask4`, a flag.
        ``out``, unless empty: ``scores * keep`` too (`_product`'s formula), each group of rows while it is in
        cache. Every array is indexed whole, ``scores[r, c]``: a row taken as a view (``scores[r]``) is a new
        array with its reference count raised and dropped, and the sixteen a group took cost more than its
        arithmetic on the GPT's 128-wide layers (a 512x128 weight's call took 1.6x as long)."""
        nan = False
        product = out.shape[0] > 0
        row = table[n - 1]
        one = scores.dtype.type(1)
        cols = scores.shape[1]
        for g in range(scores.shape[0] // 4):
            r0, r1, r2, r3 = perm[4 * g], perm[4 * g + 1], perm[4 * g + 2], perm[4 * g + 3]
            tie = False
            for c in range(cols):
                k0, k1, k2, k3 = fmask[r0, c], fmask[r1, c], fmask[r2, c], fmask[r3, c]
                # ``|scores| * fmask`` as torch computes it: times 1 or 0 in the scores' type
                a0, a1 = abs(scores[r0, c]) * (one * k0), abs(scores[r1, c]) * (one * k1)
                a2, a3 = abs(scores[r2, c]) * (one * k2), abs(scores[r3, c]) * (one * k3)
                nan |= _nan4(a0, a1, a2, a3)
                b0, b1, b2, b3 = k0 != 0, k1 != 0, k2 != 0, k3 != 0
                t, u = _bounds4(a0, a1, a2, a3, n)
                p0, p1, p2, p3 = a0 >= t, a1 >= t, a2 >= t, a3 >= t
                # topk's own choice matters only where it is a tie and ``fmask`` keeps one of the tied values
                tie |= (t == u) & ((b0 & (a0 == t)) | (b1 & (a1 == t)) | (b2 & (a2 == t)) | (b3 & (a3 == t)))
                keep[r0, c], keep[r1, c] = np.uint8(b0 & p0), np.uint8(b1 & p1)
                keep[r2, c], keep[r3, c] = np.uint8(b2 & p2), np.uint8(b3 & p3)
            if tie:
                for c in range(cols):
                    k0, k1, k2, k3 = fmask[r0, c], fmask[r1, c], fmask[r2, c], fmask[r3, c]
                    bits = row[_order4(abs(scores[r0, c]) * (one * k0), abs(scores[r1, c]) * (one * k1),
                                       abs(scores[r2, c]) * (one * k2), abs(scores[r3, c]) * (one * k3))]
                    keep[r0, c], keep[r1, c] = k0 & bits & 1, k1 & (bits >> 1) & 1
                    keep[r2, c], keep[r3, c] = k2 & (bits >> 2) & 1, k3 & (bits >> 3) & 1
            if product:
                for r in (r0, r1, r2, r3):
                    for c in range(cols):
                        out[r, c] = scores[r, c] * scores.dtype.type(keep[r, c])
        return not nan

    @njit(cache=True, nogil=True)
    def _column4(scores, fmask, perm, n, table, keep, out):
        """`_column_run`, one loop per N (see `_bounds4`)."""
        if n == 1:
            return _column_run(scores, fmask, perm, 1, table, keep, out)
        if n == 2:
            return _column_run(scores, fmask, perm, 2, table, keep, out)
        return _column_run(scores, fmask, perm, 3, table, keep, out)

    @njit(cache=True, nogil=True, inline="always")
    def _soft1(v, t, scale, zero):
        """One weight's ``scale * S(w)`` at the threshold t: ``sign(w) * (|w| - t)`` above t, ``zero`` (+0.0)
        at or below it. sign(w) * (|w| - t) is exact negation for w < 0 (|w| > t >= 0, so w is not 0). As
        selects, so that the loop vectorises."""
        a = abs(v)
        d = a - t
        s = d if v > 0 else -d
        return scale * (s if a > t else zero)

    @njit(cache=True, nogil=True, inline="always")
    def _soft_run(weight, n, scale, out):
        nan = False
        factor, zero = scale[0], scale[1]
        for g in range(weight.shape[0] // 4):
            w0, w1, w2, w3 = weight[4 * g], weight[4 * g + 1], weight[4 * g + 2], weight[4 * g + 3]
            a0, a1, a2, a3 = abs(w0), abs(w1), abs(w2), abs(w3)
            nan |= _nan4(a0, a1, a2, a3)
            t = _bounds4(a0, a1, a2, a3, n)[1]      # the (n+1)-th largest
            out[4 * g], out[4 * g + 1] = _soft1(w0, t, factor, zero), _soft1(w1, t, factor, zero)
            out[4 * g + 2], out[4 * g + 3] = _soft1(w2, t, factor, zero), _soft1(w3, t, factor, zero)
        return not nan

    @njit(cache=True, nogil=True)
    def _soft4(weight, n, scale, out):
        """S-STE's ``beta * S(W)`` per group of 4 consecutive weights of the flat ``weight``: t the (n+1)-th
        largest |w| (`_bounds4`: no index, so ties cannot matter), `_soft1` of each weight with ``scale[0]``
        and ``scale[1]``, a zero of the type. False where a weight is NaN (``out`` then garbage). One loop per
        N (see `_bounds4`): with N read in the loop and a branch per weight it took 1.4-1.8x as long."""
        if n == 1:
            return _soft_run(weight, 1, scale, out)
        if n == 2:
            return _soft_run(weight, 2, scale, out)
        return _soft_run(weight, 3, scale, out)

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _mvue_group(x0, x1, x2, x3, u0, u1, eps):
        """One group's sample from its two uniforms: every quantity in the formula's order and in float32
        (``eps``: EPS in float32, as the tensor operation takes the Python float), the two cumulative sums
        accumulated in float64 and rounded to float32, as torch's CPU cumsum does. Branch-free (selects), so
        that a loop over groups calling it vectorises."""
        zero, one = np.float32(0.0), np.float32(1.0)
        a0, a1, a2, a3 = abs(x0) + eps, abs(x1) + eps, abs(x2) + eps, abs(x3) + eps
        total = ((a0 + a1) + a2) + a3
        t0, t1, t2, t3 = a0 / total, a1 / total, a2 / total, a3 / total
        k0, k1, k2, k3 = t0 / (total - a0), t1 / (total - a1), t2 / (total - a2), t3 / (total - a3)
        sk = ((k0 + k1) + k2) + k3
        # The two indices are counted in float32 (0.0 to 3.0, exact), not as integers: numba's integers are 64
        # bits wide, and without the selects on them the loop runs 10-20% faster.
        # the first index: how many of the cumulative t_0, t_0 + t_1, t_0 + t_1 + t_2 are <= u0
        d0 = np.float64(t0)
        d1 = d0 + np.float64(t1)
        d2 = d1 + np.float64(t2)
        first = ((one if np.float32(d0) <= u0 else zero) + (one if np.float32(d1) <= u0 else zero)
                 + (one if np.float32(d2) <= u0 else zero))
        # the second: among the other three by a (the first's weight 0), against u1 * their total
        e0 = np.float64(zero if first == 0 else a0)
        e1 = e0 + np.float64(zero if first == 1 else a1)
        e2 = e1 + np.float64(zero if first == 2 else a2)
        threshold = u1 * np.float32(e2 + np.float64(zero if first == 3 else a3))
        second = ((one if np.float32(e0) <= threshold else zero) + (one if np.float32(e1) <= threshold else zero)
                  + (one if np.float32(e2) <= threshold else zero))
        second -= one if second == first else zero
        y0, y1 = x0 / (t0 + a0 * (sk - k0)), x1 / (t1 + a1 * (sk - k1))
        y2, y3 = x2 / (t2 + a2 * (sk - k2)), x3 / (t3 + a3 * (sk - k3))
        return (y0 if (first == 0) | (second == 0) else zero, y1 if (first == 1) | (second == 1) else zero,
                y2 if (first == 2) | (second == 2) else zero, y3 if (first == 3) | (second == 3) else zero)

    @njit(cache=True, nogil=True, inline="always")
    def _mvue_tile_count(dy):
        """`_mvue_tiles`' tiles of ``dy``: its groups of 4 rows, `_MVUE_TILE_GROUPS` to a tile."""
        return -(-(dy.shape[0] // 4) // _MVUE_TILE_GROUPS)

    @njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _mvue_tile(dy, u, eps, out, drawn, tile):
        """Tile ``tile`` of `_mvue_tiles`: its `_MVUE_TILE_GROUPS` groups of 4 rows of ``dy`` (tokens), all
        columns (channels). The tile's uniforms are first laid along the columns in ``drawn`` (groups, 2,
        columns and more; they were drawn along the groups, u (columns, groups, 2)), so that the loop over the
        columns reads every operand, and writes the sample, contiguously and vectorises. Whole rows keep the
        reads and writes of dY and of the sample in a few sequential streams (tiles of 64 columns made the
        ViT-Tiny's 768x6400 1.5x slower).

        Every index is unsigned: numba fixes up a negative index, and on a signed index it cannot rule one out
        that fix-up made each load a gather and the loop 5x slower (a loop from 0 is spared; one from a tile's
        first group is not)."""
        columns, groups = np.uint64(dy.shape[1]), np.uint64(dy.shape[0] // 4)
        g0 = np.uint64(tile) * np.uint64(_MVUE_TILE_GROUPS)
        g1 = min(groups, g0 + np.uint64(_MVUE_TILE_GROUPS))
        for c in range(columns):
            for g in range(g0, g1):
                drawn[g - g0, 0, c] = u[c, g, 0]
                drawn[g - g0, 1, c] = u[c, g, 1]
        four = np.uint64(4)
        for g in range(g0, g1):
            for c in range(columns):
                out[four * g, c], out[four * g + 1, c], out[four * g + 2, c], out[four * g + 3, c] = _mvue_group(
                    dy[four * g, c], dy[four * g + 1, c], dy[four * g + 2, c], dy[four * g + 3, c],
                    drawn[g - g0, 0, c], drawn[g - g0, 1, c], eps)

    @njit(cache=True, nogil=True, error_model="numpy")
    def _mvue_tiles_serial(dy, u, eps, out, tasks):
        """`_mvue_tiles` in a process forked from a started pool (`threads`), where no parallel kernel may
        launch: the same tiles on this thread, cached on disk (a twin compiled in the child took 1.2 s). Its
        loop stays scalar (see `threads`), about 10x slower: a small job elsewhere runs `_mvue_tiles` on one
        thread instead. (``tasks``: `_mvue_tiles`' arguments, not used.)"""
        drawn = np.empty((_MVUE_TILE_GROUPS, 2, dy.shape[1] + _PAD), np.float32)
        for tile in range(_mvue_tile_count(dy)):
            _mvue_tile(dy, u, eps, out, drawn, tile)

    @njit(parallel=True, cache=True, nogil=True, error_model="numpy")   # IEEE division: x / 0 is Inf or NaN
    def _mvue_tiles(dy, u, eps, out, tasks):
        """`mvue.mvue24`'s sample of dYᵀ, read and written as dY lies: ``dy`` (tokens, channels) is a Linear's
        float32 ``dY``, whose transpose is sampled (groups of 4 tokens per channel, `_mvue_group` each) from
        its uniforms ``u`` (channels, tokens / 4, 2), into ``out`` laid out as ``dy``. The tiles (see
        `_mvue_tile`) are split evenly over ``tasks`` parallel tasks."""
        tiles = _mvue_tile_count(dy)
        for task in prange(tasks):
            # rows padded: at 1024 columns every row of drawn would begin at one offset modulo 4 KiB (cache sets)
            drawn = np.empty((_MVUE_TILE_GROUPS, 2, dy.shape[1] + _PAD), np.float32)
            for tile in range(task * tiles // tasks, (task + 1) * tiles // tasks):
                _mvue_tile(dy, u, eps, out, drawn, tile)


if njit is not None:

    @njit(cache=True, nogil=True, error_model="numpy")
    def _mvue_run(x, u, eps, out, b, r, loaded, sampled):
        """`_mvue_rows` on one run of groups, ``x[b, r, :]``, a chunk of `_MVUE_CHUNK` groups at a time: the
        chunk's four entries of every group and its two uniforms are first laid out in ``loaded`` (6, chunk),
        one row each, so that the groups' loop (`_mvue_group`) reads and writes contiguously and vectorises
        (reading a group's four entries in place, a stride of 4, it did not: 3.4 ns an entry, not 2.3).
        ``b`` and ``r`` are unsigned, as every index here (see `_mvue_tile`): with chunks of 64 groups, not 16,
        that made it 10-18% faster on ResNet-20's and LeNet-5's dY."""
        groups = np.uint64(x.shape[2] // 4)
        first = b * groups                              # the run's first group in u's (row, group) numbering
        four = np.uint64(4)
        for g0 in range(np.uint64(0), groups, np.uint64(_MVUE_CHUNK)):
            size = min(np.uint64(_MVUE_CHUNK), groups - g0)
            for g in range(size):
                for i in range(4):
                    loaded[i, g] = x[b, r, four * (g0 + g) + i]
                loaded[4, g] = u[r, first + g0 + g, 0]
                loaded[5, g] = u[r, first + g0 + g, 1]
            for g in range(size):
                sampled[0, g], sampled[1, g], sampled[2, g], sampled[3, g] = _mvue_group(
                    loaded[0, g], loaded[1, g], loaded[2, g], loaded[3, g], loaded[4, g], loaded[5, g], eps)
            for g in range(size):
                for i in range(4):
                    out[b, r, four * (g0 + g) + i] = sampled[i, g]

    @njit(cache=True, nogil=True, error_model="numpy")
    def _mvue_rows_serial(x, u, eps, out, tasks):
        """`_mvue_rows` on this thread alone, in a process forked from a started pool (``tasks``: not used)."""
        loaded = np.empty((6, _MVUE_CHUNK), np.float32)
        sampled = np.empty((4, _MVUE_CHUNK), np.float32)
        for run in range(x.shape[0] * x.shape[1]):
            _mvue_run(x, u, eps, out, np.uint64(run // x.shape[1]), np.uint64(run % x.shape[1]), loaded, sampled)

    @njit(parallel=True, cache=True, nogil=True, error_model="numpy")
    def _mvue_rows(x, u, eps, out, tasks):
        """The sample of ``x`` (B, R, L), groups of 4 along L, into ``out`` (B, R, L): ``x`` is a conv's dY
        (B, C, H·W), sampled as dYᵀ (C, B·H·W) is, so row r's groups run over b, then along L (u: (R, B·L/4,
        2)); or a row-major matrix (B = 1). The runs ``x[b, r, :]`` are split evenly over ``tasks`` tasks."""
        batches, rows = x.shape[0], x.shape[1]
        runs = rows * batches
        for task in prange(tasks):
            loaded = np.empty((6, _MVUE_CHUNK), np.float32)
            sampled = np.empty((4, _MVUE_CHUNK), np.float32)
            for run in range(task * runs // tasks, (task + 1) * runs // tasks):
                _mvue_run(x, u, eps, out, np.uint64(run // rows), np.uint64(run % rows), loaded, sampled)


@functools.lru_cache(maxsize=None)
def _table4(dim: int = -1) -> np.ndarray:
    """(3, 3**6) uint8: for N = 1, 2, 3, the 4 bits topk(N) keeps for every weak order of 4 values, found by
    running torch.topk itself on one representative of each (ranks 0..3 in every assignment), along the last
    dimension (``dim=-1``: each group contiguous) or along dimension 1 of a (groups, 4, 1) tensor (``dim=1``:
    the groups strided, as a column-wise top-k runs): the kernel then keeps, on every group and tied ones
    included, what topk keeps in this build of torch."""
    reps = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=torch.float32)     # (256, 4)
    table = np.zeros((3, 3 ** 6), dtype=np.uint8)
    codes = [_order4(*row) for row in reps.tolist()]
    for n in (1, 2, 3):
        if dim == -1:
            kept = torch.zeros_like(reps, dtype=torch.bool).scatter_(-1, reps.topk(n, dim=-1).indices, True)
        else:
            strided = reps.unsqueeze(-1)
            kept = torch.zeros_like(strided, dtype=torch.bool).scatter_(1, strided.topk(n, dim=1).indices, True)
            kept = kept.squeeze(-1)
        for code, row in zip(codes, kept.tolist()):
            table[n - 1, code] = sum(1 << i for i, k in enumerate(row) if k)
    return table


def _rows4_served(matrix: torch.Tensor, n: int) -> bool:
    """The row-wise N:4 kernels serve ``matrix`` (groups of 4 consecutive entries along its rows) at this N."""
    return _served(matrix) and matrix.shape[-1] % 4 == 0 and 1 <= n <= 3


def _spread4(weight: torch.Tensor, n: int, layout: str) -> int:
    """How far apart, in memory, the 4 entries of a row-wise N:4 group of ``weight`` lie where the kernels serve
    it at this N: 1 for a matrix (a Linear's weight, a GEMM view) and a ``flatten`` conv, kh*kw for an ``nhwc``
    conv (its groups run along C_in); 0 where they do not serve (then the caller's topk runs)."""
    return _group_spread(weight, 4, layout) if _served(weight) and 1 <= n <= 3 else 0


def _nm4(weight: torch.Tensor, n: int, layout: str, product: bool,
         value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The keep-mask of ``weight`` in its own shape, read where it lies, and, with ``product``, ``weight * keep``
    (else None), or with a ``value`` (a 0-dim CPU tensor) ``where(keep, weight, weight * value)``; None where the
    kernels do not serve (`_spread4`) or a weight is NaN."""
    spread = _spread4(weight, n, layout)
    if not spread:
        return None
    flat, keep = _flat(weight), torch.empty_like(weight, dtype=torch.bool)  # contiguous, as the weight (`_served`)
    out = torch.empty_like(weight) if product else None
    target = flat[:0] if out is None else _flat(out)
    # the value in the weight's type, as `decayed` gives it to its kernel; none: the plain product
    factor = flat[:0] if value is None else np.array([value.item()], dtype=flat.dtype)
    if spread == 1:
        served = _mask4(flat, n, _table4(), _bytes(keep), target, factor)
    else:
        served = _mask4_spread(flat, n, _table4(), _bytes(keep), target, spread, factor)
    return (keep, out) if served else None


def nm4_mask(weight: torch.Tensor, n: int, layout: str = "nhwc") -> torch.Tensor | None:
    """The row-wise N:4 keep-mask of ``weight`` in its own shape (groups of 4 consecutive entries along K of its
    GEMM view: a matrix's rows; a conv's by ``layout``, an ``nhwc`` conv's along C_in, read where they lie),
    as ``topk(n)`` over each group keeps it, ties included; None where the kernel does not serve (then the
    caller's topk runs): not a CPU float32/float64 contiguous tensor, more than `MAX_ENTRIES` entries, a NaN."""
    made = _nm4(weight, n, layout, product=False)
    return None if made is None else made[0]


def nm4_masked(weight: torch.Tensor, n: int, layout: str = "nhwc") -> tuple[torch.Tensor, torch.Tensor] | None:
    """`nm4_mask`'s keep-mask of ``weight`` and the masked ``weight * keep`` (`masked`'s product, bit for
    bit), made in one pass over the weight: what SR-STE and its kin compute at every training forward.
    None where `nm4_mask` does not serve."""
    return _nm4(weight, n, layout, product=True)


def nm4_decayed(weight: torch.Tensor, n: int, value: torch.Tensor,
                layout: str = "nhwc") -> tuple[torch.Tensor, torch.Tensor] | None:
    """`nm4_mask`'s keep-mask of ``weight`` and PGF's ``where(keep, weight, weight * value)`` (`decayed`'s, bit for
    bit; ``value`` a 0-dim CPU tensor, the pruned weights' mask value), made in one pass over the weight. None
    where `nm4_mask` does not serve, or ``value`` is not a 0-dim CPU tensor."""
    if value.dim() != 0 or value.device.type != "cpu":
        return None
    return _nm4(weight, n, layout, product=True, value=value)


def column_nm4_mask(scores: torch.Tensor, fmask: torch.Tensor, perm: torch.Tensor, n: int) -> torch.Tensor | None:
    """Bi-Mask's backward mask at M = 4 in one pass: per group of 4 rows of a (rows x cols) ``scores`` matrix
    (magnitudes, or the signed weights: the kernel takes |·|, which is exact and leaves magnitudes as they are)
    taken in the order ``perm`` and per column, the entries ``topk(n, dim=1)`` keeps among ``|scores| * fmask``,
    ties included, and of those only what ``fmask`` keeps, written back at the rows' own places. That is
    ``methods.bimask.backward_mask``'s tensor formula (a product, two gathers, topk along a strided dimension,
    a zero-filled mask, a scatter, an and, a scatter back), bit for bit. None where the kernel does not serve:
    not a CPU float32/float64 contiguous matrix of at most `MAX_ENTRIES` entries with a bool ``fmask`` of its
    shape and a CPU int64 ``perm`` of its rows, rows not in groups of 4, n outside 1..3, or a NaN value."""
    if not _column_served(scores, fmask, perm, n):
        return None
    keep = torch.empty_like(scores, dtype=torch.bool)
    values = scores.numpy()
    if not _column4(values, _bytes2(fmask), _perm(perm), n, _table4(1), _bytes2(keep), values[:0]):
        return None
    return keep


def column_nm4_masked(weight: torch.Tensor, fmask: torch.Tensor, perm: torch.Tensor,
                      n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`column_nm4_mask`'s mask of the signed ``weight`` matrix and the masked ``weight * keep`` (`masked`'s
    product, bit for bit), in one pass: Bi-Mask's backward mask and the weight its backward-data GEMM uses.
    None where `column_nm4_mask` does not serve."""
    if not _column_served(weight, fmask, perm, n):
        return None
    keep, out = torch.empty_like(weight, dtype=torch.bool), torch.empty_like(weight)
    if not _column4(weight.numpy(), _bytes2(fmask), _perm(perm), n, _table4(1), _bytes2(keep), out.numpy()):
        return None
    return keep, out


def bimask_operands4(matrix: torch.Tensor, perm: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Bi-Mask's four operands of a GEMM-view ``matrix`` (C_out x K) at M = 4 in one call: `nm4_masked`'s
    row-wise mask ``fmask`` and ``matrix * fmask``, then `column_nm4_masked`'s backward mask of ``matrix``,
    ``fmask`` and ``perm`` and ``matrix * bmask``, bit for bit what the two calls give, as (fmask, matrix *
    fmask, bmask, matrix * bmask). Why one call: each call's checks, views and allocations ran about 20 µs
    inside a training step, a quarter of the two calls' time on the GPT's layers. None where either would not
    serve (the caller then makes them one at a time)."""
    if not (_rows4_served(matrix, n) and matrix.dim() == 2 and matrix.shape[0] % 4 == 0
            and _perm_served(perm, matrix.shape[0])):
        return None
    fmask, bmask = torch.empty_like(matrix, dtype=torch.bool), torch.empty_like(matrix, dtype=torch.bool)
    w_f, w_b = torch.empty_like(matrix), torch.empty_like(matrix)
    values, fm = matrix.numpy(), _bytes2(fmask)
    if not _bimask4(values.reshape(-1), values, _perm(perm), n, _table4(), _table4(1), fm.reshape(-1),
                    w_f.numpy().reshape(-1), fm, _bytes2(bmask), w_b.numpy()):
        return None
    return fmask, w_f, bmask, w_b


if njit is not None:

    @njit(cache=True, nogil=True)
    def _bimask4(flat, values, perm, n, row_table, column_table, fmask_flat, w_f_flat, fmask, bmask, w_b):
        """`_mask4` on the flat weight, then `_column4` on its matrix view with the mask just made: the kernels
        of `nm4_masked` and `column_nm4_masked`, called from here. False where either finds a NaN."""
        if not _mask4(flat, n, row_table, fmask_flat, w_f_flat, w_f_flat[:0]):
            return False
        return _column4(values, fmask, perm, n, column_table, bmask, w_b)


def _column_served(scores: torch.Tensor, fmask: torch.Tensor, perm: torch.Tensor, n: int) -> bool:
    return (_served(scores, fmask) and scores.dim() == 2 and fmask.dtype == torch.bool and scores.shape[0] % 4 == 0
            and 1 <= n <= 3 and _perm_served(perm, scores.shape[0]))


def _perm_served(perm: torch.Tensor, rows: int) -> bool:
    return perm.is_cpu and perm.dtype == torch.int64 and perm.shape == (rows,)


def _perm(perm: torch.Tensor) -> np.ndarray:
    """A row permutation as a contiguous numpy array (a copy only where ``perm`` is strided)."""
    return np.ascontiguousarray(perm.numpy())


def _bytes2(keep: torch.Tensor) -> np.ndarray:
    """A contiguous bool mask matrix's bytes as a numpy uint8 matrix, made in numpy (see `_bytes`, `_flat`:
    each torch call costs microseconds between a step's GEMMs)."""
    return keep.numpy().view(np.uint8)


def soft_threshold4(matrix: torch.Tensor, n: int, scale: torch.Tensor) -> torch.Tensor | None:
    """S-STE's forward weight at M = 4, ``scale * S(W)`` of a GEMM-view ``matrix`` (groups of 4 consecutive
    entries along K), in one pass: `methods.sste.soft_threshold`'s tensor formula (|W|, topk's values, a
    compare, sign, a difference, a product, a where) and the product by ``scale`` (a 0-dim tensor of the
    matrix's type), bit for bit. None where the kernel does not serve (as `nm4_mask`, or a NaN weight)."""
    if not (_rows4_served(matrix, n) and scale.dim() == 0
            and scale.dtype == matrix.dtype):
        return None
    flat = _flat(matrix)
    out = torch.empty_like(matrix)
    if not _soft4(flat, n, np.array([scale.item(), 0.0], dtype=flat.dtype), _flat(out)):
        return None
    return out


def _launch_mvue(kernel, serial, x: torch.Tensor, u: torch.Tensor, eps: float, out: torch.Tensor,
                 most: int) -> None:
    """An MVUE kernel on ``x`` into ``out``: on torch's threads, at most ``most`` tasks; a job too small for the
    other threads' wake-ups (`_PARALLEL_ENTRIES`) on one, through the same parallel kernel (its serial twin's
    loop may not vectorise: threads.py); in a process forked from a started pool, ``serial``."""
    args = (x.numpy(), u.numpy(), np.float32(eps), out.numpy())
    if forked_from_pool():
        serial(*args, 1)
        return
    with numba_threads(parallel=x.numel() >= _PARALLEL_ENTRIES) as workers:
        kernel(*args, min(workers, most))


def mvue24_sample(x: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`mvue.mvue24`'s 2:4 sample of a 2-D float32 CPU ``x`` along its rows, from the uniforms ``u`` it drew
    (rows, groups, 2), in one pass on torch's threads: the formula's 25 tensor operations, bit for bit, into a
    new tensor laid out as ``x`` (without its padding, if any). ``x`` laid out by columns (a Linear's ``dYᵀ``,
    a transposed view of dY) takes `_mvue_tiles`, which reads dY and writes the sample as dY lies, and the
    sample is returned as its transposed view: the weight gradient's GEMM then takes it as it takes dY in a
    dense Linear's backward (the same numbers as from a contiguous copy: 520 GEMM shapes checked bit for
    bit). Any other ``x`` takes `mvue24_runs`'s and comes back contiguous. None where the kernels do not
    serve: not float32, a row not in groups of 4. Unlike the serial kernels here it takes any size: it
    splits a layer's groups over the threads, as the tensor operations would."""
    if not (x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] % 4 == 0
            and njit is not None and not x.requires_grad
            and u.dtype == x.dtype and u.shape == (x.shape[0], x.shape[1] // 4, 2) and u.is_contiguous()):
        return None
    if x.stride(0) != 1 or x.shape[0] == 1:
        sampled = mvue24_runs(x.contiguous().unsqueeze(0), u, eps)
        return None if sampled is None else sampled.squeeze(0)
    dy = x.t().contiguous()         # a Linear's dY (tokens, C_out) as it lies (a copy only if its rows are padded)
    out = torch.empty(dy.shape, dtype=x.dtype)
    _launch_mvue(_mvue_tiles, _mvue_tiles_serial, dy, u, eps, out, _mvue_tile_count(dy.numpy()))
    return out.t()


def mvue24_runs(x: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The MVUE 2:4 sample of a contiguous float32 CPU ``x`` (B, R, L) as `mvue.mvue24` samples the matrix
    (R, B·L) made of its rows ``x[:, r, :]`` end to end (a conv's dYᵀ: B = batch, L = H·W; a row-major
    matrix: B = 1), from the uniforms ``u`` (R, B·L/4, 2) drawn for that matrix, returned in ``x``'s own
    layout: no transposed copy of dY in, none out. None where it does not serve: L not a multiple of 4 (a
    group would span two runs), not float32, not contiguous; and runs of fewer than `_MVUE_BLOCK` groups
    when B > 1, which the caller's copy to (R, B·L) serves faster (a 128x512x4x4 dY: 2.6 ms in place, 1.6 ms
    through the copies; at 8x8, 2.8 against 3.2 ms, and 0.27 against 0.38 ms at 128x16x8x8)."""
    if not (x.dim() == 3 and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.shape[2] % 4 == 0 and (x.shape[0] == 1 or x.shape[2] >= 4 * _MVUE_BLOCK)
            and njit is not None and not x.requires_grad and u.dtype == x.dtype
            and u.shape == (x.shape[1], x.shape[0] * x.shape[2] // 4, 2) and u.is_contiguous()):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    _launch_mvue(_mvue_rows, _mvue_rows_serial, x, u, eps, out, x.shape[0] * x.shape[1])
    return out
