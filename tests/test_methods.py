"""Methods on hand-made cases: SR-STE's update, masks of each method, FLOPs accounting by hand."""

import pytest
import torch
from torch import nn

from nmtrain.experiments.flops import FlopCounter, macs_per_sample
from nmtrain.experiments.layers import plan_layers
from nmtrain.experiments.methods import Capabilities, Context, Method, attach, build_params, get_method
from nmtrain.experiments.sparsify import sparsify
from nmtrain.sparsity import Pattern, fold_mask, nm_mask, nm_violation, threads


def _ctx(layers, pattern=Pattern(2, 4), total=10):
    return Context(layers=layers, pattern=pattern, layout="nhwc", solver="exact", total_steps=total, steps_per_epoch=5)


def _method(name, layers, pattern=Pattern(2, 4), **params):
    cls = get_method(name)
    return cls(build_params(cls, params), _ctx(layers, pattern))


def _attached(name, layers, pattern=Pattern(2, 4), **params):
    """``_method`` with the layers' forward routed through it until the block ends."""
    return attach(name, layers, pattern, params, total_steps=10, steps_per_epoch=5)


def test_srste_update_equals_the_formula():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.5, 0.3, 0.2]]))
    w0 = lin.weight.detach().clone()
    with _attached("srste", {"lin": lin}, decay=0.01) as method:
        x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        y = lin(x)
        # forward uses W~ = E * W with E keeping |-0.5| and |0.3|
        assert y.item() == pytest.approx(-0.5 * 2 + 0.3 * 3)
        y.sum().backward()
        assert torch.equal(lin.weight.grad, x)          # the backward: straight through
        method.add_pruned_decay()                       # once per optimizer step, before it (loop.Stepper)
        e = torch.tensor([[False, True, True, False]])
        expected_grad = x + 0.01 * (~e) * w0           # straight-through + lambda_W (1 - E) W
        assert torch.allclose(lin.weight.grad, expected_grad)
        opt = torch.optim.SGD([lin.weight], lr=0.1)
        opt.step()
        assert torch.allclose(lin.weight, w0 - 0.1 * expected_grad)


def test_fixed_mask_never_changes_and_zeroes_pruned_gradients():
    lin = nn.Linear(8, 4)
    with _attached("fixed", {"lin": lin}) as method:
        method.before_step(0)
        mask = method.masks()["lin"].clone()
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
        for step in range(3):
            method.before_step(step)
            opt.zero_grad()
            lin(torch.randn(5, 8)).pow(2).sum().backward()
            assert bool((lin.weight.grad[~mask] == 0).all())
            opt.step()
        assert torch.equal(method.masks()["lin"], mask)


def test_transposable_mask_recomputed_every_interval():
    lin = nn.Linear(8, 8, bias=False)
    method = _method("transposable", {"lin": lin}, mask_interval=2)
    method.before_step(0)
    m0 = method.masks()["lin"]
    assert nm_violation(m0, Pattern(2, 4, True), exact=True) is None
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 8))
    method.before_step(1)
    assert torch.equal(method.masks()["lin"], m0)         # not due yet
    method.before_step(2)
    assert not torch.equal(method.masks()["lin"], m0)     # recomputed from the new weights
    assert nm_violation(method.masks()["lin"], Pattern(2, 4, True), exact=True) is None


def test_unstructured_global_and_gradual():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(0.01)
    m = _method("unstructured", {"a": a, "b": b}, scope="global")
    masks = m.masks()
    assert masks["a"].all() and not masks["b"].any()      # global ranking keeps the big layer
    g = _method("unstructured", {"a": a}, gradual=True, start=0.0, end=1.0, interval=1)
    assert g.target_density(0) == pytest.approx(1.0)
    assert g.target_density(10) == pytest.approx(0.5)
    assert 0.5 < g.target_density(5) < 1.0


