"""Denormal numbers taken as zero on every thread that computes: ``train.flush_denormals: true`` and
`nmtrain.flush_denormals` (opt-in: the numbers may change).

Why: an Intel CPU runs arithmetic that meets a denormal (a float32 below 1.2e-38) through a microcode assist,
tens of times slower than a normal operation. Training can fill whole tensors with them: under STEP on
Shakespeare's text the attention saturates after STEP's switch, and the gradients at each block's q/k/v
outputs held 5,000-21,000 denormals a step, and the GEMMs that read them made STEP's backward 31 ms against
dense's 15 (a scratch loop over 4 batches). Through `nmtrain train`, STEP's 400-step run took 16.1-18.3 s
(seeds 0-2), and 15.0-15.4 s with the CPU's two flush modes set: FTZ (a result that would be denormal is 0)
and DAZ (a denormal operand reads as 0). Each denormal becomes a zero, a change below 1.2e-38 where it meets a
sum, so a run with the modes need not be bit for bit one without them (those runs were): hence opt-in.

Why not ``torch.set_flush_denormal(True)`` alone: it writes the calling thread's MXCSR register, and every
thread has its own. torch's OpenMP threads copy the register of the thread that starts them, when they start,
and keep it: called after the first parallel operation of a process, it left the other threads computing
with denormals (STEP's backward 32-34 ms, no better). Here the modes are written on every thread:
  - this one;
  - every thread of its OpenMP team, by a numba parallel kernel (numba's OpenMP layer runs on the same
    libgomp team as torch's operations, `sparsity.threads`), one LLVM intrinsic (``ldmxcsr``) per thread;
  - `threads.split_map`'s second thread, where the masks of SR-STE and its kin are made.
Then each is checked: the register read back on every thread of the team, and a torch product over
denormals, split by torch across all its threads, must come out all zeros. Where either check fails the
call raises rather than run with the modes on some threads and not others.

x86-64 only (MXCSR); elsewhere `supported` is False and a spec that asks is refused at load.
"""

from __future__ import annotations

import contextlib
import platform
from typing import Iterator

import numpy as np
import torch

from ..sparsity import threads
from .errors import ExperimentError

FTZ = 1 << 15       # MXCSR's flush-to-zero bit
DAZ = 1 << 6        # and denormals-are-zero
MODES = FTZ | DAZ
_ALL = 0xFFFFFFFF
_ITERATIONS = 64    # of the team kernel per thread: every thread of the team gets some (checked)

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.core.extending import intrinsic
except ImportError:     # pragma: no cover - numba is a dependency
    numba = None

if numba is not None:

    @intrinsic
    def _mxcsr(typingctx, keep, add):
        """This thread's MXCSR made ``(old & keep) | add``; returns the old value (keep=all, add=0 reads it)."""
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            slot = cgutils.alloca_once(builder, i32)
            pointer = builder.bitcast(slot, ir.IntType(8).as_pointer())
            hook = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
            builder.call(cgutils.get_or_insert_function(builder.module, hook, "llvm.x86.sse.stmxcsr"), [pointer])
            old = builder.load(slot)
            new = builder.or_(builder.and_(old, builder.trunc(args[0], i32)), builder.trunc(args[1], i32))
            builder.store(new, slot)
            builder.call(cgutils.get_or_insert_function(builder.module, hook, "llvm.x86.sse.ldmxcsr"), [pointer])
            return builder.zext(old, ir.IntType(64))
        return types.int64(types.int64, types.int64), codegen

    @numba.njit(cache=True)
    def _here(keep, add):
        return _mxcsr(keep, add)

    @numba.njit(parallel=True, cache=True)
    def _team(keep, add, old, ids):
        """`_mxcsr` on every thread of this thread's OpenMP team: each iteration writes its thread's register and
        notes the old value and the thread's number."""
        for i in numba.prange(old.shape[0]):
            old[i] = _mxcsr(keep, add)
            ids[i] = numba.get_thread_id()


