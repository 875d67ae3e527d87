"""Mask diversity: exact counts checked against brute-force enumeration on tiny blocks."""

import math

import pytest
import torch

from nmtrain.sparsity import Pattern, pattern_diversity, rank, transposable_count, unstructured_diversity
from nmtrain.sparsity.solvers.enumerate import patterns
from nmtrain.sparsity.diversity import DiversityError, _transposable_dp, families, transposable_log10_approx


def _all_masks(rows, cols):
    """Every 0/1 matrix of the shape, as a (2**(rows*cols), rows, cols) tensor."""
    t = rows * cols
    codes = torch.arange(2 ** t).unsqueeze(1)
    bits = (codes >> torch.arange(t)) & 1
    return bits.reshape(-1, rows, cols).bool()


def _brute_count(masks, pattern):
    n, m = pattern.n, pattern.m
    k, rows, cols = masks.shape
    ok = (masks.reshape(k, rows, cols // m, m).sum(-1) == n).all(-1).all(-1)
    if pattern.transposable:
        cm = masks.transpose(1, 2)
        ok &= (cm.reshape(k, cols, rows // m, m).sum(-1) == n).all(-1).all(-1)
    return int(ok.sum())


@pytest.mark.parametrize("rows,cols", [(4, 4), (2, 4), (4, 2), (2, 6), (3, 4)])
def test_counts_match_brute_force(rows, cols):
    masks = _all_masks(rows, cols)
    for density in (0.25, 0.5, 2 / 3, 0.75, 1 / 3):
        fams = families(rows, cols, density)
        kept = density * rows * cols
        if abs(kept - round(kept)) < 1e-9:
            brute = int((masks.sum((1, 2)) == round(kept)).sum())
            assert unstructured_diversity(rows, cols, density).count == brute
        for p in fams:
            assert pattern_diversity(rows, cols, p).count == _brute_count(masks, p), str(p)


def test_families_cover_the_expected_patterns():
    got = {str(p) for p in families(8, 8, 0.5)}
    assert got == {"1:2", "1:2-T", "2:4", "2:4-T", "4:8", "4:8-T"}
    assert {str(p) for p in families(4, 8, 0.25)} == {"1:4", "1:4-T", "2:8"}


@pytest.mark.parametrize("m", [2, 3, 4])
def test_transposable_count_brute_force(m):
    masks = _all_masks(m, m)
    for n in range(0, m + 1):
        brute = int(((masks.sum(1) == n).all(1) & (masks.sum(2) == n).all(1)).sum())
        assert transposable_count(m, n) == brute


@pytest.mark.parametrize("m,n", [(5, 1), (5, 2), (6, 1)])
def test_transposable_count_matches_explicit_enumeration(m, n):
    # the enumerate solver lists every valid tile by backtracking: an independent count
    assert transposable_count(m, n) == patterns(m, n).shape[0]


def test_transposable_count_known_values():
    assert transposable_count(4, 2) == 90
    assert transposable_count(6, 3) == 297200
    assert transposable_count(8, 4) == 116963796250          # docs/methods.md#mask-diversity
    for m in range(2, 8):
        assert transposable_count(m, 1) == math.factorial(m)  # permutation matrices
        for n in range(m + 1):
            assert _transposable_dp(m, n) == _transposable_dp(m, m - n)  # complement, by two counts


def test_paper_table_8x8():
    # Hubara et al. tabulate an 8x8 block at 50%: unstructured > 4:8 > 2:4 > 4:8-T > 2:4-T
    ranked = [d.family for d in rank(8, 8, 0.5)]
    assert ranked == ["unstructured", "4:8", "2:4", "4:8-T", "1:2", "2:4-T", "1:2-T"]
    by = {d.family: d for d in rank(8, 8, 0.5)}
    assert by["unstructured"].count == math.comb(64, 32)
    assert by["2:4"].count == 6 ** 16
    assert by["2:4-T"].count == 90 ** 4
    assert by["4:8"].count == 70 ** 8
    assert by["4:8-T"].log10 == pytest.approx(math.log10(116963796250))


def test_explicit_patterns_and_errors():
    got = rank(8, 8, 0.5, ["2:4-T", "unstructured", Pattern(4, 8)])
    assert [d.family for d in got] == ["unstructured", "4:8", "2:4-T"]
    with pytest.raises(DiversityError, match="C=8 is not a multiple of M=3"):
        rank(8, 8, 0.5, ["2:3"])
    with pytest.raises(DiversityError, match="R=6"):
        pattern_diversity(6, 8, Pattern(2, 4, True))
    with pytest.raises(DiversityError, match="whole number"):
        unstructured_diversity(3, 3, 0.5)


def test_large_counts_stay_exact_and_approximations_are_labelled():
    d = pattern_diversity(64, 64, Pattern(8, 32))
    assert d.exact and d.count == math.comb(32, 8) ** 128 and d.log10 > 100
    big = pattern_diversity(64, 64, Pattern(16, 32, True))
    assert not big.exact and big.count is None
    assert rank(4, 32, 0.5)[-1].family == "1:2-T"


@pytest.mark.parametrize("m,n", [(8, 4), (12, 6), (12, 3)])
def test_asymptotic_estimate_is_close_but_not_exact(m, n):
    exact = math.log10(transposable_count(m, n))
    approx = transposable_log10_approx(m, n)
    assert abs(approx - exact) < 0.03
    assert approx != exact
