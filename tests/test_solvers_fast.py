"""The batched exact solver (greedy warm start + cycle cancelling) and the vectorised greedy.

Exactness is checked tile by tile against the networkx min-cost flow on random and adversarial
tiles (ties, zeros, equal rows, duplicate columns) for M = 4, 8, 16, 32 and many N.
"""

import numpy as np
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


# --- the compiled per-tile solvers (numba, CPU) --------------------------------------------------

from nmtrain.sparsity.solvers import compiled  # noqa: E402
from nmtrain.sparsity.solvers.cycles import quantise  # noqa: E402
from nmtrain.sparsity.solvers.greedy import vectorised_approx  # noqa: E402

compiled_exact = get_solver("compiled").fn


def _assert_compiled_optimal(scores: torch.Tensor, n: int) -> torch.Tensor:
    keep = compiled_exact(scores, n)
    assert compiled.stats["fallback"] == 0
    _assert_valid(keep, n)
    got, want = pruned_magnitude(scores, keep), pruned_magnitude(scores, flow(scores, n))
    top = scores.double().amax((1, 2))
    assert bool(((got - want).abs() <= 1e-9 * (1 + top)).all()), (got - want).abs().max()
    return keep


@pytest.mark.parametrize("m,ns,t", [(4, [1, 2, 3], 20), (6, [2, 3, 5], 10), (8, range(1, 8), 6),
                                    (16, [1, 4, 8, 13, 15], 2), (32, [16, 5, 31], 1)])
def test_compiled_matches_flow_on_random_and_adversarial_tiles(m, ns, t):
    gen = torch.Generator().manual_seed(100 + m)
    scores = torch.cat([torch.rand(4 * t, m, m, generator=gen), torch.randn(t, m, m, generator=gen).abs() ** 3,
                        _adversarial(t, m, gen)])
    for n in ns:
        _assert_compiled_optimal(scores, n)


@settings(max_examples=60, deadline=None)
@given(m=st.sampled_from([4, 6, 8]), data=st.data())
def test_property_compiled_is_optimal_on_small_integer_tiles(m, data):
    n = data.draw(st.integers(1, m - 1))
    values = data.draw(st.lists(st.integers(0, 3), min_size=3 * m * m, max_size=3 * m * m))
    _assert_compiled_optimal(torch.tensor(values, dtype=torch.float32).reshape(3, m, m), n)


def test_compiled_quantises_exactly_like_the_reference():
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float64):
        tile = (torch.rand(8, 8, generator=gen, dtype=dtype) ** 4).numpy()
        q = np.empty((8, 8), np.int64)
        compiled._quantise(tile, q)
        assert np.array_equal(q, quantise(torch.from_numpy(tile).unsqueeze(0))[0].numpy())


def test_compiled_is_deterministic_whatever_the_thread_count():
    scores = tile_scores(torch.randn(512, 512, generator=torch.Generator().manual_seed(2)), 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled_exact(scores, 4), approx(scores, 4)
        torch.set_num_threads(max(2, threads))
        many = compiled_exact(scores.clone(), 4), approx(scores.clone(), 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("m,n", [(4, 2), (8, 4), (16, 8), (8, 1)])
def test_compiled_approx_is_the_vectorised_algorithm(m, n):
    # Same Algorithm 1 tie rule, same completion; on tie-free tiles the two paths give the same masks.
    scores = torch.rand(300, m, m, generator=torch.Generator().manual_seed(m + n))
    assert torch.equal(approx(scores, n), vectorised_approx(scores, n))


def test_compiled_approx_keeps_what_algorithm_1_keeps_when_it_is_complete():
    gen = torch.Generator().manual_seed(4)
    scores = torch.cat([torch.rand(50, 8, 8, generator=gen), torch.randint(0, 3, (50, 8, 8), generator=gen).float()])
    greedy = torch.tensor([_algorithm_1(tile, 4) for tile in scores.tolist()])
    complete = (greedy.sum(1) == 4).all(1) & (greedy.sum(2) == 4).all(1)
    assert 10 < int(complete.sum()) < 100
    assert torch.equal(approx(scores, 4)[complete], greedy[complete])


def test_compiled_exact_beats_or_ties_approx_and_takes_fp16():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(6))
    scores = tile_scores(w, 8)
    exact, rough = compiled_exact(scores, 4), approx(scores, 4)
    assert bool((pruned_magnitude(scores, exact) <= pruned_magnitude(scores, rough) + 1e-9).all())
    assert float(pruned_magnitude(scores, exact).sum()) < float(pruned_magnitude(scores, rough).sum())
    half = tile_scores(w.half(), 8)
    assert torch.equal(compiled_exact(half, 4), compiled_exact(half.float(), 4))


def test_compiled_flagged_tiles_are_solved_by_flow(monkeypatch):
    scores = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(8))
    real = compiled.solve_range

    def flag_two(w_np, n, m, exact, keep, outcome, first, last):
        real(w_np, n, m, exact, keep, outcome, first, last)
        keep[8:24] = False           # tiles 1 and 2 (rows 8..23 of the 48 x 8 view): a "failed" tile's mask
        outcome[1:3] = 1             # is garbage; the wrapper must not keep it
    monkeypatch.setattr(compiled, "solve_range", flag_two)
    keep = compiled_exact(scores, 4)
    assert compiled.stats["fallback"] == 2
    _assert_valid(keep, 4)
    assert torch.allclose(pruned_magnitude(scores, keep), pruned_magnitude(scores, flow(scores, 4)))


