"""The fused CPU kernels of a training step (`sparsity.fused`) against the tensor formulas they replace, bit
for bit: SR-STE's decay added to a gradient (`methods.base.pruned_decay`, then ``add_``) and the bound on
pruned weights (`methods.transposable.bound_pruned`'s tensor path), on random, signed-zero and
non-finite inputs; the masked weight ``W * mask`` and its masked gradient against autograd's own product; the
row-wise N:4 mask against topk's, ties included, with the masked or PGF's decayed weight made in the same pass;
AdamW's denominator against torch's; and where they do not serve, nothing changed and False (None)."""

import itertools
import math

import numpy as np
import pytest
import torch

from nmtrain.experiments.methods.base import pruned_decay
from nmtrain.experiments.methods.transposable import bound_pruned
from nmtrain.sparsity import grouped, nm_mask
from nmtrain.sparsity.layout import from_matrix, to_matrix
from nmtrain.sparsity import mvue as mvue_module
from nmtrain.sparsity import nm as nm_module
from nmtrain.experiments.methods.sste import scaled_soft_threshold, soft_threshold
from nmtrain.experiments.methods.ste import masked_weight, product, ste_mask, ste_nm, straight_through
from nmtrain.sparsity.errors import SparsityError
from nmtrain.sparsity.fused import (MAX_ENTRIES, adam_denominator, add_masked_decay_, add_pruned_decay_, clamp_pruned_,
                                    clamp_pruned_masked_, bimask_operands4, column_nm4_mask,
                                    column_nm4_masked, decayed, masked, mvue24_runs, mvue24_sample, njit, nm4_decayed,
                                    nm4_mask, nm4_masked, soft_threshold4)
from nmtrain.sparsity.nm import nm_mask_and_decayed, nm_mask_and_product

pytestmark = pytest.mark.skipif(njit is None, reason="the fused kernels need numba")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits: equal bits, not equal values (-0.0 is not +0.0, NaN is itself)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    w.view(-1)[::7] = 0.0
    w.view(-1)[3::11] = -0.0
    grad = torch.randn(shape, generator=g, dtype=dtype)
    grad.view(-1)[::5] = -0.0
    grad.view(-1)[1::13] = 0.0
    keep = torch.rand(shape, generator=g) < 0.5
    return w, grad, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 64), (16, 8, 3, 3)])
def test_fused_decay_is_the_formula_bit_for_bit(dtype, shape):
    for seed, decay in ((0, 2e-4), (1, 0.3), (2, 1e-30)):
        w, grad, keep = _inputs(shape, dtype, seed)
        w.view(-1)[5] = float("nan")
        w.view(-1)[9] = float("inf")
        want = grad.clone().add_(pruned_decay(w, keep, decay))
        got = grad.clone()
        assert add_pruned_decay_(got, w, keep, decay)
        assert torch.equal(_bits(got), _bits(want))


def _bound_formula(w: torch.Tensor, keep: torch.Tensor, m: int, layout: str) -> torch.Tensor:
    """`bound_pruned`'s tensor path, on a copy."""
    out = w.clone()
    wg, dim = grouped(out, m, layout)
    eg, _ = grouped(keep, m, layout)
    cap = torch.where(eg, wg.abs(), torch.zeros((), dtype=wg.dtype)).amax(dim, keepdim=True)
    wg.clamp_(-cap, cap)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, layout", [((32, 64), "nhwc"), ((16, 8, 3, 3), "nhwc"), ((16, 8, 3, 3), "flatten")])
@pytest.mark.parametrize("m, n", [(4, 2), (8, 2)])
def test_fused_bound_is_the_formula_bit_for_bit(dtype, shape, layout, m, n):
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(shape, generator=g, dtype=dtype)
    keep = nm_mask(w, n, m, layout)
    w = w * torch.where(keep, 1.0, 5.0).to(dtype)          # pruned weights outgrow the kept ones
    w[~keep & (torch.rand(shape, generator=g) < 0.1)] = -0.0
    w[~keep & (torch.rand(shape, generator=g) < 0.05)] = float("inf")   # clamped to the cap either way
    w[~keep & (torch.rand(shape, generator=g) < 0.05)] = -float("inf")
    want = _bound_formula(w, keep, m, layout)
    got = w.clone()
    assert clamp_pruned_(got, keep, m, layout)
    assert torch.equal(_bits(got), _bits(want))
    assert not torch.equal(_bits(got), _bits(w))              # it did clamp
    # with the masked weight made in the same pass: the same clamp, and W ⊙ keep of the clamped weight, the
    # product the next forward would make (-0.0 kept, the pruned Infs clamped first: zeros, not NaN)
    both = w.clone()
    made = clamp_pruned_masked_(both, keep, m, layout)
    assert torch.equal(_bits(both), _bits(want))
    assert torch.equal(_bits(made), _bits(want * keep)) and not made.isnan().any()


@pytest.mark.parametrize("shape, layout", [((8, 16), "nhwc"), ((8, 4, 2, 2), "nhwc")])   # one pass; `_bound`
@pytest.mark.parametrize("special", ["kept all zero", "kept NaN", "pruned NaN"])
def test_a_nan_or_a_group_whose_cap_is_zero_is_left_to_the_formula(special, shape, layout):
    """Such a group is the formula's (torch's clamp decides NaN bits and signed zeros its own way): the kernel
    says False and leaves it as it was, and the formula run after it (`bound_pruned`) gives, bit for bit, what
    the formula alone gives, whatever the kernel did to the other groups."""
    w = torch.randn(shape)
    keep = nm_mask(w, 2, 4, layout)
    w = w * torch.where(keep, 1.0, 5.0)                     # pruned weights outgrow the kept ones
    wg, dim = grouped(w, 4, layout)
    eg, _ = grouped(keep, 4, layout)
    at = tuple(slice(None) if i == dim else (3 if i == 0 else 0) for i in range(wg.dim()))     # one group
    if special == "kept all zero":          # every kept weight of the group
        wg[at] = torch.where(eg[at], torch.tensor(0.0), wg[at])
    else:
        wg[at] = torch.where(eg[at] == (special == "kept NaN"), torch.tensor(float("nan")), wg[at])
    want = _bound_formula(w, keep, 4, layout)
    for call in (clamp_pruned_, clamp_pruned_masked_):
        got = w.clone()
        assert call(got, keep, 4, layout) in (False, None)
        assert torch.equal(_bits(grouped(got, 4, layout)[0][at]), _bits(wg[at]))       # the group as it was
        bound_pruned(got, keep, 4, layout)          # the kernel again, then the formula
        assert torch.equal(_bits(got), _bits(want))
        assert not torch.equal(_bits(got), _bits(w))        # the other groups were clamped


