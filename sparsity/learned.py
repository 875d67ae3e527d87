"""Learned N:M masks (MaskLLM, Fang et al., NeurIPS 2024): a categorical choice per group of M.

Instead of ranking weights, every group chooses one of its *candidate masks*, and the choice is learned
through the Gumbel-softmax relaxation. The pieces here are pure tensor code; the training loop that
learns the logits on a task's loss lives in ``experiments/learned_masks.py``.

- **Candidates** (:func:`candidate_masks`): row-wise N:M, all ``C(M, N)`` 0/1 rows of length M with N
  ones (6 for 2:4, 4 for 1:4, 70 for 4:8), in the order of ``itertools.combinations`` (MaskLLM's own
  order for 2:4 and 1:4, ``learnable_sparsity/differentiable_mask.py`` lines 644-664). For N:M-T, all
  M x M 0/1 tiles with exactly N ones in every row and every column (90 for 2:4-T, 24 for 1:4-T and for
  3:4-T), so a learned transposable mask is transposable by construction. MaskLLM has no such
  candidates (it is row-wise 2:4 and 1:4 only). A family above ``MAX_CANDIDATES`` is refused before
  anything is enumerated (4:8-T has 116,963,796,250 tiles).
- **Groups** (:func:`to_groups`, :func:`from_groups`): the weight's GEMM view ``C_out x K``
  (``to_matrix`` under the layout) cut into groups of M along K, ``(G, M)``, or into M x M tiles of M
  consecutive rows by M consecutive columns, ``(G, M, M)`` (the tiles of ``transposable_mask``).
- **Logits** (:func:`prior_logits`): one per group and candidate, ``N(0, init_std)`` (MaskLLM line
  636, std 0.01), then raised by a one-shot prior mask as MaskLLM does (lines 246-247)::

      gate += (overlap - 1) * gate.std() * strength

  where ``overlap`` counts the kept entries a candidate shares with the prior mask's group (N for the
  prior's own candidate, N*M for its own tile), so the prior's candidate gets the largest boost, by at
  least ``gate.std() * strength`` over any other. The boost is relative to the initial noise: at
  MaskLLM's strength 3 the prior's candidate is the argmax in most groups but not all (about 94% of
  2:4 groups); a larger strength makes it the argmax everywhere.
- **Soft mask** (:func:`soft_mask`): MaskLLM's forward (lines 680-689): ``p = softmax((logits * scale
  + g) / tau)`` with Gumbel noise ``g = -log(E)``, ``E ~ Exp(1)`` (how ``torch.nn.functional.
  gumbel_softmax`` draws it, here from a given generator), and the mask is the ``p``-weighted sum of
  the candidates. ``hard=True`` is the straight-through variant (one-hot forward, soft gradient).
- **Hard mask** (:func:`hard_mask`, :func:`masks_from_choice`): the argmax candidate of every group
  (MaskLLM's eval branch, line 692): what is deployed.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch

from .diversity import DiversityError, transposable_count
from .layout import from_matrix, from_tiles, require_fits, to_matrix, to_tiles
from .pattern import Pattern, PatternError

# The most candidates one group may choose among. Logits and Adam's two moments cost 3 x 4 bytes per
# group and candidate; at this bound a 768 x 768 layer of 1:7-T tiles would hold ~14 GB, and the 90
# candidates of 2:4-T on a 768 x 3072 layer ~160 MB. Allowed: every row-wise N:M with M <= 15, and
# N:M-T for M <= 5 and 1:M-T, (M-1):M-T up to M = 7.
MAX_CANDIDATES = 10_000


def candidate_count(n: int, m: int, transposable: bool = False) -> int:
    """How many candidates a group of ``n:m`` (``-T``: an M x M tile) chooses among; nothing enumerated.

    Tiles are counted by ``transposable_count`` (exact up to M = 14); beyond that, ``math.inf``."""
    Pattern(n, m, transposable)
    if not transposable:
        return math.comb(m, n)
    try:
        return transposable_count(m, n)
    except DiversityError:          # M beyond the exact count: far beyond any bound here
        return math.inf


@functools.lru_cache(maxsize=None)
def _allowed_transposable() -> str:
    return ", ".join(f"{n}:{m}-T" for m in range(2, 9) for n in range(1, m)
                     if candidate_count(n, m, True) <= MAX_CANDIDATES)


def check_candidates(n: int, m: int, transposable: bool = False) -> int:
    """The candidate count of ``n:m[-T]``, or a one-line PatternError when it is above MAX_CANDIDATES."""
    count = candidate_count(n, m, transposable)
    if count <= MAX_CANDIDATES:
        return count
    pattern = Pattern(n, m, transposable)
    shown = f"{count:,}" if count != math.inf else "too many to count"
    if transposable:
        raise PatternError(f"learned masks choose among every {m}x{m} tile of {pattern} and it has {shown} "
                           f"(more than {MAX_CANDIDATES:,}); use one of {_allowed_transposable()}, "
                           f"or the row-wise {n}:{m}")
    raise PatternError(f"learned masks choose among every group of {pattern} and it has C({m},{n}) = {shown} "
                       f"(more than {MAX_CANDIDATES:,}); use a row-wise N:M with M <= 15")


@functools.lru_cache(maxsize=32)
def _enumerate(n: int, m: int, transposable: bool) -> torch.Tensor:
    rows = [tuple(1 if j in kept else 0 for j in range(m)) for kept in itertools.combinations(range(m), n)]
    if not transposable:
        return torch.tensor(rows, dtype=torch.bool)
    tiles: list[list[tuple[int, ...]]] = []

    def extend(tile: list[tuple[int, ...]], cols: list[int]) -> None:
        left = m - len(tile)                 # rows still to place, this one included
        if left == 0:
            tiles.append(list(tile))
            return
        for row in rows:
            new = [c + r for c, r in zip(cols, row)]
            if all(c <= n and c + left - 1 >= n for c in new):    # no column over N, every one can reach N
                extend(tile + [row], new)

    extend([], [0] * m)
    return torch.tensor(tiles, dtype=torch.bool)


def candidate_masks(n: int, m: int, transposable: bool = False,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Every candidate of a group, a bool tensor ``(K, M)`` (row-wise) or ``(K, M, M)`` (N:M-T tiles).

    Row-wise in ``itertools.combinations`` order; tiles in the lexicographic order of their rows.
    Refused with a one-line PatternError above MAX_CANDIDATES (checked before enumerating)."""
    check_candidates(n, m, transposable)
    return _enumerate(n, m, bool(transposable)).to(device)


