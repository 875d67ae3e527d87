"""Transposable N:M masks: every solver valid, exact solvers optimal, approx within its bound."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtrain.sparsity import (Pattern, kept_share, list_solvers, nm_mask, nm_violation, pruned_magnitude,
                              tile_scores, transposable_mask)
from nmtrain.sparsity.layout import from_tiles
from nmtrain.sparsity.solvers import get_solver
from nmtrain.sparsity.solvers.enumerate import enumerable, patterns
from nmtrain.sparsity.solvers.greedy import complete, greedy_keep

SOLVERS = [s.name for s in list_solvers()]


def _tiles(kind, t, m, gen):
    if kind == "randn":
        return torch.randn(t, m, m, generator=gen).abs()
    if kind == "ties":
        return torch.randint(0, 3, (t, m, m), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(t, m, m)
    if kind == "equal_rows":
        return torch.rand(t, 1, m, generator=gen).expand(t, m, m).contiguous()
    if kind == "equal":
        return torch.ones(t, m, m)
    return torch.rand(t, m, m, generator=gen) * (torch.rand(t, m, m, generator=gen) < 0.4)  # sparse


KINDS = ["randn", "ties", "zeros", "equal_rows", "equal", "sparse"]


def _assert_exactly_n(keep, n):
    assert keep.dtype == torch.bool
    assert bool((keep.sum(-1) == n).all()), "a row does not keep exactly N"
    assert bool((keep.sum(-2) == n).all()), "a column does not keep exactly N"


@settings(max_examples=40, deadline=None)
@given(m=st.sampled_from([2, 3, 4, 5, 8]), data=st.data(), kind=st.sampled_from(KINDS),
       t=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_every_solver_keeps_exactly_n_per_row_and_column(m, data, kind, t, seed):
    n = data.draw(st.integers(1, m - 1))
    scores = _tiles(kind, t, m, torch.Generator().manual_seed(seed))
    for name in SOLVERS:
        if name == "enumerate" and not enumerable(m, n):
            continue
        _assert_exactly_n(get_solver(name).fn(scores, n), n)


@pytest.mark.parametrize("m,n", [(4, 1), (4, 2), (4, 3), (5, 2), (8, 2), (8, 4), (8, 6)])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_solvers_match_flow_on_every_tile(m, n, kind):
    scores = _tiles(kind, 12, m, torch.Generator().manual_seed(m * 10 + n))
    optimum = pruned_magnitude(scores, get_solver("flow").fn(scores, n))
    for info in list_solvers():
        if not info.exact or (info.name == "enumerate" and not enumerable(m, n)):
            continue
        got = pruned_magnitude(scores, info.fn(scores, n))
        assert torch.allclose(got, optimum, rtol=1e-6, atol=1e-6), info.name


@pytest.mark.parametrize("m,n", [(4, 2), (8, 4), (8, 2), (16, 8)])
def test_approx_keeps_the_two_approximation_bound(m, n):
    gen = torch.Generator().manual_seed(7)
    scores = torch.cat([_tiles(k, 10, m, gen) for k in KINDS])
    optimum = pruned_magnitude(scores, get_solver("flow").fn(scores, n))
    approx = pruned_magnitude(scores, get_solver("approx").fn(scores, n))
    assert bool((approx >= optimum - 1e-9).all())
    positive = optimum > 0
    assert bool((approx[positive] < 2 * optimum[positive]).all())   # Lemma 1: W(P) < 2 W*
    assert bool((approx[~positive] == 0).all())
    # completion never loses what Algorithm 1 kept, except on tiles it then solves to the optimum
    greedy = pruned_magnitude(scores, greedy_keep(scores, n))
    assert bool(((approx <= greedy + 1e-9) | (approx <= optimum + 1e-9)).all())


def test_greedy_is_algorithm_1_and_completion_only_adds_paths():
    # a tile where greedy stops short: rows 0,1 and columns 0,1 hold the big values
    scores = torch.tensor([[[9.0, 8.0, 1.0, 0.0],
                            [7.0, 6.0, 0.0, 0.0],
                            [0.5, 0.5, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0]]])
    greedy = greedy_keep(scores, 2)
    assert bool((greedy.sum(-1) <= 2).all() and (greedy.sum(-2) <= 2).all())
    assert greedy[0, :2, :2].all()  # the four largest entries fill rows 0,1 and columns 0,1
    done = complete(greedy, scores, 2)
    _assert_exactly_n(done, 2)


def test_enumeration_lists_every_valid_tile():
    assert patterns(4, 2).shape == (90, 16)
    assert patterns(4, 1).shape == (24, 16)
    assert patterns(3, 1).shape == (6, 9)
    assert len({tuple(p.tolist()) for p in patterns(4, 2)}) == 90


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
def test_conv_transposable_masks_hold_per_kernel_tap(solver, layout):
    w = torch.randn(8, 8, 3, 3)
    mask = transposable_mask(w, 2, 4, solver=solver, layout=layout)
    assert mask.shape == w.shape
    assert nm_violation(mask, Pattern(2, 4, True), layout, exact=True) is None
    if layout == "nhwc":
        for i in range(3):
            for j in range(3):
                tap = mask[:, :, i, j]   # C_out x C_in slice: 2 of 4 along both axes
                assert bool((tap.reshape(8, 2, 4).sum(-1) == 2).all())
                assert bool((tap.t().reshape(8, 2, 4).sum(-1) == 2).all())


def test_transposable_quality_reference_and_determinism():
    w = torch.randn(256, 256)
    exact24 = transposable_mask(w, 2, 4, solver="exact")
    assert kept_share(w, exact24) == pytest.approx(0.703, abs=0.006)
    assert kept_share(w, exact24) < kept_share(w, nm_mask(w, 2, 4))
    assert torch.equal(exact24, transposable_mask(w, 2, 4, solver="exact"))
    approx48 = transposable_mask(w, 4, 8, solver="approx")
    assert torch.equal(approx48, transposable_mask(w, 4, 8, solver="approx"))


def test_chunking_does_not_change_results_and_reports_progress():
    w = torch.randn(32, 64)
    seen = []
    a = transposable_mask(w, 2, 4, solver="approx", chunk_tiles=7, on_progress=lambda d, t: seen.append((d, t)))
    assert torch.equal(a, transposable_mask(w, 2, 4, solver="approx"))
    assert seen[-1] == (128, 128) and len(seen) == 19


def test_tile_scores_shape():
    assert tile_scores(torch.randn(8, 16), 4).shape == (8, 4, 4)


@pytest.mark.parametrize("kind", ["randn", "bfloat16", "small integers", "all equal"])
@pytest.mark.parametrize("n, m", [(4, 8), (3, 8), (8, 16), (16, 32)])
def test_exact_on_tiles_gives_the_masks_of_exact_on_the_matrix(kind, n, m):
    # A GPU's weight reaches the compiled solver as a batch of |W| tiles (the tile path), a CPU's as its matrix:
    # the same masks, ties included, so `exact` picks the same mask on either device.
    g = torch.Generator().manual_seed(n * m)
    w = {"randn": lambda: torch.randn(96, 160, generator=g),
         "bfloat16": lambda: torch.randn(96, 160, generator=g).bfloat16().float(),
         "small integers": lambda: torch.randint(-3, 4, (96, 160), generator=g).float(),
         "all equal": lambda: torch.ones(96, 160)}[kind]()
    on_tiles = from_tiles(get_solver("exact").fn(tile_scores(w, m), n), *w.shape)
    assert torch.equal(on_tiles, transposable_mask(w, n, m))


@pytest.mark.gpu
@pytest.mark.parametrize("solver, n, m", [("exact", 2, 4), ("exact", 4, 8), ("exact", 8, 16), ("approx", 2, 4),
                                          ("approx", 4, 8), ("batched", 4, 8)])
def test_solvers_on_cuda_match_cpu(solver, n, m):
    w = torch.randn(64, 64)
    cpu = transposable_mask(w, n, m, solver=solver)
    gpu = transposable_mask(w.cuda(), n, m, solver=solver)
    assert gpu.is_cuda
    assert kept_share(w, gpu.cpu()) == pytest.approx(kept_share(w, cpu), abs=1e-6)
    if solver == "exact" and m > 4:             # the compiled solver on the host, for either device's weight
        assert torch.equal(gpu.cpu(), cpu)


def test_non_finite_weights_are_refused_not_guessed():
    w = torch.randn(8, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        transposable_mask(w, 4, 8)


def test_the_compiled_solver_leaves_torchs_thread_count_as_it_found_it():
    # numba's OpenMP pool once raised torch's intra-op threads from 1 to the core count for the rest
    # of the process, so a compare grid's later cells ran with other float sums than alone.
    from nmtrain.sparsity.solvers import compiled
    if not compiled.available():
        pytest.skip("numba is not installed")
    torch.set_num_threads(1)                   # conftest restores the suite's setting afterwards
    keep = compiled.compiled_keep(torch.rand(3000, 8, 8), 4, exact=True)
    assert keep.shape == (3000, 8, 8)
    assert torch.get_num_threads() == 1