@pytest.mark.parametrize("case", ["float16", "not contiguous", "too large", "mask of another shape", "float mask",
                                  "gradient in a graph"])
def test_where_the_kernels_do_not_serve_nothing_changes(case):
    w, grad, keep = _inputs((8, 16), torch.float32, 3)
    if case == "float16":
        w, grad = w.half(), grad.half()
    elif case == "not contiguous":
        w, grad, keep = w.t(), grad.t(), keep.t()
    elif case == "too large":
        w, grad, keep = (torch.zeros(MAX_ENTRIES + 4), torch.zeros(MAX_ENTRIES + 4),
                         torch.zeros(MAX_ENTRIES + 4, dtype=torch.bool))
        w, grad, keep = w.view(-1, 4), grad.view(-1, 4), keep.view(-1, 4)
    elif case == "mask of another shape":
        keep = keep.reshape(16, 8)
    elif case == "gradient in a graph":      # backward(create_graph=True): the gradient requires grad
        grad = grad.requires_grad_()
    else:
        keep = keep.float()
    before_w, before_g = w.clone(), grad.detach().clone()
    assert not add_pruned_decay_(grad, w, keep, 0.1)
    if case != "gradient in a graph":       # the bound takes no gradient: there it serves
        assert not clamp_pruned_(w, keep, 4, "nhwc")
        assert clamp_pruned_masked_(w, keep, 4, "nhwc") is None
    assert torch.equal(w, before_w) and torch.equal(grad.detach(), before_g)


def test_the_kernels_count_as_in_place_changes():
    # written through numpy: the version counters still move (autograd's checks, accel's operand cache)
    w, grad, keep = _inputs((8, 16), torch.float32, 4)
    keep = nm_mask(w, 2, 4)
    w = w * torch.where(keep, 1.0, 5.0)
    versions = w._version, grad._version
    assert clamp_pruned_(w, keep, 4, "nhwc") and add_pruned_decay_(grad, w, keep, 0.1)
    assert w._version > versions[0] and grad._version > versions[1]
    version = w._version
    assert clamp_pruned_masked_(w, keep, 4, "nhwc") is not None and w._version > version


@pytest.mark.parametrize("shape, layout", [((4, 6), "nhwc"), ((4, 6, 1, 1), "nhwc"), ((4, 8), "nchw")])
def test_the_bound_leaves_what_has_no_groups_of_m_to_the_formula(shape, layout):
    w = torch.randn(shape)
    before = w.clone()
    assert not clamp_pruned_(w, torch.ones(shape, dtype=torch.bool), 4, layout)
    assert torch.equal(w, before)


# ------------------------------------------------------------------------------------------------
# Row-wise N:4 masks: what topk keeps, ties included


