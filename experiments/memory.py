"""Keep the memory a training step frees inside the process (glibc's malloc), so that the next step reuses it.

Why: a CPU training step frees its activations and their gradients when it ends and allocates them again in
the next. glibc's malloc hands a freed block at the top of its heap back to the kernel once more than its
trim threshold is free there, and serves a block above its mmap threshold with a mapping of its own, unmapped
when freed (both thresholds start at 128 KiB and move as it sees larger blocks freed). Either way the next
step's first touch of each page is a page fault, and the kernel zeroes the page. Which of a process's blocks
land where depends on the order they were freed in, so one process faults on every step and the next, running
the same code, does not.

Measured on the 2-core machine (`OMP_WAIT_POLICY=PASSIVE`, medians of interleaved steps, faults from
``getrusage``): LeNet-5 at batch 128 took 3,300 minor page faults a step and 14.9 ms, against none and
10.6 ms with the settings below; ResNet-20 at batch 64 163 ms against 136 ms; the GPT and ViT-Tiny of the
benchmarks fault on no step either way. Without them, dense LeNet-5 took 11.4 ms a step in one process and
15.2 ms in the next, and the benchmarks' ratios moved with it.

The settings: every block up to 32 MiB comes from the heap (32 MiB is as high as glibc's own threshold ever
moves on a 64-bit machine), and the heap is never trimmed. The process then keeps the memory of its largest
step, as PyTorch's CUDA caching allocator keeps GPU memory. Blocks above 32 MiB keep their own mappings.

`nmtrain train` sets them for its process; in a loop of your own, `nmtrain.keep_freed_memory()` does.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1           # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_BLOCKS_UP_TO = 32 << 20    # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit machines
NEVER_TRIM = 2**31 - 1          # mallopt takes an int


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):      # not glibc (macOS, musl, Windows)
        return False


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process (the module's docstring says why). True where it
    is set (Linux with glibc; setting it again changes nothing), False elsewhere, where nothing is changed."""
    if not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; the first setting also stops glibc moving the thresholds itself
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
