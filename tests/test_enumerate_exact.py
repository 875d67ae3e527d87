"""The enumeration solver (2:4-T, and every M x M family with few masks) keeps the float64 optimum on every
tile: checked against a direct float64 transcription (score every valid mask of every tile, take the
best), on random and on tied magnitudes; and its compiled CPU path keeps the same masks, ties included."""

from fractions import Fraction

import pytest
import torch

from nmtrain.masks import Pattern, nm_violation, transposable_mask
from nmtrain.sparsity.layout import from_tiles, to_tiles
from nmtrain.sparsity.solvers import compiled, get_solver
from nmtrain.sparsity.solvers.enumerate import enumerable, enumerate_solver, patterns


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


# ------------------------------------------------------------------------------------------------
# The compiled enumeration (a CPU layer's matrix through `transposable_mask`): the tensor path's masks,
# ties included


def _tensor_path(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The product-and-argmax enumeration on the matrix's tiles, back in the matrix's shape."""
    return from_tiles(enumerate_solver(to_tiles(matrix.abs(), m), n), *matrix.shape)


def _matrices(m: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (16 * m, 24 * m)
    return {
        "random": torch.randn(shape, generator=g),
        "wide range": torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g)),
        "integers (ties)": torch.randint(-3, 4, shape, generator=g).float(),
        "two values (ties)": torch.tensor([0.5, -1.0])[torch.randint(0, 2, shape, generator=g)],
        "zeros": torch.zeros(shape),
        "nearly tied": (1e6 + torch.rand(shape, generator=g, dtype=torch.float64) * 4e-2).float(),
        "bfloat16": torch.randn(shape, generator=g).to(torch.bfloat16),
    }


ENUMERABLE = [(m, n) for m in (2, 3, 4, 5, 6) for n in range(1, m) if enumerable(m, n)]


@pytest.mark.skipif(not compiled.available(), reason="the compiled enumeration needs numba")
@pytest.mark.parametrize("m, n", ENUMERABLE)
def test_compiled_enumeration_keeps_the_tensor_paths_masks(m, n):
    assert get_solver("enumerate").matrix(torch.zeros(m, m), n, m) is not None     # the compiled path serves
    for name, matrix in _matrices(m, seed=m * 10 + n).items():
        for solver in ("enumerate", "exact"):
            got = transposable_mask(matrix, n, m, solver=solver)
            assert torch.equal(got, _tensor_path(matrix, n, m)), (name, solver)


@pytest.mark.skipif(not compiled.available(), reason="the compiled enumeration needs numba")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_compiled_enumeration_refuses_a_weight_that_is_not_finite(value):
    matrix = torch.randn(64, 64)
    matrix[37, 5] = value                    # one entry: the other patterns of its tile still have finite sums
    with pytest.raises(ValueError, match="NaN/Inf"):
        transposable_mask(matrix, 2, 4)


@pytest.mark.skipif(not compiled.available(), reason="the compiled enumeration needs numba")
def test_compiled_enumeration_does_not_depend_on_the_thread_count_or_the_chunks():
    matrix = torch.randn(256, 512, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = transposable_mask(matrix, 2, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, transposable_mask(matrix, 2, 4))
    assert torch.equal(one, transposable_mask(matrix, 2, 4, chunk_tiles=77))


def _exact_kept(matrix: torch.Tensor, keep: torch.Tensor, m: int) -> list[Fraction]:
    """Per tile, the kept magnitude as an exact rational sum."""
    tiles, kept = to_tiles(matrix.abs().double(), m), to_tiles(keep, m)
    return [sum((Fraction(v) for v in t[k].tolist()), Fraction(0)) for t, k in zip(tiles, kept)]


@pytest.mark.skipif(not compiled.available(), reason="the compiled enumeration needs numba")
@pytest.mark.parametrize("kind", ["span over 2^26", "float64"])
def test_where_the_sums_round_both_paths_keep_the_optimum_to_within_the_rounding(kind):
    # magnitudes 1 or (1..2)·2^-40 in one tile: float64 sums of 8 of them round, so the two paths' orders
    # of addition can tell exact ties (and near-ties) apart differently; float64 weights round likewise
    g = torch.Generator().manual_seed(3)
    shape = (64, 64)
    if kind == "float64":
        matrix = torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        small = (1 + torch.rand(shape, generator=g)) * 2.0 ** -40
        matrix = torch.where(torch.rand(shape, generator=g) < 0.5, torch.ones(shape), small)
    pats = patterns(4, 2)
    best = [max(sum((Fraction(v) for v, p in zip(t.reshape(-1).tolist(), pat.tolist()) if p), Fraction(0))
                for pat in pats) for t in to_tiles(matrix.abs().double(), 4)]
    for keep in (transposable_mask(matrix, 2, 4), _tensor_path(matrix, 2, 4)):
        assert nm_violation(keep, Pattern(2, 4, transposable=True), exact=True) is None
        for got, opt in zip(_exact_kept(matrix, keep, 4), best):
            assert opt - got <= opt * Fraction(2) ** -50        # within a few float64 roundings of the sum
