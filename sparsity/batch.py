"""Every layer's per-step N:4 make in one compiled call per thread, into buffers kept from call to call.

SR-STE and its kin make each layer's mask and masked weight at every training step (`fused.nm4_masked`; PGF its
decayed weight, `fused.nm4_decayed`), S-STE its soft-thresholded weight (`fused.soft_threshold4`), Bi-Mask its
four operands (`fused.bimask_operands4`), masked decay its held mask's product (`fused.masked`); transposable
bounds every layer's pruned weights after each optimizer step and makes the next forward's product in that pass
(`fused.clamp_pruned_masked_`). Made layer by layer,
each is a Python call with its checks, two or four fresh tensors, their numpy views and a numba dispatch: about
12 µs a layer warm, and several times that inside a training step, whose GEMMs have evicted that code from the
caches (the GPT's sixteen Bi-Mask makes took about 1.1 ms of its step, their kernels 0.3 ms warm on two
threads).

`LayerMakes` does that per-layer work once, when the set of weights changes (a weight's storage, shape or
type, N, the layout, Bi-Mask's permutations): the numpy views of the weights and of outputs it keeps, in
tuples of `WIDTH` layers (one compiled specialisation serves any model; a last, shorter chunk is padded with
empty arrays), split between two threads by size as `threads.split_map` splits layers. A step is then one
compiled call per chunk, the same kernels, and each layer's results are bit for bit what its own call gives.

The outputs are the same tensors at every call, refilled. What a training forward took from them its backward
reads before the next make: the next make comes at the next step (transposable's at the end of this step's
optimizer step, after the backward), once the optimizer has changed the weights, and autograd refuses a
backward through a weight changed since its forward (the callers hand these results only to forwards whose
saved tensors are views of the weight). A second make from the same weights (a second micro-batch's forward)
writes the same bits. A layer whose make the kernel cannot serve (a NaN weight) is None in the results, and its
caller makes it as before.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from . import fused
from .nm import _AS_IT_LIES
from .threads import halves, split_map

WIDTH = 8       # layers per compiled call: tuples of one length, so one compiled specialisation per kernel

if fused.njit is not None:
    from numba import njit

    @njit(cache=True, nogil=True)
    def _masked_chunk(flats, keeps, outs, spreads, n, table, value, served):
        """`fused._nm4`'s kernel on each weight of a chunk: its keep bytes and ``weight * keep`` (``value``: PGF's
        decayed product instead, as there); ``served[i]`` false where weight i holds a NaN."""
        for i in range(len(flats)):
            if spreads[i] == 1:
                served[i] = fused._mask4(flats[i], n, table, keeps[i], outs[i], value)
            else:
                served[i] = fused._mask4_spread(flats[i], n, table, keeps[i], outs[i], spreads[i], value)

    @njit(cache=True, nogil=True)
    def _product_chunk(flats, keeps, outs, served):
        """`fused._product` of each (weight, keep) of a chunk into ``outs[i]``: a held mask's product."""
        for i in range(len(flats)):
            fused._product(outs[i], flats[i], keeps[i])
            served[i] = True

    @njit(cache=True, nogil=True)
    def _bound_chunk(flats, keeps, outs, served):
        """`fused._bound4` on each (weight, keep) of a chunk, in place, with ``weight * keep`` of the bounded weight
        into ``outs[i]``; ``served[i]`` false where a group of weight i holds a NaN or has a cap of 0."""
        for i in range(len(flats)):
            served[i] = not fused._bound4(flats[i], keeps[i], outs[i])

    @njit(cache=True, nogil=True)
    def _soft_chunk(flats, outs, n, scales, served):
        """`fused.soft_threshold4`'s kernel on each weight of a chunk, ``scales[i]`` its (beta, 0.0)."""
        for i in range(len(flats)):
            served[i] = fused._soft4(flats[i], n, scales[i], outs[i])

    @njit(cache=True, nogil=True)
    def _bimask_chunk(flats, matrices, perms, n, row_table, column_table, fmask_flats, w_f_flats, fmasks, bmasks,
                      w_bs, served):
        """`fused.bimask_operands4`'s kernel on each weight matrix of a chunk; ``served[i]`` as above."""
        for i in range(len(flats)):
            served[i] = fused._bimask4(flats[i], matrices[i], perms[i], n, row_table, column_table, fmask_flats[i],
                                       w_f_flats[i], fmasks[i], bmasks[i], w_bs[i])