def test_exact_uses_the_compiled_path_on_cpu(monkeypatch):
    calls = []
    real = compiled.compiled_solver
    monkeypatch.setattr(compiled, "compiled_solver", lambda s, n: calls.append(n) or real(s, n))
    scores = torch.rand(4, 8, 8)
    _assert_valid(get_solver("exact").fn(scores, 4), 4)
    assert calls == [4]
    get_solver("exact").fn(torch.rand(4, 4, 4), 2)     # 2:4 enumerates (one matmul)
    assert calls == [4]


# --- the matrix path: the compiled kernel reads its tiles from the GEMM view itself ------------------

from nmtrain.sparsity import from_matrix, to_matrix  # noqa: E402


def _tile_path(weight: torch.Tensor, n: int, m: int, solver: str, layout: str = "nhwc") -> torch.Tensor:
    """transposable_mask as it was before the matrix path: |W| tiles through the solver's function."""
    from nmtrain.sparsity.layout import from_tiles
    matrix = to_matrix(weight, layout)
    keep = get_solver(solver).fn(tile_scores(weight, m, layout), n)
    return from_matrix(from_tiles(keep, *matrix.shape), weight.shape, layout)


@pytest.mark.parametrize("shape,layout", [((64, 96), "nhwc"), ((32, 16, 3, 3), "nhwc"), ((32, 16, 3, 3), "flatten")])
@pytest.mark.parametrize("solver", ["exact", "approx", "compiled"])
def test_the_matrix_path_is_the_tile_path_bit_for_bit(shape, layout, solver):
    gen = torch.Generator().manual_seed(len(shape) + len(solver))
    w = torch.randn(shape, generator=gen)
    tied = torch.randint(-2, 3, shape, generator=gen).float()           # many equal magnitudes, signed zeros
    for weight in (w, tied, w.half()):
        for n, m in ((4, 8), (2, 8), (8, 16), (3, 4)):
            if shape[0] % m or (shape[1] % m):
                continue
            info = get_solver(solver)
            # every one reads the matrix on a CPU (exact's enumerable patterns: the compiled enumeration)
            assert info.matrix(to_matrix(weight, layout), n, m) is not None
            got = transposable_mask(weight, n, m, solver=solver, layout=layout)
            assert torch.equal(got, _tile_path(weight, n, m, solver, layout)), (solver, n, m, weight.dtype)
            chunked = transposable_mask(weight, n, m, solver=solver, layout=layout, chunk_tiles=5)
            assert torch.equal(got, chunked)


def test_the_matrix_path_sends_flagged_tiles_to_flow(monkeypatch):
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    real = compiled.solve_range

    def flag_two(w_np, n, m, exact, keep, outcome, first, last):
        real(w_np, n, m, exact, keep, outcome, first, last)
        for t in (1, 4):
            if first <= t < last:
                keep[(t // 3) * 8:(t // 3) * 8 + 8, (t % 3) * 8:(t % 3) * 8 + 8] = False    # garbage
                outcome[t] = 1
    monkeypatch.setattr(compiled, "solve_range", flag_two)
    keep = transposable_mask(w, 4, 8, solver="exact")
    assert compiled.stats["fallback"] == 2
    scores = tile_scores(w, 8)
    mine = tile_scores(keep.float(), 8) > 0
    _assert_valid(mine, 4)
    assert torch.allclose(pruned_magnitude(scores, mine), pruned_magnitude(scores, flow(scores, 4)))


def test_the_matrix_path_refuses_nan_and_inf_and_serves_cpu_only():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(16, 16)
        w[9, 3] = bad
        for solver in ("exact", "approx", "compiled"):
            with pytest.raises(ValueError, match="NaN/Inf"):
                transposable_mask(w, 4, 8, solver=solver)
    assert compiled.on_matrix(torch.randn(8, 8, device="meta"), 4, 8, exact=True) is None
    assert compiled.on_matrix(torch.randn(64, 64), 4, 64, exact=True) is None          # M > MAX_M: tiles


@pytest.mark.skipif(not compiled.available(), reason="needs numba")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_warm_up_runs_the_path_transposable_mask_takes(monkeypatch, dtype):
    # exact 2:4's matrix path is the compiled enumeration: warming up the tile function would leave its
    # first compile (or cache load) inside the first layer's time
    from nmtrain.sparsity.solvers import enumerate as enumeration
    from nmtrain.sparsity.solvers import warm_up
    calls = []
    real = enumeration._enumerate_range

    def counting(*args):
        calls.append(args[0].dtype)
        real(*args)

    monkeypatch.setattr(enumeration, "_enumerate_range", counting)
    warm_up("exact", 2, 4, dtype)
    assert len(calls) == 1       # the kernel saw the weight's own type (half precision upcast to float32)
    assert str(calls[0]) == ("float64" if dtype == torch.float64 else "float32")