def _topk_mask(matrix: torch.Tensor, n: int) -> torch.Tensor:
    groups = matrix.abs().reshape(matrix.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(matrix.shape)


# PGF's mask values: 0-dim float64 CPU tensors (its exp(-c t): 1 at the start, 0 at the end, one in between whose
# float32 rounding is not exact)
PGF_VALUES = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 0.0, math.exp(-0.37))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "random, a few ties", "integers (ties)", "signed zeros and ones",
                                  "infinities and denormals", "every weak order"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_n4_kernel_keeps_what_topk_keeps(dtype, kind, n):
    g = torch.Generator().manual_seed(n)
    if kind.startswith("random"):
        matrix = torch.randn(64, 128, generator=g, dtype=dtype)
        if kind == "random, a few ties":        # ties in some blocks of the arithmetic ranking, none in others
            matrix.view(-1)[::1999] = 0.5
            matrix.view(-1)[1::1999] = -0.5
    elif kind == "integers (ties)":
        matrix = torch.randint(-2, 3, (64, 128), generator=g).to(dtype)
    elif kind == "signed zeros and ones":
        matrix = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)[torch.randint(0, 4, (64, 128), generator=g)]
    elif kind == "infinities and denormals":    # ties at the top (Inf) and at the bottom (the smallest denormal)
        tiny = torch.finfo(dtype).smallest_normal / 4
        values = torch.tensor([math.inf, -math.inf, tiny, -tiny, 1.0, -1.0, 0.0], dtype=dtype)
        matrix = values[torch.randint(0, len(values), (64, 128), generator=g)]
    else:                           # one group per assignment of ranks 0..3: every order, every tie
        matrix = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=dtype).reshape(16, 64)
    keep = nm4_mask(matrix, n)
    assert keep is not None and torch.equal(keep, _topk_mask(matrix, n))
    both = nm4_masked(matrix, n)            # the mask and the masked weight, in one pass
    assert both is not None and torch.equal(both[0], keep) and torch.equal(_bits(both[1]), _bits(matrix * keep))
    for value in PGF_VALUES:                # the mask and PGF's decayed weight, in one pass
        both = nm4_decayed(matrix, n, value)
        assert both is not None and torch.equal(both[0], keep)
        assert torch.equal(_bits(both[1]), _bits(torch.where(keep, matrix, matrix * value)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random, a few ties", "integers (ties)", "signed zeros and ones"])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 12, 5, 5), (8, 4, 1, 3), (16, 8, 1, 1)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_an_nhwc_conv_is_masked_where_it_lies_as_topk_masks_its_gemm_view(dtype, kind, shape, n):
    """The kernel reads an nhwc conv's groups along C_in where they lie (4 entries kh*kw apart) and writes the
    mask and the product in the weight's own order: the same as topk on the GEMM view, ties included."""
    g = torch.Generator().manual_seed(n)
    if kind == "random, a few ties":
        w = torch.randn(shape, generator=g, dtype=dtype)
        w.view(-1)[::97] = 0.5
        w.view(-1)[1::97] = -0.5
    elif kind == "integers (ties)":
        w = torch.randint(-2, 3, shape, generator=g).to(dtype)
    else:
        w = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)[torch.randint(0, 4, shape, generator=g)]
    expected = from_matrix(_topk_mask(to_matrix(w, "nhwc"), n), shape, "nhwc")
    keep = nm4_mask(w, n, "nhwc")
    assert keep is not None and keep.shape == w.shape and torch.equal(keep, expected)
    both = nm4_masked(w, n, "nhwc")
    assert both is not None and torch.equal(both[0], expected) and both[1].is_contiguous()
    assert torch.equal(_bits(both[1]), _bits(w * expected))
    for value in PGF_VALUES:
        both = nm4_decayed(w, n, value, "nhwc")
        assert both is not None and torch.equal(both[0], expected) and both[1].is_contiguous()
        assert torch.equal(_bits(both[1]), _bits(torch.where(expected, w, w * value)))


def test_a_channels_last_conv_is_masked_through_its_gemm_view():
    w = torch.randint(-2, 3, (16, 8, 3, 3), generator=torch.Generator().manual_seed(5)).float()
    last = w.to(memory_format=torch.channels_last)
    assert nm4_mask(last, 2, "nhwc") is None            # not where the kernel reads it; nm_mask takes the GEMM view
    keep, out = nm_mask_and_product(last, 2, 4, "nhwc")
    expected = from_matrix(_topk_mask(to_matrix(w, "nhwc"), 2), w.shape, "nhwc")
    assert torch.equal(nm_mask(last, 2, 4, "nhwc"), expected) and torch.equal(keep, expected)
    assert torch.equal(_bits(out), _bits(w * expected))


@pytest.mark.parametrize("shape", [(64, 128, 4, 4), (128, 128, 3, 3)])     # 2**17 entries (where it lies), more
def test_a_large_nhwc_conv_is_masked_as_topk_masks_it_on_either_side_of_the_size_limit(shape):
    w = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(6)).float()
    assert (w.numel() <= nm_module._AS_IT_LIES) == (shape[0] == 64)
    expected = from_matrix(_topk_mask(to_matrix(w, "nhwc"), 2), shape, "nhwc")
    keep, out = nm_mask_and_product(w, 2, 4, "nhwc")
    assert torch.equal(nm_mask(w, 2, 4, "nhwc"), expected) and torch.equal(keep, expected)
    assert torch.equal(_bits(out), _bits(w * expected)) and out.is_contiguous()


def test_an_nhwc_conv_with_a_nan_is_left_to_topk():
    w = torch.randn(8, 8, 3, 3)
    w[3, 5, 1, 2] = float("nan")
    assert nm4_mask(w, 2, "nhwc") is None and nm4_masked(w, 2, "nhwc") is None
    assert nm4_mask(torch.randn(8, 6, 3, 3), 2, "nhwc") is None       # C_in not a multiple of 4