def _identity(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a plan depends on besides the values, which its views read afresh at every call: each tensor's
    storage, type, device, shape and contiguity."""
    return tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.is_contiguous()) for t in tensors)


def _weights_served(weights: Sequence[torch.Tensor]) -> bool:
    """Every weight one the kernels take (`fused._served`'s rule), all of one type: the chunks' tuples hold one
    array type each."""
    dtype = weights[0].dtype
    return fused.njit is not None and all(
        w.is_cpu and w.is_contiguous() and w.dtype == dtype and dtype in (torch.float32, torch.float64)
        and 0 < w.numel() <= fused.MAX_ENTRIES for w in weights)


def _sides(sizes: Sequence[int]) -> list[list[int]]:
    """The layers' indices in two lists of about half the work each (`threads.halves`, as `split_map` shares
    items); one list for a single layer."""
    return [list(range(len(sizes)))] if len(sizes) < 2 else list(halves(sizes))


def _chunks(indices: list[int], arrays: Sequence[Sequence[np.ndarray]],
            empties: Sequence[np.ndarray]) -> list[tuple[list[int], tuple]]:
    """``indices`` in runs of `WIDTH`, each with one tuple per kind of array (``arrays[kind][layer]``), padded to
    `WIDTH` with that kind's empty array."""
    out = []
    for start in range(0, len(indices), WIDTH):
        part = indices[start:start + WIDTH]
        pad = WIDTH - len(part)
        out.append((part, tuple(tuple(kind[i] for i in part) + (empty,) * pad
                                for kind, empty in zip(arrays, empties))))
    return out


class _Plan:
    """The chunks of one set of weights, the outputs they fill and the call that fills them: ``kernel(*the chunk's
    first `inputs` tuples, *shared, *its other tuples, served)``."""

    def __init__(self, kernel: Callable, sides: list[list[tuple[list[int], tuple]]], inputs: int, shared: tuple,
                 results: list[tuple], sizes: Sequence[int], fills: list[tuple[np.ndarray, int, int]] = ()):
        self.kernel, self.split, self.shared, self.results = kernel, inputs, shared, results
        self.fills = fills      # (array, row, layer): where a call writes a layer's own number (S-STE's beta)
        self.sides = sides
        self.side_sizes = [sum(sizes[i] for part, _ in side for i in part) for side in sides]

    def _run_side(self, side: list[tuple[list[int], tuple]], shared: tuple) -> list[tuple[list[int], np.ndarray]]:
        done = []
        for part, arrays in side:
            served = np.zeros(WIDTH, dtype=np.bool_)
            self.kernel(*arrays[:self.split], *shared, *arrays[self.split:], served)
            done.append((part, served))
        return done

    def run(self, shared: tuple | None = None) -> list[tuple | None]:
        """Every chunk's call (``shared``: this call's own in place of the plan's), the results per layer."""
        out: list[tuple | None] = list(self.results)
        shared = self.shared if shared is None else shared
        for side in split_map(lambda side: self._run_side(side, shared), self.sides, self.side_sizes):
            for part, served in side:
                for slot, i in enumerate(part):
                    if not served[slot]:
                        out[i] = None
        return out


class LayerMakes:
    """One method's per-step makes of all its layers (module docstring): `masked` for SR-STE's kin and PGF, `soft`
    for S-STE, `bimask` for Bi-Mask, `product` for a held mask's product, `bound` for transposable's bound after
    the optimizer step. Each returns the layers' results in the order given, or None where a weight is not one
    the kernels take (the caller then makes every layer one by one, as before). One plan per kind: transposable
    holds its bound's and its forward's."""

    def __init__(self):
        self._plans: dict[str, tuple[tuple, _Plan | None]] = {}    # per kind of make: (its key, its plan)

    def _planned(self, key: tuple, build: Callable[[], _Plan | None]) -> _Plan | None:
        kept = self._plans.get(key[0])
        if kept is None or kept[0] != key:
            kept = self._plans[key[0]] = (key, build())
        return kept[1]

    def masked(self, weights: Sequence[torch.Tensor], n: int, layout: str,
               value: torch.Tensor | None = None) -> list[tuple | None] | None:
        """`fused.nm4_masked` of each weight: (keep, ``weight * keep``) in the weight's shape, None for a weight
        with a NaN; with a ``value`` (a 0-dim CPU tensor) `fused.nm4_decayed`'s (keep, ``where(keep, weight,
        weight * value)``), PGF's."""
        if value is not None and not (value.dim() == 0 and value.is_cpu):
            return None
        key = ("masked", n, layout, _identity(weights))
        plan = self._planned(key, lambda: _masked_plan([w.detach() for w in weights], n, layout))
        if plan is None:
            return None
        if value is None:                   # the plain product: the plan's own (n, table, empty value)
            return plan.run()
        # the value in the weights' type, as `fused.nm4_decayed` hands it to the kernel
        n_, table, empty = plan.shared
        return plan.run((n_, table, np.array([value.item()], empty.dtype)))

    def soft(self, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor], n: int) -> list | None:
        """`fused.soft_threshold4` of each weight's matrix view (its own rows: a Linear's weight, a ``flatten``
        conv's), ``scales[i] * S(W_i)`` in the weight's shape (S-STE's; each scale a 0-dim tensor of its weight's
        type), None for a weight with a NaN."""
        if not all(b.dim() == 0 and b.dtype == w.dtype for b, w in zip(scales, weights)):
            return None
        plan = self._planned(("soft", n, _identity(weights)), lambda: _soft_plan([w.detach() for w in weights], n))
        if plan is None:
            return None
        for array, slot, i in plan.fills:       # this call's scales, read now (`soft_threshold4` reads them so)
            array[slot, 0] = scales[i].item()
        return [None if made is None else made[0] for made in plan.run()]

    def product(self, weights: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor]) -> list | None:
        """`fused.masked` of each weight and its held bool mask: ``weight * keep`` in the weight's shape (the
        forward weight of transposable and masked decay, whose masks stay between recomputes)."""
        plan = self._planned(("product", _identity(weights), _identity(keeps)),
                             lambda: _held_plan(_product_chunk, [w.detach() for w in weights], list(keeps)))
        return None if plan is None else [m[0] for m in plan.run()]

    def bound(self, weights: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor], m: int,
              layout: str) -> list | None:
        """`fused.clamp_pruned_masked_` of each weight where its groups are 4 consecutive entries (M = 4, a Linear,
        a ``flatten`` conv):
        the weight bounded in place (transposable's `bound_pruned`) and ``weight * keep`` of it, the product
        for the next forward; None for a weight the kernel left to the formula (a NaN, a group's cap of 0: its
        other groups are bounded already, and the formula's bound leaves them as they are)."""
        plan = self._planned(("bound", m, layout, _identity(weights), _identity(keeps)),
                             lambda: _bound_plan([w.detach() for w in weights], list(keeps), m, layout))
        if plan is None:
            return None
        made = plan.run()
        torch.autograd.graph.increment_version(list(weights))      # written through numpy, as the kernel's caller
        return [None if m is None else m[0] for m in made]

    def bimask(self, weights: Sequence[torch.Tensor], perms: Sequence[torch.Tensor],
               n: int) -> list[tuple | None] | None:
        """`fused.bimask_operands4` of each weight's matrix view (C_out x K, its own rows: a Linear's weight, a
        ``flatten`` conv's) under its permutation: (B_f, B_b, ``W * B_f``, ``W * B_b``) in the weight's shape, as
        `methods.bimask.BiMask` orders them; None for a weight with a NaN."""
        key = ("bimask", n, _identity(weights), _identity(perms))
        plan = self._planned(key, lambda: _bimask_plan([w.detach() for w in weights], list(perms), n))
        return None if plan is None else plan.run()