def unsupported() -> str | None:
    """Why this machine lacks the modes nmtrain can set on every thread (they need an x86-64 CPU, and numba);
    None where it has them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"nmtrain sets the flush-to-zero modes on x86-64 CPUs only, not on {platform.machine() or 'this one'}"
    if numba is None:
        return "setting the flush-to-zero modes on every thread needs numba (pip install numba)"
    return None


def supported() -> bool:
    """Whether this machine has the modes nmtrain can set on every thread (`unsupported`)."""
    return unsupported() is None


def _check_supported() -> None:
    why = unsupported()
    if why is not None:
        raise ExperimentError(f"flush_denormals: {why}; leave denormals as they are")


def flushing_here() -> bool:
    """Whether this thread takes denormals as zero (both modes set)."""
    _check_supported()
    return _here(_ALL, 0) & MODES == MODES


def _set_here(modes: int) -> int:
    """This thread's register with ``modes`` (both bits or neither), read back: the mode bits it now holds."""
    _here(_ALL & ~MODES, modes)
    return _here(_ALL, 0) & MODES


def _set_team(on: bool) -> tuple[set[int], bool]:
    """The modes ``on`` (or off) on every thread of this thread's team, then read back: (the registers' mode
    bits found on the threads, whether the kernel ran on as many threads as it was given)."""
    keep, add = (_ALL & ~MODES, MODES if on else 0)
    with threads.numba_threads() as workers:
        kernel = threads.usable(_team)
        old = np.zeros(workers * _ITERATIONS, dtype=np.int64)
        ids = np.zeros(workers * _ITERATIONS, dtype=np.int64)
        kernel(keep, add, old, ids)
        kernel(_ALL, 0, old, ids)       # read back
        return {int(v) & MODES for v in old}, len(set(ids.tolist())) == workers


def torch_flushes() -> bool | None:
    """Whether torch's operations take denormals as zero on all of its threads (True), on none (False), or on
    some (None): a product over the smallest denormal, made by its bits and long enough that torch gives
    every thread a part of it, read back per part."""
    parts = max(torch.get_num_threads(), 1)
    tiny = torch.ones(parts << 16, dtype=torch.int32).view(torch.float32)    # 1.4e-45, whatever the modes
    zero = (tiny * 1.0 == 0).view(parts, -1).all(dim=1).tolist()
    return True if all(zero) else False if not any(zero) else None


def set_flush_denormals(on: bool) -> None:
    """Denormals taken as zero (``on``) or kept, on this thread, every thread of its OpenMP team (torch's, and
    numba's) and `threads.split_map`'s second thread; checked on each (the module's docstring). Raises
    `ExperimentError` on a machine without the modes, or where a thread did not take them."""
    _check_supported()
    want = MODES if on else 0
    here = _set_here(want)
    found, every = _set_team(on)
    other = threads.on_other_thread(lambda: _set_here(want))
    product = torch_flushes()
    if here != want or found != {want} or not every or other != want or product is not on:
        raise ExperimentError(f"flush_denormals: the flush-to-zero modes could not be {'set' if on else 'cleared'} "
                              f"on every thread (the team's registers: {sorted(found)}, every thread reached: "
                              f"{every}; the split thread's: {other}; torch's product flushing: {product}); "
                              "train without train.flush_denormals")


@contextlib.contextmanager
def flush_denormals(on: bool = True) -> Iterator[None]:
    """Within the block every thread that computes takes denormals as zero (``on``) or keeps them
    (`set_flush_denormals`); after it, every thread computes as this one did before it.

    Faster on an Intel CPU wherever a model's tensors hold denormals (STEP's 400-step run of the GPT on text:
    16.1-18.3 s to 15.0-15.4 s); not always bit for bit the numbers without it. Raises `ExperimentError` on a
    machine other than x86-64."""
    before = flushing_here()
    set_flush_denormals(on)
    try:
        yield
    finally:
        set_flush_denormals(before)