@pytest.mark.parametrize("shape, layout", [((32, 64), "nhwc"), ((16, 8, 3, 3), "nhwc"), ((16, 8, 3, 3), "flatten"),
                                           ((8, 12), "nhwc")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_mask_and_its_product_together_are_the_two_calls(shape, layout, dtype):
    """`nm_mask_and_product`: the kernel where it serves (float32, M = 4), else `nm_mask` and the product."""
    w = _specials(torch.randn(shape, generator=torch.Generator().manual_seed(2)))[:, :].to(dtype)
    w.view(-1)[0] = 0.3                     # no NaN: topk ranks it its own way, and the kernel declines it
    for n, m in ((2, 4), (1, 4), (3, 4), (2, 8)) if shape[-1] % 8 == 0 or len(shape) == 4 else ((2, 4),):
        if len(shape) == 4 and m == 8:
            continue
        keep, out = nm_mask_and_product(w, n, m, layout)
        expected = nm_mask(w, n, m, layout)
        assert torch.equal(keep, expected) and out.is_contiguous() and out.shape == w.shape
        assert torch.equal(out.view(torch.int16 if dtype == torch.float16 else torch.int32),
                           (w * expected).view(torch.int16 if dtype == torch.float16 else torch.int32))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of any float type, in row-major order (whatever ``t``'s memory order)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("shape, layout", [((32, 64), "nhwc"), ((16, 8, 3, 3), "nhwc"), ((16, 8, 3, 3), "flatten"),
                                           ((8, 12), "nhwc"), ((128, 128, 3, 3), "nhwc")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_mask_and_pgfs_decayed_weight_together_are_the_two_formulas(shape, layout, dtype):
    """`nm_mask_and_decayed`: the kernel where it serves (M = 4, a 0-dim value; a large conv through its GEMM view,
    a channels-last one too), else `nm_mask` and ``where(mask, W, W * value)``; random and tied weights, signed
    zeros, a NaN (the kernel declines it), values as tensors and as floats."""
    w = _specials(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    w.view(-1)[::7] = 0.5                   # ties
    w = w.to(dtype)
    weights = [w, w.to(memory_format=torch.channels_last)] if w.dim() == 4 else [w]
    nan = w.clone()
    nan.view(-1)[5] = float("nan")
    for weight in weights + [nan]:
        for n, m in ((2, 4), (1, 4), (3, 4), (2, 8)):
            if shape[-1 if weight.dim() == 2 else 1] % m:
                continue
            for value in PGF_VALUES + [0.25]:
                keep, out = nm_mask_and_decayed(weight, n, m, value, layout)
                expected = nm_mask(weight, n, m, layout)
                assert torch.equal(keep, expected) and out.shape == weight.shape
                assert torch.equal(_raw(out), _raw(torch.where(expected, weight, weight * value)))
    assert nm4_decayed(w, 2, torch.tensor([0.5], dtype=torch.float64)) is None      # not a 0-dim value


def test_a_shape_that_does_not_fit_is_refused_on_every_call():
    for _ in range(2):                      # the fit is checked once per shape; a refusal is never remembered
        with pytest.raises(SparsityError, match="not a multiple of M=4"):
            nm_mask(torch.randn(8, 6), 2, 4)
        with pytest.raises(SparsityError, match="not a multiple of M=4"):
            nm_mask_and_product(torch.randn(8, 6), 2, 4)
        with pytest.raises(SparsityError):
            nm_mask(torch.randn(8, 8), 5, 4)


def test_ste_nm_is_ste_mask_of_nm_mask_forward_and_backward():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    for layout_shape in ((64, 32), (32, 16, 2, 2)):
        a = w.reshape(layout_shape).clone().requires_grad_()
        b = a.detach().clone().requires_grad_()
        out, mask = ste_nm(a, 2, 4, "nhwc")
        expected_mask = nm_mask(b.detach(), 2, 4, "nhwc")
        expected = ste_mask(b, expected_mask)
        assert torch.equal(mask, expected_mask) and not mask.requires_grad
        assert torch.equal(_bits(out.detach()), _bits(expected.detach()))
        out.backward(grad.reshape(layout_shape))
        expected.backward(grad.reshape(layout_shape))
        assert torch.equal(a.grad, b.grad) and torch.equal(a.grad, grad.reshape(layout_shape))  # straight through




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 16), (16, 8, 2, 2)])
def test_straight_through_is_the_functions_values_and_gradient_by_autograds_own_node(dtype, shape):
    # random and tied weights (zeros of both signs, equal magnitudes), gradients with zeros of both signs
    w, grad, _ = _inputs(shape, dtype, 11)
    w.view(-1)[5::9] = 0.75
    w.view(-1)[6::9] = -0.75
    keep, made = nm_mask_and_product(w, 2, 4, "nhwc")
    a, b, c = (w.clone().requires_grad_() for _ in range(3))
    joined = straight_through(a, made)
    # autograd's view node, no Python Function's: what a layer's backward no longer pays; made's own storage, no copy
    assert type(joined.grad_fn).__name__ == "ViewBackward0" and joined.requires_grad
    assert joined.data_ptr() == made.data_ptr() and joined.stride() == made.stride()
    by_ste_nm, mask = ste_nm(b, 2, 4, "nhwc")
    by_ste_mask = ste_mask(c, keep, made=made)
    assert torch.equal(mask, keep)
    for out in (by_ste_nm, by_ste_mask, ste_nm(a, 2, 4, "nhwc", (keep, joined))[0], ste_mask(a, keep, made=joined)):
        assert torch.equal(_bits(out.detach()), _bits(joined.detach()))
    assert ste_nm(a, 2, 4, "nhwc", (keep, joined))[0] is joined and ste_mask(a, keep, made=joined) is joined
    for leaf, out in ((a, joined), (b, by_ste_nm), (c, by_ste_mask)):
        out.backward(grad)
        assert torch.equal(_bits(leaf.grad), _bits(grad))        # straight through, bit for bit
    # with SR-STE's decay in the backward the Function runs, even on a joined operand
    d = w.clone().requires_grad_()
    ste_mask(d, keep, 2e-4, made=straight_through(d, made)).backward(grad)
    assert torch.equal(d.grad, grad + 2e-4 * (w * ~keep))


def test_straight_through_leaves_the_function_where_it_cannot_serve():
    small = torch.randn(16, 32, requires_grad=True)
    made = nm_mask_and_product(small, 2, 4, "nhwc")[1]
    joined = straight_through(small, made)
    assert joined.requires_grad and straight_through(small, joined) is joined      # joined once
    with torch.no_grad():                                   # nothing records a gradient
        assert straight_through(small, made) is made
    frozen = small.detach()                                 # a weight that takes none
    assert straight_through(frozen, made) is made
    # any size: a view and a pointer, whatever the layer holds (the clone of before stopped at torch's grain)
    large = torch.randn(1024, 64, requires_grad=True)
    assert straight_through(large, nm_mask_and_product(large, 2, 4, "nhwc")[1]).requires_grad


def test_straight_through_refuses_a_weight_changed_in_place_before_its_backward():
    """The joined weight is a view of the weight for autograd: an in-place change of the weight between the
    forward and the backward is refused, as for any view saved for the backward (the Function would have
    passed the gradient of the product made before the change without a word)."""
    w = torch.randn(16, 32, requires_grad=True)
    x = torch.randn(4, 32, requires_grad=True)
    out = torch.nn.functional.linear(x, straight_through(w, nm_mask_and_product(w, 2, 4, "nhwc")[1]))
    with torch.no_grad():
        w.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_ste_nms_backward_makes_no_gradient_for_its_mask():
    # E is an output that takes no gradient: autograd must not fill a zero tensor of E's shape for it at every
    # backward (it did, until `_STENM` asked it not to materialise one)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out, _ = ste_nm(w, 2, 4, "nhwc")
    loss = (out * 2.0).sum()
    with Ops() as ops:
        loss.backward()
    assert ops.seen and not [op for op in ops.seen if "zero" in op or "fill" in op], ops.seen
    assert torch.equal(w.grad, torch.full_like(w, 2.0))
@pytest.mark.parametrize("shape, layout", [((32, 64), "nhwc"), ((16, 8, 3, 3), "nhwc"), ((16, 8, 3, 3), "flatten")])
def test_nm_mask_at_m4_is_topks_mask_in_every_layout(monkeypatch, shape, layout):
    w = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(1)).float()
    fast = nm_mask(w, 2, 4, layout)
    monkeypatch.setattr(nm_module, "nm4_mask", lambda *args: None)     # the topk path
    assert torch.equal(fast, nm_mask(w, 2, 4, layout))


