"""The batched exact solver (greedy warm start + cycle cancelling) and the vectorised greedy.

Exactness is checked tile by tile against the networkx min-cost flow on random and adversarial
tiles (ties, zeros, equal rows, duplicate columns) for M = 4, 8, 16, 32 and many N.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtrain.sparsity import pruned_magnitude, tile_scores, transposable_mask
from nmtrain.sparsity.solvers import batched, get_solver
from nmtrain.sparsity.solvers.greedy import greedy_keep

flow = get_solver("flow").fn
fast = get_solver("batched").fn
approx = get_solver("approx").fn


def _assert_valid(keep: torch.Tensor, n: int) -> None:
    assert keep.dtype == torch.bool
    assert bool((keep.sum(1) == n).all()) and bool((keep.sum(2) == n).all())


def _assert_optimal(scores: torch.Tensor, keep: torch.Tensor, n: int) -> None:
    """Per-tile pruned magnitude equal to flow's; both optimise round(|W|/max * 2**40)."""
    _assert_valid(keep, n)
    assert batched.stats["fallback"] == 0
    got = pruned_magnitude(scores, keep)
    want = pruned_magnitude(scores, flow(scores, n))
    top = scores.double().amax((1, 2))
    assert bool(((got - want).abs() <= 1e-9 * (1 + top)).all()), (got - want).abs().max()


