"""Running a parallel numba kernel on torch's threads, and serially where that is unsafe; and a loop of serial
kernels over a model's layers on two threads (`split_map`).

A parallel kernel (``@njit(parallel=True)``, ``prange``) runs on numba's OpenMP pool, which is the OpenMP
runtime torch's own operations use. `numba_threads` gives it as many threads as torch uses
(``torch.set_num_threads``), so that a process that limits torch limits the kernels too, and puts torch's
count back afterwards: numba's first parallel launch starts the pool with every core, and the shared
runtime then reported that count to torch (a run limited to one thread silently went on with two: other
float sums, other timings).

GNU OpenMP does not survive ``fork``: in a child forked after numba started its pool, numba's next
parallel launch kills the process ("Terminating: fork() called from a process already using GNU OpenMP").
A training loop forks when it starts its workers that way (``multiprocessing`` with the fork start method,
as a DDP test does after other runs in the same process). There `numba_threads` yields 1 without touching
numba's pool: a kernel with a serial dispatcher of its own (the MVUE kernels', cached on disk) runs that,
and `usable` hands out any other's serial twin (the same Python function compiled without ``parallel``:
``prange`` runs as ``range``, the same results).

A serial twin is correct, but it may not be as fast: numba marks a parallel loop's arrays as not aliasing
one another, a plain function's it does not, and where a loop reads and writes more arrays than LLVM will
check at run time it stays scalar (the MVUE sample's tile loop: 10x slower). A small job therefore runs the
parallel kernel on one thread (`numba_threads` with ``parallel`` false), not its twin.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterator, Sequence, TypeVar

import torch

try:
    import numba
    import numba.np.ufunc.parallel as _numba_parallel
except ImportError:  # pragma: no cover - numba is a dependency; callers check for it first
    numba = None

_forked_from_pool = False       # this process was forked from one whose numba pool had started
SPLIT_ENTRIES = 1 << 18         # `split_map`'s smallest job for two threads (the sizes' sum; see there)
_second: tuple[int, ThreadPoolExecutor] | None = None     # `split_map`'s other thread, with its process's id
T = TypeVar("T")
R = TypeVar("R")


def _after_fork_in_child() -> None:
    global _forked_from_pool
    # numba's flag is private: where it is missing, assume the pool had started (serial is always safe)
    _forked_from_pool = _forked_from_pool or bool(getattr(_numba_parallel, "_is_initialized", True))


if numba is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_from_pool() -> bool:
    """Whether a parallel launch here would meet numba's pool inherited through ``fork``."""
    return _forked_from_pool


@functools.lru_cache(maxsize=None)
def _serial(kernel: Callable) -> Callable:
    options = {key: value for key, value in kernel.targetoptions.items() if key not in ("parallel", "nopython")}
    return numba.njit(**options)(kernel.py_func)     # not cached on disk: it compiles once per forked process


def usable(kernel: Callable) -> Callable:
    """``kernel`` (a ``parallel=True`` dispatcher), or in a process forked from a started pool its serial twin."""
    return _serial(kernel) if _forked_from_pool else kernel


@contextlib.contextmanager
def numba_threads(parallel: bool = True) -> Iterator[int]:
    """Within the block numba's parallel kernels run on torch's thread count (yielded), or on one thread where
    ``parallel`` is false (a job too small to pay the others' wake-ups, which a launch on one thread spares);
    after it torch's count is what it was. In a process forked from a started pool it yields 1 without
    touching the pool: there the caller runs serially (`usable` makes any kernel serial)."""
    if numba is None:
        raise RuntimeError("the compiled kernels need numba (pip install numba)")
    if _forked_from_pool:
        yield 1
        return
    threads = torch.get_num_threads()
    workers = max(1, min(threads, numba.config.NUMBA_NUM_THREADS)) if parallel else 1
    numba.set_num_threads(workers)
    try:
        yield workers
    finally:
        torch.set_num_threads(threads)


def _other_thread() -> ThreadPoolExecutor:
    """This process's second thread for `split_map`, started at its first use. One made before a ``fork`` is
    not there in the child (its thread was not copied), so a child starts its own."""
    global _second
    if _second is None or _second[0] != os.getpid():
        _second = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="nmtrain-split"))
    return _second[1]


def on_other_thread(fn: Callable[[], R]) -> R:
    """``fn()`` run on `split_map`'s other thread (started here if it is not yet), its result returned: for
    per-thread state that the work split onto that thread must share with this one (the CPU's denormal
    modes, ``experiments/denormals.py``)."""
    return _other_thread().submit(fn).result()


def halves(sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """The indices of ``sizes`` in two lists of about half the total each: the largest first, each to the less
    loaded list (`split_map`'s share between its threads)."""
    sides: tuple[list[int], list[int]] = ([], [])
    load = [0, 0]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        side = 0 if load[0] <= load[1] else 1
        sides[side].append(i)
        load[side] += sizes[i]
    return sides


def split_map(fn: Callable[[T], R], items: Sequence[T], sizes: Sequence[int]) -> list[R]:
    """``[fn(item) for item in items]``, in that order, with the items shared between this thread and one
    other where the job is large enough: ``sizes`` (an item's work, its tensor's entries say) summing to at
    least `SPLIT_ENTRIES`, two items or more, torch allowed two threads or more. Each thread takes the items
    of about half the work (the largest first, each to the less loaded thread).

    For a loop over layers whose per-layer work is a serial compiled kernel that releases the GIL (the N:4
    masks SR-STE and Bi-Mask make for every layer at each step): one layer alone is too small to pay a
    parallel kernel's wake-up (under `fused._PARALLEL_ENTRIES`, on the GPT's 16K-65K-entry layers), the whole
    loop is not. On the GPT (16 layers, 786K entries) two threads made Bi-Mask's operands of every layer in
    1.54 ms against 2.12 ms on one. Smaller jobs gain less than the handoff costs: on the ViT-Tiny (24
    layers, 200K entries) SR-STE's and Bi-Mask's steps moved within noise either way, on LeNet-5 (three
    layers, 62K entries) SR-STE's went from 1.06 to 1.07-1.08x dense. Not for torch's own operations,
    which take torch's threads themselves (a held mask's product: no gain, and twice the threads).

    ``fn`` must be safe to run on another thread with other items: each item's work its own (its results do
    not depend on which thread runs it, so they are what one thread makes, bit for bit). The other thread runs
    under the caller's grad mode, which torch keeps per thread. An exception of either thread is raised here,
    after both have finished."""
    if len(items) < 2 or sum(sizes) < SPLIT_ENTRIES or torch.get_num_threads() < 2:
        return [fn(item) for item in items]
    mine, theirs = halves(sizes)
    grad = torch.is_grad_enabled()

    def run(indices: list[int]) -> list[R]:
        with torch.set_grad_enabled(grad):
            return [fn(items[i]) for i in indices]

    other = _other_thread().submit(run, theirs)
    try:
        made = {i: fn(items[i]) for i in mine}
    finally:
        wait([other])       # the other thread is done with its items before anything returns or is raised
    made.update(zip(theirs, other.result()))       # (raises the other thread's exception)
    return [made[i] for i in range(len(items))]
