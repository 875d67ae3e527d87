"""A fused CPU kernel for the mask arithmetic of a training step: SR-STE's decay added to a gradient,
``grad += decay · (1 − keep) ⊙ W``, in one pass over a layer where the tensor formula takes three tensor
operations (`methods.base.pruned_decay`, then ``add_``).

Why: on a CPU every tensor operation on more than torch's parallel grain (32K entries) wakes the thread
pool, tens of microseconds each under ``OMP_WAIT_POLICY=PASSIVE``; on a transformer's small layers those
wake-ups, not the arithmetic, are most of what the decay costs (measured: about 0.06x to 0.08x of a GPT
step against dense; one serial pass over a 64K-entry layer takes about 40 microseconds, the three
operations about 120-200).

`add_pruned_decay_` does the work and returns True where the kernel serves: CPU tensors of float32 or
float64, contiguous, of at most `MAX_ENTRIES` entries (above that, the tensor operations' own threads
win), numba present. Otherwise it changes nothing and returns False, and the caller runs the formula. The
kernel computes what the formula computes, bit for bit: the same IEEE operations in the same order, each
rounded in the tensor's type (numba contracts no multiply-add unless asked), checked against the formula
on random, signed-zero and non-finite inputs (tests/test_fused.py) and by tests/test_step_identity.py.
(The bound on pruned weights was tried too: a serial kernel took 0.8-0.95x the tensor path's time, not
worth a second path.)
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; without it the tensor formulas serve
    njit = None

MAX_ENTRIES = 1 << 20


def _served(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return (njit is not None and first.numel() <= MAX_ENTRIES and first.dtype in (torch.float32, torch.float64)
            and all(t.device.type == "cpu" and t.is_contiguous() and t.shape == first.shape and not t.requires_grad
                    for t in tensors))      # a gradient made with create_graph=True stays autograd's


if njit is not None:

    @njit(cache=True, nogil=True)
    def _add_decay(grad, weight, keep, factors):
        # grad += weight * (0 if kept else decay): `methods.base.pruned_decay`'s product, then ``add_``
        for i in range(grad.shape[0]):
            grad[i] = grad[i] + weight[i] * factors[0 if keep[i] else 1]


def add_pruned_decay_(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, decay: float) -> bool:
    """``grad += decay · (1 − keep) ⊙ weight`` in place, as ``grad.add_(pruned_decay(weight, keep, decay))``
    computes it, where the kernel serves (True); else nothing changed (False)."""
    if not (_served(grad, weight, keep) and grad.dtype == weight.dtype and keep.dtype == torch.bool):
        return False
    # the kept entries' factor +0 and the pruned ones' decay, both in the weight's type, as the formula's where
    factors = np.array([0.0, decay], dtype=np.float32 if weight.dtype == torch.float32 else np.float64)
    _add_decay(grad.view(-1).numpy(), weight.detach().view(-1).numpy(), keep.view(-1).numpy(), factors)
    return True