def _adversarial(t: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """Tiles full of ties and degeneracies."""
    kinds = [
        torch.randint(0, 3, (t, m, m), generator=gen).float(),                  # many ties
        torch.ones(t, m, m),                                                    # all equal
        torch.zeros(t, m, m),                                                   # all zero
        torch.rand(t, m, m, generator=gen) * (torch.rand(t, m, m, generator=gen) < 0.2),  # mostly zeros
        torch.rand(t, 1, m, generator=gen).expand(t, m, m).clone(),             # equal rows
        torch.rand(t, m, 1, generator=gen).expand(t, m, m).clone(),             # equal columns
        torch.rand(t, m, m // 2, generator=gen).repeat(1, 1, 2),                # duplicate columns
        torch.randint(0, 2, (t, m, m), generator=gen).float() * 1e-30 + 1.0,    # ties up to float noise
    ]
    return torch.cat(kinds)


@pytest.mark.parametrize("m,ns,t", [(4, [1, 2, 3], 20), (8, range(1, 8), 6), (16, [1, 4, 8, 13, 15], 2)])
def test_batched_matches_flow_on_random_and_adversarial_tiles(m, ns, t):
    gen = torch.Generator().manual_seed(m)
    scores = torch.cat([torch.rand(4 * t, m, m, generator=gen), torch.randn(t, m, m, generator=gen).abs() ** 3,
                        _adversarial(t, m, gen)])
    for n in ns:
        _assert_optimal(scores, fast(scores, n), n)


def test_batched_matches_flow_for_32():
    gen = torch.Generator().manual_seed(32)
    scores = torch.cat([torch.rand(3, 32, 32, generator=gen), torch.randint(0, 4, (2, 32, 32), generator=gen).float()])
    for n in (16, 5):
        _assert_optimal(scores, fast(scores, n), n)


def test_exact_uses_an_exact_path_for_every_pattern():
    gen = torch.Generator().manual_seed(1)
    for m, n in [(4, 2), (8, 4), (16, 8)]:
        scores = torch.rand(12, m, m, generator=gen)
        keep = get_solver("exact").fn(scores, n)
        _assert_valid(keep, n)
        assert torch.allclose(pruned_magnitude(scores, keep), pruned_magnitude(scores, flow(scores, n)),
                              rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(m=st.sampled_from([4, 8]), data=st.data())
def test_property_batched_is_optimal_on_small_integer_tiles(m, data):
    n = data.draw(st.integers(1, m - 1))
    values = data.draw(st.lists(st.integers(0, 4), min_size=2 * m * m, max_size=2 * m * m))
    scores = torch.tensor(values, dtype=torch.float32).reshape(2, m, m)
    _assert_optimal(scores, fast(scores, n), n)


def test_batched_is_deterministic_and_improves_on_approx():
    scores = tile_scores(torch.randn(256, 256), 8)
    a, b = fast(scores, 4), fast(scores.clone(), 4)
    assert torch.equal(a, b)
    _assert_valid(a, 4)
    assert batched.stats["fallback"] == 0 and batched.stats["cycles"] > 0
    assert bool((pruned_magnitude(scores, a) <= pruned_magnitude(scores, approx(scores, 4)) + 1e-9).all())


def test_conv_weights_are_just_more_tiles():
    w = torch.randn(32, 16, 3, 3)
    keep = transposable_mask(w, 4, 8, solver="batched")
    assert keep.shape == w.shape
    tiles, kept = tile_scores(w, 8), tile_scores(keep.float(), 8) > 0
    _assert_valid(kept, 4)
    want = pruned_magnitude(tiles, flow(tiles, 4))
    assert torch.allclose(pruned_magnitude(tiles, kept), want, rtol=1e-9, atol=1e-9)


def test_fallback_to_flow_is_counted_when_rounds_run_out():
    scores = torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(3))
    keep = batched.batched_solver(scores, 4, max_rounds=1)
    _assert_valid(keep, 4)
    assert batched.stats["fallback"] > 0   # one round cannot finish random tiles...
    assert torch.allclose(pruned_magnitude(scores, keep), pruned_magnitude(scores, flow(scores, 4)))  # ...flow does


def _algorithm_1(tile: list[list[float]], n: int) -> list[list[bool]]:
    """Reference Algorithm 1 on one tile; ties: the lower flat index is visited first."""
    m = len(tile)
    order = sorted(range(m * m), key=lambda i: (-tile[i // m][i % m], i))
    rows, cols = [0] * m, [0] * m
    keep = [[False] * m for _ in range(m)]
    for i in order:
        r, c = divmod(i, m)
        if rows[r] < n and cols[c] < n:
            keep[r][c] = True
            rows[r] += 1
            cols[c] += 1
    return keep


@pytest.mark.parametrize("m", [4, 8, 16])
def test_vectorised_greedy_is_algorithm_1_with_its_tie_rule(m):
    gen = torch.Generator().manual_seed(m)
    scores = torch.cat([torch.rand(6, m, m, generator=gen), torch.randint(0, 3, (6, m, m), generator=gen).float(),
                        torch.ones(2, m, m)])
    for n in {1, m // 2, m - 1}:
        want = torch.tensor([_algorithm_1(tile, n) for tile in scores.tolist()])
        assert torch.equal(greedy_keep(scores, n), want)


@pytest.mark.parametrize("m,n", [(4, 2), (8, 4), (16, 8), (8, 1)])
def test_approx_bound_against_the_optimum(m, n):
    gen = torch.Generator().manual_seed(5)
    scores = torch.cat([torch.rand(20, m, m, generator=gen), _adversarial(3, m, gen)])
    optimum = pruned_magnitude(scores, fast(scores, n))
    got = pruned_magnitude(scores, approx(scores, n))
    _assert_valid(approx(scores, n), n)
    assert bool((got >= optimum - 1e-9).all())
    positive = optimum > 0
    assert bool((got[positive] < 2 * optimum[positive]).all())   # Lemma 1: W(P) < 2 W*


def test_approx_prunes_nothing_when_the_optimum_prunes_nothing():
    # completion may not lose what Algorithm 1 kept: a tile it would worsen is solved exactly
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(40, 8, 8, generator=gen) * (torch.rand(40, 8, 8, generator=gen) < 0.2)
    optimum = pruned_magnitude(scores, fast(scores, 4))
    assert bool((optimum == 0).any())
    assert bool((pruned_magnitude(scores, greedy_keep(scores, 4))[optimum == 0] == 0).all())  # greedy is fine
    assert bool((pruned_magnitude(scores, approx(scores, 4))[optimum == 0] == 0).all())


def test_empty_and_trivial_inputs():
    assert fast(torch.zeros(0, 8, 8), 4).shape == (0, 8, 8)
    _assert_valid(fast(torch.rand(3, 8, 8), 8), 8)
