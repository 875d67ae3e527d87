"""Running a parallel numba kernel on torch's threads, and serially where that is unsafe.

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
from typing import Callable, Iterator

import torch

try:
    import numba
    import numba.np.ufunc.parallel as _numba_parallel
except ImportError:  # pragma: no cover - numba is a dependency; callers check for it first
    numba = None

_forked_from_pool = False       # this process was forked from one whose numba pool had started


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