def test_the_n4_kernel_leaves_nan_and_what_it_does_not_serve_to_topk():
    matrix = torch.randn(8, 16)
    matrix[2, 5] = float("nan")
    assert nm4_mask(matrix, 2) is None
    assert nm4_mask(torch.randn(8, 16).half(), 2) is None
    assert nm4_mask(torch.randn(16, 8).t(), 2) is None


def _specials(t: torch.Tensor) -> torch.Tensor:
    flat = t.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-40], dtype=t.dtype)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 16), (384, 128), (16, 8, 3, 3), (4096, 12)])
def test_the_fused_product_is_the_product_bit_for_bit(dtype, shape):
    w, _, keep = _inputs(shape, dtype, 5)
    w = _specials(w)
    out = masked(w, keep)
    assert out is not None and out.dtype == dtype and out.shape == w.shape
    assert torch.equal(_bits(out), _bits(w * keep))
    assert masked(w, keep.to(dtype)) is None             # a persistent mask's cast: torch's product serves


@pytest.mark.parametrize("case", ["float16", "not contiguous", "too large", "mask of another shape",
                                  "float mask", "requires grad"])
def test_where_the_fused_product_does_not_serve_the_tensor_product_does(case):
    w, _, keep = _inputs((8, 16), torch.float32, 6)
    if case == "float16":
        w = w.half()
    elif case == "not contiguous":
        w, keep = w.t(), keep.t()
    elif case == "too large":
        w, keep = torch.ones(MAX_ENTRIES + 4), torch.ones(MAX_ENTRIES + 4, dtype=torch.bool)
    elif case == "mask of another shape":
        keep = keep.reshape(16, 8)
    elif case == "float mask":
        keep = keep.float()
    else:
        w.requires_grad_()
    assert masked(w, keep) is None
    if case != "mask of another shape":
        assert torch.equal(product(w.detach(), keep), w.detach() * keep)


@pytest.mark.parametrize("shape", [(8, 16), (384, 128)])
@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_masked_weight_and_ste_mask_give_autograds_values_and_gradients(shape, mask_type):
    w, grad, keep = _inputs(shape, torch.float32, 7)
    mask = keep if mask_type == "bool" else keep.float()
    for fn, expected_grad in ((masked_weight, grad * mask), (ste_mask, grad)):
        leaf = w.clone().requires_grad_()
        out = fn(leaf, mask)
        assert torch.equal(_bits(out.detach()), _bits(w * mask))
        out.backward(grad)
        assert torch.equal(_bits(leaf.grad), _bits(expected_grad))
    # autograd's reference, ``W * mask``, for the masked gradient itself
    leaf = w.clone().requires_grad_()
    (leaf * mask).backward(grad)
    reference = leaf.grad
    leaf = w.clone().requires_grad_()
    masked_weight(leaf, mask).backward(grad)
    assert torch.equal(_bits(leaf.grad), _bits(reference))


def test_a_graph_building_backward_keeps_the_masked_product_differentiable():
    # create_graph=True: the masked gradient is itself differentiated (a gradient penalty), so it stays autograd's
    w, _, keep = _inputs((384, 128), torch.float32, 8)
    x = torch.randn(4, 128)
    for fn in (masked_weight, lambda a, b: a * b):
        leaf = w.clone().requires_grad_()
        (g,) = torch.autograd.grad((x @ fn(leaf, keep).t()).square().sum(), leaf, create_graph=True)
        g.square().sum().backward()
        if fn is masked_weight:
            ours = leaf.grad
        else:
            assert torch.equal(ours, leaf.grad)


def _backward_mask_formula(fmask: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor, n: int) -> torch.Tensor:
    """`methods.bimask.backward_mask`'s tensor formula at M = 4, transcribed."""
    rows, cols = scores.shape
    s = (scores * fmask)[perm].reshape(rows // 4, 4, cols)
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(n, dim=1).indices, True).reshape(rows, cols)
    keep &= fmask[perm]
    out = torch.empty_like(keep)
    out[perm] = keep
    return out


N4_KINDS = ["random", "random, a few ties", "integers (ties)", "signed zeros and infinities", "every weak order"]