def _masked_plan(weights: list[torch.Tensor], n: int, layout: str) -> _Plan | None:
    spreads = [fused._spread4(w, n, layout) for w in weights]
    # a large nhwc conv is masked on its GEMM view's copy, which is faster there (`nm._nm4_where_it_lies`)
    if not (_weights_served(weights) and all(spreads)) or any(
            s > 1 and w.numel() > _AS_IT_LIES for w, s in zip(weights, spreads)):
        return None
    np_type = weights[0].numpy().dtype
    keeps = [torch.empty_like(w, dtype=torch.bool) for w in weights]
    outs = [torch.empty_like(w) for w in weights]
    arrays = ([fused._flat(w) for w in weights], [fused._bytes(k) for k in keeps], [fused._flat(o) for o in outs],
              spreads)
    empties = (np.empty(0, np_type), np.empty(0, np.uint8), np.empty(0, np_type), 1)
    sizes = [w.numel() for w in weights]
    sides = [_chunks(side, arrays, empties) for side in _sides(sizes)]
    return _Plan(_masked_chunk, sides, 4, (n, fused._table4(), np.empty(0, np_type)), list(zip(keeps, outs)), sizes)


def _soft_plan(weights: list[torch.Tensor], n: int) -> _Plan | None:
    if not (_weights_served(weights) and 1 <= n <= 3 and all(w[0].numel() % 4 == 0 for w in weights)):
        return None
    np_type = weights[0].numpy().dtype
    outs = [torch.empty_like(w) for w in weights]
    arrays = ([fused._flat(w) for w in weights], [fused._flat(o) for o in outs])
    sizes = [w.numel() for w in weights]
    sides = [_chunks(side, arrays, (np.empty(0, np_type), np.empty(0, np_type))) for side in _sides(sizes)]
    # each chunk's scales: a (WIDTH, 2) array of (beta, +0.0) rows, the betas filled at every call
    fills = []
    for side in sides:
        for c, (part, args) in enumerate(side):
            scales = np.zeros((WIDTH, 2), np_type)
            fills += [(scales, slot, i) for slot, i in enumerate(part)]
            side[c] = (part, args + (scales,))
    return _Plan(_soft_chunk, sides, 2, (n,), [(o,) for o in outs], sizes, fills)


