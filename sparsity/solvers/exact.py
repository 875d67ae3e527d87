"""The ``exact`` solver: the fastest exact method available for the pattern and the device.

- Enumeration when the tile has few enough valid masks (2:4 has 90: one matmul), on any device; on a
  CPU with numba, a layer's matrix is enumerated by the compiled kernel (`enumerate.on_matrix`: the same
  masks, without the matrix product's set-up and copies).
- Otherwise, with numba, the compiled per-tile solver (``compiled.py``: greedy warm start, Bellman-Ford
  cycle cancelling, one thread per chunk of tiles) on the CPU, also for a GPU's weight: the tiles go to the
  host and the mask comes back. On an H100 machine (16 cores, benchmarks/masks.py --device cuda,
  2026-12-06) that took 5-40x less time than the batched tensor solver on the GPU, on every weight timed
  (4096x4096 4:8-T 0.095 s against 0.48 s, 8:16-T 0.084 s against 1.82 s; ResNet-50's layer4 convs at
  4:8-T and 8:16-T 4-11 ms against 50-300 ms). On one host thread (torchrun's default OMP_NUM_THREADS=1) it
  is still the faster: this project's Intel CPU solves 4096x4096 at 4:8-T in 0.41 s and 8:16-T in 0.50 s on
  one thread (0.21 s and 0.25 s on two), where `batched` took 0.48 s and 1.82 s on the H100.
- Otherwise (no numba, or M above ``compiled.MAX_M``) the batched tensor solver (``batched.py``: the same
  warm start and cycle cancelling, Floyd-Warshall over all tiles at once), on the weight's device.

Each falls back to the ``flow`` reference only for tiles it could not finish; all reach the same
optimum (``flow``'s objective) on every tile. Masks can differ between paths only where several
masks keep exactly the same magnitude.
"""

from __future__ import annotations

import torch

from . import compiled
from .registry import register_solver
from .batched import batched_solver
from .enumerate import enumerable, enumerate_solver
from .enumerate import on_matrix as enumerate_on_matrix


@register_solver("exact", exact=True,
                 summary="optimal mask, fastest exact path: enumeration for small M (2:4); else compiled "
                         "cycle cancelling on the CPU (a GPU's weight too); batched without numba",
                 matrix=lambda matrix, n, m: (enumerate_on_matrix(matrix, n, m) if enumerable(m, n)
                                              else compiled.on_matrix(matrix, n, m, exact=True)))
def exact_solver(scores: torch.Tensor, n: int) -> torch.Tensor:
    m = scores.shape[-1]
    if enumerable(m, n):
        return enumerate_solver(scores, n)
    if compiled.available() and m <= compiled.MAX_M:        # on any device: see the module's docstring
        return compiled.compiled_solver(scores, n)
    return batched_solver(scores, n)