def _n4_weights(kind: str, dtype: torch.dtype, shape: tuple[int, int], seed: int, along_columns: bool) -> torch.Tensor:
    """Weights for the N:4 kernels: random, small integers (ties), signed zeros and ±Inf, or every one of the
    256 rank assignments of 4 values (with random signs), laid along the rows or along the columns."""
    g = torch.Generator().manual_seed(seed)
    if kind == "every weak order":
        ranks = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=dtype)          # (256, 4)
        w = ranks.t().repeat(2, 1) if along_columns else ranks.reshape(16, 64)
        return w * torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    if kind == "integers (ties)":
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    w = torch.randn(shape, generator=g, dtype=dtype)
    if kind == "random, a few ties":        # equal values in some groups (rows 0, 9, 18, ... of a column meet in
        if along_columns:                   # some permuted groups), none in most
            w[::9, ::3] = 0.5
        else:
            w.view(-1)[::199] = 0.5
            w.view(-1)[1::199] = -0.5
    if kind == "signed zeros and infinities":
        w.view(-1)[::5] = 0.0
        w.view(-1)[1::7] = -0.0
        w.view(-1)[2::17] = float("inf")
        w.view(-1)[3::23] = -float("inf")
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", N4_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_column_n4_kernel_is_bimasks_backward_mask_bit_for_bit(dtype, kind, n):
    w = _n4_weights(kind, dtype, (64, 40), n, along_columns=True)
    scores = w.abs()
    for seed in range(3):
        fmask = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) < 0.6
        if kind == "signed zeros and infinities":
            fmask.view(-1)[2::17] = True     # an Inf times a pruned 0 is NaN: left to the formula below
            fmask.view(-1)[3::23] = True
        perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(10 + seed))
        expected = _backward_mask_formula(fmask, scores, perm, n)
        fused = column_nm4_mask(scores, fmask, perm, n)
        assert fused is not None and torch.equal(fused, expected)
        both = column_nm4_masked(w, fmask, perm, n)             # from the signed weight, with W * B_b
        assert both is not None and torch.equal(both[0], expected)
        assert torch.equal(_bits(both[1]), _bits(w * expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", N4_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_bimasks_four_operands_in_one_call_are_the_two_calls(dtype, kind, n):
    # rows and columns both in groups of 4, the weight's kinds as the row-wise mask's tests take them
    w = _n4_weights(kind, dtype, (64, 40), 30 + n, along_columns=False)
    for seed in range(3):
        perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
        fmask, w_f = nm_mask_and_product(w, n, 4, "nhwc")
        made = column_nm4_masked(w, fmask, perm, n)
        one = bimask_operands4(w, perm, n)
        if made is None:                     # a NaN of an Inf times a pruned 0: the one call declines too
            assert one is None
            continue
        assert one is not None
        assert torch.equal(one[0], fmask) and torch.equal(_bits(one[1]), _bits(w_f))
        assert torch.equal(one[2], made[0]) and torch.equal(_bits(one[3]), _bits(made[1]))


def test_bimasks_one_call_leaves_what_either_kernel_does_not_serve_to_them():
    w, perm = torch.randn(8, 12), torch.randperm(8)
    assert bimask_operands4(w, perm, 2) is not None
    nan = w.clone()
    nan[3, 4] = float("nan")
    for args in ((nan, perm, 2), (w.half(), perm, 2), (w.t(), perm, 2), (w[:6], perm[:6], 2), (w, perm, 4),
                 (w, perm.int(), 2), (w[:, :10], perm, 2), (w.requires_grad_(), perm, 2)):
        assert bimask_operands4(*args) is None


def test_the_column_n4_kernel_leaves_nan_and_what_it_does_not_serve_to_the_formula():
    scores = torch.rand(8, 12)
    fmask, perm = torch.rand(8, 12) < 0.5, torch.randperm(8)
    assert column_nm4_mask(scores, fmask, perm, 2) is not None
    nan = scores.clone()
    nan[3, 4] = float("nan")
    inf_pruned = scores.clone()
    inf_pruned[0, 0], fmask_pruned = float("inf"), fmask.clone()
    fmask_pruned[0, 0] = False                      # Inf * 0 is NaN
    for args in ((nan, fmask, perm, 2), (inf_pruned, fmask_pruned, perm, 2), (scores.half(), fmask, perm, 2),
                 (scores.t(), fmask.t(), perm, 2), (scores[:6], fmask[:6], perm[:6], 2), (scores, fmask, perm, 4),
                 (scores, fmask.float(), perm, 2), (scores, fmask, perm.int(), 2)):
        assert column_nm4_mask(*args) is None and column_nm4_masked(*args) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", N4_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_soft_threshold_kernel_is_sstes_formula_bit_for_bit(dtype, kind, n):
    w = _n4_weights(kind, dtype, (48, 64), 20 + n, along_columns=False)
    for beta in (0.73, 1.0, 3.1e-3):
        scale = torch.tensor(beta, dtype=dtype)
        expected = scale * soft_threshold(w, n, 4)
        fused = soft_threshold4(w, n, scale)
        assert fused is not None and torch.equal(_bits(fused), _bits(expected))
    assert soft_threshold4(torch.full((4, 8), float("nan")), n, torch.tensor(1.0)) is None
    assert soft_threshold4(w.t(), n, torch.tensor(1.0, dtype=dtype)) is None          # not contiguous
    assert soft_threshold4(w, n, torch.tensor(1.0, dtype=torch.float16)) is None      # a scale of another type


@pytest.mark.parametrize("shape", [(32, 64), (16, 8, 3, 3)])
def test_sstes_forward_weight_is_the_formula_in_every_layout(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(30))
    beta = torch.tensor(0.61)
    for layout in ("nhwc", "flatten"):
        expected = beta * soft_threshold(w, 2, 4, layout)
        assert torch.equal(_bits(scaled_soft_threshold(w, beta, 2, 4, layout)), _bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 32), (384, 128)])
def test_the_decayed_kernel_is_pgfs_where_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(40)
    for trial in range(20):
        w, _, keep = _inputs(shape, dtype, 40 + trial)
        w = _specials(w * float(10.0 ** torch.randint(-30, 30, (1,), generator=g).item()))
        # PGF's value: a 0-dim float64 CPU tensor, one step's exp(-c t) (any float64; 0 and 1 at the ends)
        value = torch.tensor((0.0, 1.0, torch.rand((), generator=g, dtype=torch.float64).item() ** 3)[trial % 3],
                             dtype=torch.float64)
        out = decayed(w, keep, value)
        assert out is not None and torch.equal(_bits(out), _bits(torch.where(keep, w, w * value)))
    assert decayed(w, keep.float(), value) is None and decayed(w.t(), keep.t(), value) is None