def pattern_of(candidates: torch.Tensor) -> Pattern:
    """The pattern a candidate tensor (from :func:`candidate_masks`) enumerates."""
    if candidates.dim() not in (2, 3) or candidates.shape[0] == 0:
        raise PatternError(f"candidates of shape {tuple(candidates.shape)} are not (K, M) rows or (K, M, M) tiles")
    first = candidates[0] if candidates.dim() == 2 else candidates[0, 0]
    return Pattern(int(first.sum()), int(candidates.shape[-1]), candidates.dim() == 3)


def to_groups(tensor: torch.Tensor, pattern: Pattern, layout: str = "nhwc") -> torch.Tensor:
    """A weight-shaped tensor as its groups: ``(G, M)`` along K, or ``(G, M, M)`` tiles for N:M-T."""
    require_fits(tensor.shape, pattern, layout)
    matrix = to_matrix(tensor, layout)
    if pattern.transposable:
        return to_tiles(matrix, pattern.m)
    return matrix.reshape(-1, pattern.m)


def from_groups(groups: torch.Tensor, shape: Sequence[int], pattern: Pattern, layout: str = "nhwc") -> torch.Tensor:
    """Inverse of :func:`to_groups`: the groups back in a tensor of the weight's ``shape``."""
    shape = tuple(int(s) for s in shape)
    require_fits(shape, pattern, layout)
    rows = shape[0]
    cols = math.prod(shape) // rows
    matrix = from_tiles(groups, rows, cols) if pattern.transposable else groups.reshape(rows, cols)
    return from_matrix(matrix, shape, layout)


