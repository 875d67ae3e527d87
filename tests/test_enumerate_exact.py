"""The enumeration solver (2:4-T, and every M x M family with few masks) keeps the float64 optimum on every
tile, though it scores in float32: checked against a direct float64 transcription (score every valid
mask of every tile, take the best), on random and on tied magnitudes."""

import pytest
import torch

from nmtrain.sparsity.solvers.enumerate import enumerate_solver, patterns


def _optimum(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Per tile, the largest kept magnitude over every valid mask, in float64 (the formula, directly)."""
    t, m, _ = scores.shape
    pats = patterns(m, n).double()                                   # (P, M*M)
    return (scores.double().reshape(t, m * m) @ pats.t()).max(1).values


def _kept(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (scores.double() * keep).sum((1, 2))


@pytest.mark.parametrize("m, n", [(4, 2), (4, 1), (4, 3), (5, 2)])
def test_random_magnitudes_reach_the_float64_optimum_on_every_tile(m, n):
    g = torch.Generator().manual_seed(m * 10 + n)
    # wide dynamic range: the float32 sums round where float64 ones do not
    scores = (torch.randn(200_000, m, m, generator=g) * torch.exp(4 * torch.randn(200_000, 1, 1, generator=g))).abs()
    keep = enumerate_solver(scores, n)
    assert bool((keep.sum(1) == n).all()) and bool((keep.sum(2) == n).all())
    assert torch.equal(_kept(scores, keep), _optimum(scores, n))     # exactly the optimum, every tile


def test_nearly_tied_tiles_that_float32_cannot_tell_apart():
    # magnitudes near 1e6 that differ below float32's resolution of their sums (0.5 at 8e6): many masks'
    # kept sums round together in float32 though float64 orders them (the old float32-only argmax failed here)
    g = torch.Generator().manual_seed(0)
    tiles = 1e6 + torch.rand(5000, 4, 4, generator=g, dtype=torch.float64) * 4e-2     # spread below fp32's step
    scores = tiles.float()
    keep = enumerate_solver(scores, 2)
    assert torch.equal(_kept(scores, keep), _optimum(scores, 2))


@pytest.mark.parametrize("values", [[0.0], [1.0], [0.0, 1.0], [0.5, 0.25, 1.0]])
def test_tied_magnitudes_reach_the_optimum_and_are_deterministic(values):
    g = torch.Generator().manual_seed(1)
    v = torch.tensor(values)
    scores = v[torch.randint(0, len(values), (20_000, 4, 4), generator=g)]
    keep = enumerate_solver(scores, 2)
    assert torch.equal(_kept(scores, keep), _optimum(scores, 2))
    assert torch.equal(keep, enumerate_solver(scores.clone(), 2))    # the same choice among tied masks