class _MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_flops_accounting_by_hand_on_a_two_layer_mlp():
    model = _MLP()
    macs = macs_per_sample(model, torch.randn(3, 8))
    assert macs == {"1": 8 * 16, "3": 16 * 4}
    plan = plan_layers(model, Pattern(2, 4), "nhwc", keep_first_dense=False, keep_last_dense=True)
    assert list(plan.sparse) == ["1"] and plan.skipped == {"3": "classifier kept dense"}
    counter = FlopCounter(macs)
    r = 0.5
    for name, expected in [("srste", (r, 1, 1)), ("transposable", (r, r, 1)), ("fixed", (r, 1, r)),
                           ("dense", (1, 1, 1))]:
        method = _method(name, plan.sparse)
        assert method.densities("1", 0) == pytest.approx(expected), name
    counter.add_step(10, {"1": (r, 1.0, 1.0)})     # SR-STE on layer 1, layer 3 dense
    s = counter.summary()
    assert s["forward"] == 10 * (128 * r + 64)
    assert s["backward_data"] == 10 * (128 + 64)
    assert s["backward_weight"] == 10 * (128 + 64)
    assert s["dense_total"] == 3 * 10 * 192
    assert s["ratio"] == pytest.approx((128 * (r + 2) + 3 * 64) / (3 * 192))


class _HalvedDeploy(Method):
    """A test-only method that deploys something else than ``W * mask``: half of it."""
    caps = Capabilities(sparse_gemms=("forward",))

    def masks(self):
        return {n: nm_mask(m.weight.detach(), 2, 4, "nhwc") for n, m in self.ctx.layers.items()}

    def deployed_weight(self, name, module, mask):
        return 0.5 * fold_mask(module.weight, mask)

    def export_pattern(self, name):
        return Pattern(2, 4)


@pytest.mark.parametrize("cls,factor", [(_HalvedDeploy, 0.5), ("srste", 1.0)])
def test_the_runner_folds_the_weight_each_method_deploys(cls, factor):
    from nmtrain.experiments.sparsify import fold_masks
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    with attach(cls, {"lin": lin}, Pattern(2, 4)) as method:
        masks = method.masks()
        expected = factor * fold_mask(lin.weight.detach(), masks["lin"])
        report = fold_masks(method, masks, "nhwc")
    assert torch.equal(lin.weight.detach(), expected)
    assert report["lin.weight"]["pattern"] == "2:4" and report["lin.weight"]["density"] == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pruned_decay_is_the_sr_ste_formula_bit_for_bit(dtype):
    """`pruned_decay` (two tensor operations) against ``decay · (W · ¬mask)``, as transcribed from Zhou et al.:
    random, tied and signed-zero weights, and the zero's sign on kept entries."""
    from nmtrain.experiments.methods.base import pruned_decay
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g).to(dtype)
    w[0] = 0.5
    w[1, :16], w[1, 16:] = 0.0, -0.0
    mask = torch.rand(32, 32, generator=g) < 0.5
    for decay in (2e-4, 1.0, 3e-7):
        got, want = pruned_decay(w, mask, decay), decay * (w * ~mask)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_per_forward_makes_every_layer_at_a_steps_first_training_forward_and_each_takes_its_own_once():
    """`Method.per_forward`: at the first training forward every layer's result is made, from each weight as
    it is; each layer takes its own once; a weight changed since (its version) has its result made again, and
    the others' with it; without grad mode (an evaluation) only the layer's own is made."""
    layers = {name: nn.Linear(8, 8) for name in ("a", "b", "c")}
    method = _method("srste", layers)
    made = []

    def make(name, module):
        made.append(name)
        return name, module.weight.detach().clone()

    def take(name):
        return method.per_forward(name, layers[name], make)

    assert take("a")[0] == "a" and sorted(made) == ["a", "b", "c"]           # the first forward: all three
    assert take("b")[0] == "b" and take("c")[0] == "c" and len(made) == 3    # each takes its own
    assert take("b")[0] == "b" and sorted(made[3:]) == ["a", "b", "c"]       # a second forward: all again
    assert take("b")[0] == "b" and made[6:] == ["b"]                           # b twice in it: its own again
    take("a"), take("c")
    with torch.no_grad():
        layers["a"].weight.mul_(2)                                             # an optimizer step, say
    made.clear()
    assert take("a")[0] == "a" and sorted(made) == ["a", "b", "c"]           # a new step: all again
    assert torch.equal(take("c")[1], layers["c"].weight) and len(made) == 3
    with torch.no_grad():
        layers["b"].weight.add_(1)                                             # changed since it was made
        made.clear()
        assert torch.equal(take("b")[1], layers["b"].weight) and made == ["b"]  # no grad: only its own
    method._ready.clear()
    with torch.no_grad():
        take("a")
    assert not method._ready                                                   # an evaluation makes no others