def _held_plan(kernel: Callable, weights: list[torch.Tensor], keeps: list[torch.Tensor]) -> _Plan | None:
    """A plan of ``kernel(weights, keeps, products, served)``: a product per layer of its weight and its held bool
    mask (`_product_chunk`; `_bound_chunk` bounds the weight in place first)."""
    if not (_weights_served(weights) and all(k.dtype == torch.bool and k.shape == w.shape and k.is_contiguous()
                                             and k.is_cpu for w, k in zip(weights, keeps))):
        return None
    np_type = weights[0].numpy().dtype
    outs = [torch.empty_like(w) for w in weights]
    arrays = ([fused._flat(w) for w in weights], [fused._bytes(k) for k in keeps], [fused._flat(o) for o in outs])
    sizes = [w.numel() for w in weights]
    sides = [_chunks(side, arrays, (np.empty(0, np_type), np.empty(0, np.uint8), np.empty(0, np_type)))
             for side in _sides(sizes)]
    return _Plan(kernel, sides, 3, (), [(o,) for o in outs], sizes)


def _bound_plan(weights: list[torch.Tensor], keeps: list[torch.Tensor], m: int, layout: str) -> _Plan | None:
    if not (m == 4 and all(fused._group_spread(w, 4, layout) == 1 for w in weights)):
        return None
    return _held_plan(_bound_chunk, weights, keeps)


def _bimask_plan(weights: list[torch.Tensor], perms: list[torch.Tensor], n: int) -> _Plan | None:
    if not (_weights_served(weights) and 1 <= n <= 3):
        return None
    matrices = [w.view(w.shape[0], -1) for w in weights]
    if not all(m.shape[0] % 4 == 0 and m.shape[1] % 4 == 0 and fused._perm_served(p, m.shape[0])
               for m, p in zip(matrices, perms)):
        return None
    np_type = weights[0].numpy().dtype
    made = [(torch.empty_like(w, dtype=torch.bool), torch.empty_like(w, dtype=torch.bool), torch.empty_like(w),
             torch.empty_like(w)) for w in weights]       # (B_f, B_b, W * B_f, W * B_b)
    values = [m.numpy() for m in matrices]
    rows = [m.shape for m in matrices]
    arrays = ([v.reshape(-1) for v in values], values, [fused._perm(p) for p in perms],
              [fused._bytes(f) for f, _, _, _ in made], [fused._flat(w_f) for _, _, w_f, _ in made],
              [fused._bytes(f).reshape(r) for (f, _, _, _), r in zip(made, rows)],
              [fused._bytes(b).reshape(r) for (_, b, _, _), r in zip(made, rows)],
              [w_b.numpy().reshape(r) for (_, _, _, w_b), r in zip(made, rows)])
    empties = (np.empty(0, np_type), np.empty((0, 4), np_type), np.empty(0, np.int64), np.empty(0, np.uint8),
               np.empty(0, np_type), np.empty((0, 4), np.uint8), np.empty((0, 4), np.uint8),
               np.empty((0, 4), np_type))
    sizes = [w.numel() for w in weights]
    sides = [_chunks(side, arrays, empties) for side in _sides(sizes)]
    return _Plan(_bimask_chunk, sides, 3, (n, fused._table4(), fused._table4(1)), made, sizes)
