"""Every layer's per-step N:4 make in one compiled call per thread (`sparsity.batch.LayerMakes`): bit for bit each
layer's own call, its outputs kept from call to call and its plan remade when the weights' set changes."""

import pytest
import torch
from torch import nn

from nmtrain.experiments.methods import attach
from nmtrain.sparsity import Pattern, fused
from nmtrain.sparsity.batch import WIDTH, LayerMakes

pytestmark = pytest.mark.skipif(fused.njit is None, reason="the compiled kernels need numba")

SHAPES = [(24, 16), (8, 32), (16, 8, 3, 3), (32, 16), (12, 4), (8, 64)]


def _weights(count, kind="random", dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        w = torch.randn(shape, generator=g) if kind == "random" else torch.randint(-2, 3, shape, generator=g).float()
        out.append(w.to(dtype))
    return out


def _bits(t):
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(torch.int32 if t.element_size() == 4 else torch.int64)


def _same(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("count", [1, WIDTH, WIDTH + 1, 2 * WIDTH + 1])
@pytest.mark.parametrize("kind", ["random", "integers (ties)"])
@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
def test_masked_is_each_layers_own_call(count, kind, layout):
    weights = _weights(count, kind)
    for n in (1, 2, 3):
        made = LayerMakes().masked(weights, n, layout)
        assert len(made) == count
        for w, got in zip(weights, made):
            assert _same(got, fused.nm4_masked(w, n, layout)) and got[0].shape == w.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_with_a_value_is_pgfs_decayed_weight(dtype):
    weights = _weights(WIDTH + 2, "integers (ties)", dtype)
    makes = LayerMakes()
    for value in (0.5, 0.0, 1e-3):
        v = torch.tensor(value, dtype=dtype)
        made = makes.masked(weights, 2, "nhwc", v)
        assert all(_same(got, fused.nm4_decayed(w, 2, v)) for w, got in zip(weights, made))
    plain = makes.masked(weights, 2, "nhwc")            # and back to the plain product, the same plan
    assert all(_same(got, fused.nm4_masked(w, 2)) for w, got in zip(weights, plain))
    assert makes.masked(weights, 2, "nhwc", torch.tensor([0.5], dtype=dtype)) is None     # not a 0-dim value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_is_sstes_scaled_soft_threshold(dtype):
    weights = _weights(WIDTH + 3, "integers (ties)", dtype, shapes=[(24, 16), (8, 32), (16, 8, 3, 3), (32, 16)])
    weights += _weights(2, "random", dtype, seed=4)
    makes = LayerMakes()
    for n in (1, 2, 3):
        for step in range(2):           # the scales read at every call
            scales = [torch.tensor(0.5 + i + step, dtype=dtype) for i in range(len(weights))]
            made = makes.soft(weights, scales, n)
            for w, b, got in zip(weights, scales, made):
                expected = fused.soft_threshold4(w.view(w.shape[0], -1), n, b).view(w.shape)
                assert torch.equal(_bits(got), _bits(expected))
    assert makes.soft(weights, [torch.tensor([1.0], dtype=dtype)] * len(weights), 2) is None     # not 0-dim


@pytest.mark.parametrize("count", [1, WIDTH + 3])
@pytest.mark.parametrize("kind", ["random", "integers (ties)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bimask_is_each_layers_own_call_in_the_methods_order(count, kind, dtype):
    weights = _weights(count, kind, dtype, shapes=[(24, 16), (8, 32), (16, 8, 3, 3), (32, 16)])
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(w.shape[0], generator=g) for w in weights]
    for n in (1, 2, 3):
        made = LayerMakes().bimask(weights, perms, n)
        for w, p, got in zip(weights, perms, made):
            fmask, w_f, bmask, w_b = (t.view(w.shape) for t in fused.bimask_operands4(w.view(w.shape[0], -1), p, n))
            assert _same(got, (fmask, bmask, w_f, w_b))


def test_a_weight_with_a_nan_is_none_and_the_rest_are_made():
    weights = _weights(WIDTH + 2)
    weights[3].view(-1)[5] = float("nan")
    perms = [torch.randperm(w.shape[0]) for w in weights]
    for made in (LayerMakes().masked(weights, 2, "nhwc"), LayerMakes().bimask(weights, perms, 2)):
        assert [result is None for result in made] == [i == 3 for i in range(len(weights))]
    made = LayerMakes().masked(weights, 2, "nhwc")
    assert all(_same(made[i], fused.nm4_masked(weights[i], 2)) for i in range(len(weights)) if i != 3)


@pytest.mark.parametrize("case", ["strided", "float16", "mixed types", "K not in groups of 4", "too large",
                                  "n out of range", "a large nhwc conv"])
def test_weights_the_kernels_do_not_take_give_none(case):
    weights = _weights(3)
    n = 2
    if case == "strided":
        weights[1] = torch.randn(16, 24).t()
    elif case == "float16":
        weights = [w.half() for w in weights]
    elif case == "mixed types":
        weights[2] = weights[2].double()
    elif case == "K not in groups of 4":
        weights[0] = torch.randn(8, 6)
    elif case == "too large":
        weights[0] = torch.zeros(fused.MAX_ENTRIES // 4 + 1, 8)
    elif case == "a large nhwc conv":                   # masked on its GEMM view's copy, layer by layer
        weights[0] = torch.randn(256, 64, 3, 3)
    else:
        n = 4
    assert LayerMakes().masked(weights, n, "nhwc") is None


def test_outputs_are_kept_and_refilled_and_a_new_set_of_weights_is_planned_anew():
    weights = _weights(5)
    perms = [torch.randperm(w.shape[0]) for w in weights]
    makes = LayerMakes()
    first = makes.masked(weights, 2, "nhwc")
    for w in weights:
        w.mul_(-1.5).add_(0.25)                              # an optimizer's in-place step
    second = makes.masked(weights, 2, "nhwc")
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, second))         # the same tensors, refilled
    assert all(_same(got, fused.nm4_masked(w, 2)) for w, got in zip(weights, second))
    weights[2] = weights[2].clone()                          # another storage: planned anew
    third = makes.masked(weights, 2, "nhwc")
    assert third[0][0] is not first[0][0] and _same(third[2], fused.nm4_masked(weights[2], 2))
    made = makes.bimask(weights[:2], perms[:2], 2)          # another kernel, or other permutations
    perms[1] = torch.randperm(weights[1].shape[0], generator=torch.Generator().manual_seed(9))
    again = makes.bimask(weights[:2], perms[:2], 2)
    assert again[0][0] is not made[0][0]
    expected = fused.bimask_operands4(weights[1], perms[1], 2)
    assert _same(again[1], (expected[0], expected[2], expected[1], expected[3]))
    perms[1].copy_(perms[1].flip(0))                         # edited in place: the plan's views read it
    expected = fused.bimask_operands4(weights[1], perms[1], 2)
    assert _same(makes.bimask(weights[:2], perms[:2], 2)[1], (expected[0], expected[2], expected[1], expected[3]))


def _row_masked(method, name, w):
    return w * fused.nm4_mask(w, 2)


def _soft_thresholded(method, name, w):
    return fused.soft_threshold4(w, 2, method.beta(name))


@pytest.mark.parametrize("method, forward_weight", [("srste", _row_masked), ("bimask", _row_masked),
                                                    ("sste", _soft_thresholded)])
def test_a_training_forward_makes_every_layer_in_one_batch_unless_a_weight_is_frozen(monkeypatch, method,
                                                                                     forward_weight):
    """`Method.per_forward` takes the batch at a step's first training forward, and each layer's forward weight
    is what its own make gives; with a frozen weight among the layers it makes them one by one."""
    import nmtrain.sparsity.batch as batch_module

    runs = []
    real = batch_module._Plan.run
    monkeypatch.setattr(batch_module._Plan, "run", lambda self: runs.append(1) or real(self))
    for frozen in (False, True):
        torch.manual_seed(0)
        layers = {name: nn.Linear(16, 8) for name in ("a", "b", "c")}
        layers["b"].weight.requires_grad_(not frozen)
        runs.clear()
        with attach(method, layers, Pattern(2, 4), {}, total_steps=10, steps_per_epoch=5, seed=0) as m:
            m.before_step(0)
            x = torch.randn(4, 16)
            outs = [layers[name](x) for name in layers]
            assert len(runs) == (0 if frozen else 1)
            for name, out in zip(layers, outs):
                w = layers[name].weight.detach()
                expected = torch.nn.functional.linear(x, forward_weight(m, name, w), layers[name].bias)
                assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["random", "integers (ties)"])
def test_bound_is_each_layers_clamp_and_product_and_leaves_special_groups_to_the_formula(kind):
    """Transposable's bound after the optimizer step (`LayerMakes.bound`): each weight bounded in place and its
    product, the bits `fused.clamp_pruned_masked_` gives layer by layer; a weight with a NaN or a group whose
    kept weights are all 0 is None, and the formula's bound after it gives the per-layer result."""
    from nmtrain.experiments.methods.transposable import bound_pruned

    weights = _weights(WIDTH + 2, kind, shapes=[(24, 16), (8, 32), (32, 16)])
    keeps = [fused.nm4_mask(w.neg(), 2) for w in weights]          # not the magnitude mask: pruned weights above
    weights[1].view(-1)[:4] = torch.tensor([0.0, 0.0, 5.0, -7.0])   # a group whose kept weights are 0 ...
    keeps[1].view(-1)[:4] = torch.tensor([True, True, False, False])
    weights[4].view(-1)[6] = float("nan")
    alone = [w.clone() for w in weights]
    versions = [w._version for w in weights]
    made = LayerMakes().bound(weights, keeps, 4, "flatten")
    assert all(w._version > v for w, v in zip(weights, versions))     # written in place: autograd is told
    assert [m is None for m in made] == [i in (1, 4) for i in range(len(weights))]
    for w, a, k, m in zip(weights, alone, keeps, made):
        expected = fused.clamp_pruned_masked_(a, k, 4, "flatten")
        if m is None:
            bound_pruned(w, k, 4, "flatten")
            bound_pruned(a, k, 4, "flatten")
        else:
            assert torch.equal(_bits(m), _bits(expected))
        assert torch.equal(_bits(w), _bits(a))
    assert LayerMakes().bound(weights, keeps, 8, "flatten") is None
    assert LayerMakes().bound([torch.randn(8, 4, 3, 3)], [torch.ones(8, 4, 3, 3, dtype=torch.bool)], 4, "nhwc") is None


@pytest.mark.parametrize("method", ["srste", "bimask"])
def test_two_forwards_before_one_backward_take_the_gradients_each_layer_makes_alone(monkeypatch, method):
    """A second training forward from the same weights refills the kept outputs with the same bits, so a backward
    through both forwards (two micro-batches summed) gets the gradients of per-layer makes."""
    from nmtrain.experiments.methods.base import Method

    grads = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(Method, "per_forward", lambda self, name, module, make, **_: make(name, module))
        torch.manual_seed(0)
        layers = {name: nn.Linear(16, 8) for name in ("a", "b")}
        x1, x2 = torch.randn(4, 16), torch.randn(4, 16)
        with attach(method, layers, Pattern(2, 4), {}, total_steps=10, steps_per_epoch=5, seed=0) as m:
            m.before_step(0)
            loss = sum((layers[n](x1) ** 2).sum() for n in layers) + sum((layers[n](x2) ** 3).sum() for n in layers)
            loss.backward()
        grads.append([_bits(layers[n].weight.grad) for n in layers])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_product_is_each_layers_masked_weight_and_each_kind_keeps_its_own_plan():
    """A held mask's product (`LayerMakes.product`, transposable's and masked decay's forward weight) is
    `fused.masked`'s, bit for bit; a method's two kinds of batch (transposable: the bound after the optimizer
    step, the product in a forward) keep a plan each, so neither remakes the other's."""
    weights = _weights(WIDTH + 1, "integers (ties)", shapes=[(24, 16), (8, 32), (32, 16)])
    keeps = [fused.nm4_mask(w.abs().neg(), 2) for w in weights]
    weights[2].view(-1)[3] = float("nan")                  # a NaN's product is NaN, as torch's: nothing to leave
    makes = LayerMakes()
    made = makes.product(weights, keeps)
    assert all(torch.equal(_bits(m), _bits(fused.masked(w, k))) for w, k, m in zip(weights, keeps, made))
    bounded = makes.bound(weights, keeps, 4, "flatten")
    assert makes.product(weights, keeps)[0] is made[0] and makes.bound(weights, keeps, 4, "flatten")[0] is bounded[0]
    assert LayerMakes().product(weights, [k.float() for k in keeps]) is None        # not a bool mask