def test_a_held_masks_product_made_ahead_is_used_only_with_that_mask():
    """Transposable's ``W ⊙ mask`` made at the first forward is each layer's forward weight while its mask stays
    as it was; a mask edited in place or replaced since gives the product with the mask as it is now."""
    layers = {"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "c": nn.Linear(8, 8)}
    method = _method("transposable", layers)
    first = method.forward_weight("a", layers["a"])                         # makes b's and c's too
    assert torch.equal(first, layers["a"].weight * method.mask("a"))
    edited = method.mask("b")
    edited[0] = ~edited[0]                                                  # changed in place since
    assert torch.equal(method.forward_weight("b", layers["b"]), layers["b"].weight * edited)
    method._masks["c"] = ~method.mask("c")                                  # replaced since
    assert torch.equal(method.forward_weight("c", layers["c"]), layers["c"].weight * method.mask("c"))


def test_sr_ste_forward_weights_made_together_are_the_ones_made_alone():
    """SR-STE's forward weights and masks taken from `per_forward` (made at the first forward) are those each
    layer makes for itself, forward and backward, over steps whose weights change."""
    torch.manual_seed(0)
    layers = {name: nn.Linear(16, 8) for name in ("a", "b")}
    alone = {name: nn.Linear(16, 8) for name in ("a", "b")}
    for name in layers:
        alone[name].load_state_dict(layers[name].state_dict())
    together, single = _method("srste", layers), _method("srste", alone)
    single.per_forward = lambda name, module, make, **_: make(name, module)     # never made ahead
    x = torch.randn(4, 16)
    for _ in range(3):
        for method, mods in ((together, layers), (single, alone)):
            loss = sum((method.layer_forward(name, mods[name], x) ** 2).sum() for name in ("a", "b"))
            loss.backward()
            method.add_pruned_decay()
            with torch.no_grad():
                for mod in mods.values():
                    mod.weight.sub_(0.1 * mod.weight.grad)
                    mod.weight.grad = None
    for name in layers:
        assert torch.equal(layers[name].weight, alone[name].weight)


def _weight_nodes(loss: torch.Tensor, weights: list[torch.Tensor]) -> list[str]:
    """The autograd node that hands each of ``weights`` its gradient in ``loss``'s graph, by its type's name."""
    found, seen, todo = {}, set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for after, _ in node.next_functions:
            for i, weight in enumerate(weights):
                if after is not None and getattr(after, "variable", None) is weight:
                    found[i] = type(node).__name__
            todo.append(after)
    return [found.get(i) for i in range(len(weights))]


@pytest.mark.parametrize("method, params", [("srste", {}), ("transposable", {}), ("maskdecay", {"mvue_dw": False}),
                                            ("sste", {}), ("pgf", {})])
def test_a_layers_straight_through_weight_takes_autograds_own_node(method, params):
    """Every layer, of any size, gets its straight-through forward weight through autograd's view node, joined
    at its own forward to the product made ahead (at the step's first forward, or transposable's held from its
    bound's pass: steps 1 and 2), not through the method's Python Function (`_STENM`, `_STEMask`,
    `_SoftThreshold`, `_DecayedMask`: what a traced forward takes). The same bits either way
    (tests/test_fused.py, tests/test_step_identity.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with sparsify(model, method, "2:4", opt, keep_first_dense=False, total_steps=100, **params) as handle:
        assert {"0", "2"} <= set(handle.layers)
        for _ in range(3):          # the first step makes its own operands; transposable's later ones are held
            handle.begin_step()
            loss = nn.functional.cross_entropy(model(x), y)
            assert _weight_nodes(loss, [model[0].weight, model[2].weight]) == ["ViewBackward0"] * 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            assert model[2].weight.grad is not None
            opt.step()


def _trained_on_threads(method: str, split_entries: int, monkeypatch, pattern="2:4") -> tuple[list, list, int]:
    """Weights and masks after 4 SGD steps of ``method`` through `nmtrain.sparsify`, on torch's two threads, with
    `threads.split_map` sharing the layers' makes from ``split_entries`` entries on; and how many jobs the other
    thread took."""
    monkeypatch.setattr(threads, "SPLIT_ENTRIES", split_entries)
    jobs = []
    pool = threads._other_thread()

    class Counted:                          # the other thread, counting the jobs it is given
        def submit(self, *args):
            jobs.append(args)
            return pool.submit(*args)
    monkeypatch.setattr(threads, "_other_thread", Counted)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with sparsify(model, method, pattern, opt, keep_first_dense=False) as handle:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        masks = [m.clone() for m in handle.masks().values()]
    return [p.detach().clone() for p in model.parameters()], masks, len(jobs)


@pytest.mark.parametrize("method", ["srste", "bimask"])
def test_layers_made_on_two_threads_train_bit_for_bit_as_on_one(method, monkeypatch):
    """SR-STE's masks and Bi-Mask's operands made for every layer at a step's first forward, shared between two
    threads (`per_forward(split=True)`): the same weights and masks, bit for bit, as made on one thread."""
    one, one_masks, serial_jobs = _trained_on_threads(method, 1 << 62, monkeypatch)
    two, two_masks, jobs = _trained_on_threads(method, 0, monkeypatch)
    assert serial_jobs == 0 and jobs == 4                       # one shared make a step, 4 steps
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == 10
    assert all(torch.equal(a, b) for a, b in zip(one_masks, two_masks)) and len(one_masks) == 4    # last: dense
    _, _, other_m = _trained_on_threads(method, 0, monkeypatch, pattern="2:8")
    assert other_m == 0         # M = 8: torch's topk makes the masks, on torch's own threads: no split


def test_mask_as_casts_a_mask_once_it_is_used_twice_and_again_when_it_changes():
    """`Method.mask_as`: the bool mask in the weight's type, kept from its second use on, recast when the mask is
    another tensor or was edited in place; multiplying by it is multiplying by the bool mask, bit for bit."""
    layer = nn.Linear(8, 4)
    method = _method("fixed", {"fc": layer})
    weight = layer.weight
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert method.mask_as("fc", mask, weight) is mask                      # first use: the bool mask itself
    second = method.mask_as("fc", mask, weight)
    assert second.dtype == weight.dtype and torch.equal(weight * second, weight * mask)
    assert method.mask_as("fc", mask, weight) is second                   # kept from the second use
    mask[0, 0] = not bool(mask[0, 0])                                      # edited in place: recast
    third = method.mask_as("fc", mask, weight)
    assert third is not second and torch.equal(third, mask.to(weight.dtype))
    fresh = [mask.clone() for _ in range(3)]                                # a new mask each time: never cast
    assert all(method.mask_as("fc", f, weight) is f for f in fresh) and method._cast["fc"][2] is None
    method.mask_as("fc", mask, weight)
    assert method.mask_as("fc", mask, weight.double()).dtype == torch.float64