def masks_from_choice(choice: torch.Tensor, candidates: torch.Tensor, shape: Sequence[int],
                      layout: str = "nhwc") -> torch.Tensor:
    """The bool mask of a weight of ``shape`` whose group ``g`` keeps candidate ``choice[g]``."""
    pattern = pattern_of(candidates)
    return from_groups(candidates.to(choice.device)[choice], shape, pattern, layout)


def choice_of(mask: torch.Tensor, candidates: torch.Tensor, layout: str = "nhwc") -> torch.Tensor:
    """Inverse of :func:`masks_from_choice`: the candidate index of every group of a valid mask, ``(G,)``.

    A group that equals no candidate (the mask is not exactly N:M / N:M-T) is a PatternError."""
    pattern = pattern_of(candidates)
    groups = to_groups(mask.to(torch.bool), pattern, layout).flatten(1)
    flat = candidates.to(groups.device).flatten(1)
    found = overlap(groups, flat) == pattern.n * (pattern.m if pattern.transposable else 1)
    hit = found & (groups.sum(1, keepdim=True) == flat.sum(1))
    if not bool(hit.any(1).all()):
        bad = int((~hit.any(1)).nonzero()[0])
        raise PatternError(f"group {bad} of the mask is not a {pattern} candidate (keeps "
                           f"{int(groups[bad].sum())} of {groups.shape[1]})")
    return hit.to(torch.uint8).argmax(1)


def overlap(groups: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(G, K)``: how many kept entries group ``g`` of a mask shares with candidate ``k`` (both flattened)."""
    return groups.flatten(1).to(torch.float64) @ candidates.flatten(1).to(torch.float64).t()


def prior_logits(prior: torch.Tensor, candidates: torch.Tensor, layout: str, strength: float,
                 generator: torch.Generator, init_std: float = 0.01,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(G, K)`` logits: ``N(0, init_std)`` noise raised by the one-shot ``prior`` mask (MaskLLM lines
    246-247: ``(overlap - 1) * std(noise) * strength``); ``strength=0`` leaves the noise alone.

    ``prior`` is a bool mask of the weight's shape; drawn on ``generator``'s device, returned on the prior's."""
    pattern = pattern_of(candidates)
    groups = to_groups(prior.to(torch.bool), pattern, layout)
    noise = torch.randn((groups.shape[0], candidates.shape[0]), generator=generator, dtype=dtype,
                        device=generator.device).to(prior.device) * init_std
    if strength == 0 or noise.numel() < 2:
        return noise
    shared = overlap(groups, candidates.to(prior.device)).to(dtype)
    return noise + (shared - 1) * noise.std() * strength


def gumbel_noise(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``-log(E)``, ``E ~ Exp(1)``: the Gumbel(0, 1) draw of ``torch.nn.functional.gumbel_softmax``, from
    ``generator`` (drawn on its device, returned on the logits')."""
    e = torch.empty(logits.shape, dtype=logits.dtype, device=generator.device).exponential_(generator=generator)
    return -e.log().to(logits.device)


def soft_mask(logits: torch.Tensor, candidates: torch.Tensor, tau: float, scale: float,
              generator: torch.Generator, hard: bool = False) -> torch.Tensor:
    """A Gumbel-softmax sample of every group's mask, ``(G, M)`` or ``(G, M, M)`` in the logits' dtype.

    ``p = softmax((logits * scale + g) / tau)``, mask = ``sum_k p_k * candidate_k``; ``hard=True`` puts
    the one-hot argmax of ``p`` in the forward and ``p``'s gradient in the backward (straight-through)."""
    p = torch.softmax((logits * scale + gumbel_noise(logits, generator)) / tau, dim=-1)
    if hard:
        one_hot = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
        p = one_hot - p.detach() + p
    flat = candidates.to(device=p.device, dtype=p.dtype).flatten(1)
    return (p @ flat).reshape(p.shape[0], *candidates.shape[1:])


def hard_mask(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The argmax candidate of every group, bool ``(G, M)`` or ``(G, M, M)``: the deployed mask's groups."""
    return candidates.to(logits.device)[logits.argmax(-1)]
