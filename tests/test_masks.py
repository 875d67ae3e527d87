"""Row-wise N:M and unstructured masks, and the validity checker (with property tests)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtrain.sparsity import Pattern, kept_share, nm_mask, nm_violation, to_matrix, unstructured_mask

nm_pairs = st.integers(2, 9).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))


def _weights(kind: str, shape, gen):
    if kind == "randn":
        return torch.randn(shape, generator=gen)
    if kind == "ties":  # few distinct values: ties everywhere
        return torch.randint(-2, 3, shape, generator=gen).float()
    if kind == "zeros":
        return torch.zeros(shape)
    w = torch.randn(shape, generator=gen)
    return w * (torch.rand(shape, generator=gen) < 0.3)  # mostly zeros


@settings(max_examples=60, deadline=None)
@given(nm=nm_pairs, rows=st.integers(1, 6), groups=st.integers(1, 4), kind=st.sampled_from(["randn", "ties", "zeros", "sparse"]),
       seed=st.integers(0, 2**16))
def test_rowwise_mask_keeps_exactly_n_per_group_linear(nm, rows, groups, kind, seed):
    n, m = nm
    w = _weights(kind, (rows, groups * m), torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert nm_violation(mask, Pattern(n, m), exact=True) is None
    # the kept entries are the n largest of each group: nothing pruned beats anything kept
    g = w.abs().reshape(rows, groups, m)
    km = mask.reshape(rows, groups, m)
    min_kept = torch.where(km, g, torch.inf).amin(-1)
    max_pruned = torch.where(~km, g, -torch.inf).amax(-1)
    assert bool((min_kept >= max_pruned).all())


@settings(max_examples=40, deadline=None)
@given(nm=nm_pairs, layout=st.sampled_from(["nhwc", "flatten"]), k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_rowwise_mask_conv_layouts(nm, layout, k, seed):
    n, m = nm
    w = torch.randn(3, 2 * m, k, k, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m, layout)
    assert nm_violation(mask, Pattern(n, m), layout, exact=True) is None
    assert int(mask.sum()) == w.numel() * n // m


def test_nhwc_and_flatten_differ_on_convs():
    w = torch.randn(4, 8, 3, 3)
    a, b = nm_mask(w, 2, 4, "nhwc"), nm_mask(w, 2, 4, "flatten")
    assert nm_violation(a, Pattern(2, 4), "nhwc") is None
    assert nm_violation(b, Pattern(2, 4), "flatten") is None
    assert nm_violation(a, Pattern(2, 4), "flatten") is not None  # a nhwc mask is not N:M in flatten order


def test_checker_reports_the_first_bad_group():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    msg = nm_violation(mask, Pattern(2, 4))
    assert "row 0, columns 4..7" in msg and "keep 3" in msg and "at most 2" in msg
    under = torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert nm_violation(under, Pattern(2, 4)) is None            # hardware-valid: at most N
    assert "exactly 2" in nm_violation(under, Pattern(2, 4), exact=True)


def test_checker_on_weights_counts_nonzeros_and_columns_for_t():
    w = torch.zeros(4, 4)
    w[0, :2] = 1.0
    w[1, :2] = 1.0
    w[2, :2] = 1.0  # column 0 keeps 3 of 4
    assert nm_violation(w, Pattern(2, 4)) is None
    assert "column 0" in nm_violation(w, Pattern(2, 4, True))


def test_unstructured_mask_and_kept_share():
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    mask = unstructured_mask(w, 0.5)
    assert mask.tolist() == [[True, True, False, False]]
    assert kept_share(w, mask) == pytest.approx(7 / 10)
    assert kept_share(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool)) == 1.0


def test_half_precision_weights():
    w = torch.randn(8, 16).half()
    assert nm_violation(nm_mask(w, 2, 4), Pattern(2, 4), exact=True) is None


def test_rowwise_beats_transposable_quality_reference():
    # docs/methods.md#transposable-masks: random Gaussian weights keep ~0.745 of |W| at row-wise 2:4, ~0.769 at 4:8
    w = torch.randn(512, 512)
    assert kept_share(w, nm_mask(w, 2, 4)) == pytest.approx(0.745, abs=0.005)
    assert kept_share(w, nm_mask(w, 4, 8)) == pytest.approx(0.769, abs=0.005)
    assert to_matrix(w).shape == w.shape