def _mvue_formula(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`mvue24` with its compiled pass turned off: the tensor formula alone."""
    saved = mvue_module.mvue24_sample
    mvue_module.mvue24_sample = lambda *args: None
    try:
        return mvue_module.mvue24(x, generator)
    finally:
        mvue_module.mvue24_sample = saved


@pytest.mark.parametrize("kind", ["random", "wide magnitudes", "zeros", "integers (ties)", "infinities and NaN"])
@pytest.mark.parametrize("layout", ["dY transposed (Linear)", "rows contiguous (conv)"])
def test_the_mvue_kernel_draws_the_formulas_sample_bit_for_bit(kind, layout):
    g = torch.Generator().manual_seed(50)
    dy = torch.randn(256, 96, generator=g)
    if kind == "wide magnitudes":
        dy = dy * torch.exp(torch.randn(dy.shape, generator=g) * 20)
    elif kind == "zeros":
        dy.view(-1)[::3] = 0.0
        dy.view(-1)[1::5] = -0.0
        dy[:, :8] = 0.0                                  # whole groups of 4 zeros: the eps-only distribution
    elif kind == "integers (ties)":
        dy = torch.randint(-2, 3, dy.shape, generator=g).float()
    elif kind == "infinities and NaN":
        dy.view(-1)[::7] = float("inf")
        dy.view(-1)[1::11] = float("nan")
    x = dy.t() if layout.startswith("dY") else dy.t().contiguous()
    for seed in range(3):
        got = mvue_module.mvue24(x, torch.Generator().manual_seed(seed))
        assert got.stride() == x.stride()               # in x's layout: dYᵀ's sample as dY lies, a view of it
        assert torch.equal(_bits(got), _bits(_mvue_formula(x, torch.Generator().manual_seed(seed))))
    # the generators end in the same state: the kernel consumes the draws the formula does
    a, b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    mvue_module.mvue24(x, a)
    _mvue_formula(x, b)
    assert torch.equal(a.get_state(), b.get_state())


def test_the_mvue_kernel_takes_any_size_on_torchs_threads():
    # above the serial kernels' MAX_ENTRIES, split over the threads; the row count a power of two (its buffers
    # are padded against cache-set conflicts) and not
    for rows, tokens in ((512, 2052), (300, 1024)):
        x = torch.randn(tokens, rows, generator=torch.Generator().manual_seed(rows)).t()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = mvue_module.mvue24(x, torch.Generator().manual_seed(1))
            assert torch.get_num_threads() == 1          # numba's pool did not raise torch's count
        finally:
            torch.set_num_threads(before)
        got = mvue_module.mvue24(x, torch.Generator().manual_seed(1))
        assert x.numel() > MAX_ENTRIES or rows == 300
        assert mvue24_sample(x, torch.rand(rows, tokens // 4, 2), 1e-7) is not None
        assert torch.equal(_bits(got), _bits(one))
        assert torch.equal(_bits(got), _bits(_mvue_formula(x, torch.Generator().manual_seed(1))))


@pytest.mark.parametrize("tokens, c_out, c_in", [(128, 120, 256), (128, 84, 120), (1024, 384, 128), (1024, 128, 512),
                                                (6400, 576, 192), (6400, 192, 768), (1028, 300, 100)])
def test_a_linears_weight_gradient_from_the_samples_view_equals_it_from_a_contiguous_copy(tokens, c_out, c_in):
    # The sample of dYᵀ comes back as a view of a (tokens, C_out) tensor, laid out as dY itself, and the weight
    # gradient's GEMM takes it as it takes dY in a dense Linear's backward. That GEMM gives the numbers it gives
    # on the contiguous copy the kernel used to return (LeNet-5's, the GPT's and ViT-Tiny's layers, one odd
    # shape): masked decay's weights stay what they were.
    g = torch.Generator().manual_seed(tokens + c_out)
    dy, x = torch.randn(tokens, c_out, generator=g), torch.randn(tokens, c_in, generator=g)
    sample = mvue_module.mvue24(dy.t(), torch.Generator().manual_seed(1))
    assert sample.stride() == (1, c_out)                   # a view of a tensor laid out as dY
    assert torch.equal(sample.mm(x), sample.contiguous().mm(x))


@pytest.mark.parametrize("shape, layout", [
    ((8, 6, 8, 8), "contiguous, runs of 16 groups: sampled in place"),
    ((4, 3, 12, 12), "contiguous, runs of 36 groups: sampled in place"),
    ((8, 16, 4, 4), "runs of 4 groups: through the copy"),
    ((8, 5, 7, 7), "H·W = 49: groups span images (padded at the end)"),
    ((8, 6, 8, 8), "channels last"),
    ((8, 6, 8, 8), "float64"),
])
def test_a_convs_dy_is_sampled_as_its_transposed_matrix_bit_for_bit(shape, layout):
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    dy.view(-1)[::5] = 0.0
    if layout == "channels last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    elif layout == "float64":
        dy = dy.double()
    c = shape[1]
    a, b, f = (torch.Generator().manual_seed(7) for _ in range(3))
    got = mvue_module.mvue24_by_channel(dy, a)
    # the formula on dYᵀ (C, B·H·W), reshaped back: the same numbers, whatever path served
    want = _mvue_formula(dy.transpose(0, 1).reshape(c, -1), f).reshape(c, shape[0], *shape[2:]).transpose(0, 1)
    assert got.shape == dy.shape and got.dtype == dy.dtype
    assert torch.equal(_bits(got.contiguous()), _bits(want.contiguous()))
    kernel = mvue_module.mvue24(dy.transpose(0, 1).reshape(c, -1), b)        # mvue24 on the copy, kernels on
    assert torch.equal(_bits(got.contiguous()),
                       _bits(kernel.reshape(c, shape[0], *shape[2:]).transpose(0, 1).contiguous()))
    assert torch.equal(a.get_state(), f.get_state()) and torch.equal(a.get_state(), b.get_state())
    in_place = layout.startswith("contiguous")
    u = torch.rand(c, dy.numel() // c // 4, 2)
    served = mvue24_runs(dy.reshape(shape[0], c, -1), u, 1e-7) if dy.is_contiguous() and dy.numel() % 4 == 0 else None
    assert (served is not None) == in_place


def test_the_mvue_kernel_leaves_what_it_does_not_serve_to_the_formula():
    u = torch.rand(8, 4, 2)
    assert mvue24_sample(torch.randn(16, 8).t(), u, 1e-7) is not None
    for x, uu in ((torch.randn(16, 8, dtype=torch.float64).t(), u.double()), (torch.randn(18, 8).t(), torch.rand(8, 5, 2)),
                  (torch.randn(16, 8).half().t(), u.half()), (torch.randn(2, 16, 8), u)):
        assert mvue24_sample(x, uu, 1e-7) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 64), (16, 8, 3, 3)])
def test_the_masked_decay_kernel_is_the_formula_bit_for_bit(dtype, shape):
    for seed, alpha in ((0, 6e-5), (1, 0.3), (2, 1e-30)):
        w, grad, keep = _inputs(shape, dtype, 60 + seed)
        w, grad = _specials(w), _specials(grad.flip(0).contiguous())
        expected = torch.where(keep, grad, grad + alpha * w)
        version = grad._version
        assert add_masked_decay_(grad, w, keep, alpha)
        assert torch.equal(_bits(grad), _bits(expected)) and grad._version > version
    flip = (grad.transpose(0, 1), w.transpose(0, 1), keep.transpose(0, 1))          # not contiguous
    assert not add_masked_decay_(grad, w, keep.float(), alpha) and not add_masked_decay_(*flip, alpha)


def _second_moments(n: int, dtype: torch.dtype, seed: int, zeros: float) -> torch.Tensor:
    """AdamW-like second moments: every float32 exponent (or a float64 spread), a share ``zeros`` of +0, and
    -0, denormals, Inf and NaN sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        v = torch.randint(0, 0x7F800000, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    else:
        v = torch.rand(n, generator=g, dtype=dtype) * 10.0 ** torch.randint(-300, 300, (n,), generator=g).to(dtype)
    v[torch.rand(n, generator=g) < zeros] = 0.0
    v[3::97] = -0.0
    v[5::89] = torch.finfo(dtype).tiny / 8           # denormal
    v[7::401] = float("inf")
    v[11::409] = float("nan")
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeros", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 17, 4096, 65_537])
def test_adams_denominator_is_torchs_formula_bit_for_bit(dtype, zeros, n):
    """VML's own square roots (not correctly rounded, so no other sqrt would do), divided and shifted in the
    tensor's type; zeros of either sign, denormals, Inf and NaN as torch gives them."""
    v = _second_moments(n, dtype, seed=n, zeros=zeros)
    for b, eps in ((1.0, 1e-8), (0.0316227766, 1e-8), (0.7, 1e-5), (3e-3, 0.0)):
        want = (v.sqrt() / b).add_(eps)
        got = adam_denominator(v, b, eps)
        if got is None:             # the sample found no zero: the caller's formula serves
            assert n == 1 and v.item() != 0
            continue
        assert got.dtype == dtype and got.shape == v.shape
        assert torch.equal(_bits(got), _bits(want))


def test_adams_denominator_differs_from_a_correctly_rounded_sqrt():
    """Why the kernel keeps VML's roots: on this torch some float32 roots are one ulp off IEEE's, and a
    formula with the CPU's own sqrt would give other bits (skips where VML rounds correctly)."""
    v = torch.arange(0x3F800000, 0x3F800000 + (1 << 16), dtype=torch.int32).view(torch.float32)
    ieee = torch.from_numpy(np.sqrt(v.numpy()))
    if torch.equal(v.sqrt(), ieee):
        pytest.skip("this build's sqrt rounds correctly here")
    v[0] = 0.0                      # a pruned weight's moment: the kernel serves
    assert torch.equal(_bits(adam_denominator(v, 1.0, 0.0)), _bits(v.sqrt()))


def test_adams_denominator_serves_where_its_sample_finds_a_zero():
    """The kernel for moments with zeros (a 2:4 mask's, a sparse unstructured mask's), the formula for a dense
    gradient's; a zero the sample misses leaves the formula to serve, with the same bits."""
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(384, 128, generator=g) + 0.01
    assert adam_denominator(dense, 0.5, 1e-8) is None
    two_four = dense.clone().view(-1, 4)
    two_four[:, 1:3] = 0.0
    assert adam_denominator(two_four.view(384, 128), 0.5, 1e-8) is not None
    sparse = dense * (torch.rand(dense.shape, generator=g) > 0.1)
    assert adam_denominator(sparse, 0.5, 1e-8) is not None
    missed = dense.clone()
    missed[100, 7] = 0.0            # far from the four runs of 64 the sample reads
    assert adam_denominator(missed, 0.5, 1e-8) is None


@pytest.mark.parametrize("case", ["float16", "not contiguous", "too large", "empty", "requires grad"])
def test_where_adams_denominator_does_not_serve_the_formula_does(case):
    v = _second_moments(64, torch.float32, seed=1, zeros=0.5).reshape(8, 8)
    if case == "float16":
        v = v.half()
    elif case == "not contiguous":
        v = v.t()
    elif case == "too large":
        v = torch.zeros(MAX_ENTRIES + 4)
    elif case == "empty":
        v = v[:0]
    else:
        v = v.abs().requires_grad_()
    assert adam_denominator(v, 0.5, 1e-8) is None
