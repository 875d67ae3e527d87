"""Bi-Mask: the backward-data product really uses the permuted backward mask."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.experiments.methods import Context, attach, build_params, get_method
from nmtrain.experiments.methods.bimask import backward_mask, backward_mask_and_product, search_permutation
from nmtrain.sparsity import Pattern, from_matrix, nm_mask, nm_violation, to_matrix


def _bimask(layers, run_seed=0, **params):
    cls = get_method("bimask")
    ctx = Context(layers=layers, pattern=Pattern(2, 4), layout="nhwc", solver="exact", total_steps=10,
                  steps_per_epoch=5, seed=run_seed)
    return cls(build_params(cls, params), ctx)


def _bimask_attached(layers, run_seed=0, **params):
    """``_bimask`` with the layers' forward routed through it until the block ends."""
    return attach("bimask", layers, Pattern(2, 4), params, total_steps=10, steps_per_epoch=5, seed=run_seed)


def test_backward_mask_is_nm_along_permuted_columns_and_inside_the_forward_mask():
    w = torch.randn(16, 24)
    fm = nm_mask(w, 2, 4)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    bm = backward_mask(fm, w.abs(), perm, 2, 4)
    assert bool((bm <= fm).all())                                   # B_b within B_f
    permuted = bm[perm]
    assert bool((permuted.reshape(4, 4, 24).sum(1) <= 2).all())     # N:M along permuted C_out
    assert nm_violation(bm[perm], Pattern(2, 4, True)) is None


def test_permutation_search_takes_the_best_and_is_deterministic():
    w = torch.randn(16, 32)
    fm = nm_mask(w, 2, 4)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    perm, kept = search_permutation(fm, w.abs(), 2, 4, 20, gen())
    again, kept2 = search_permutation(fm, w.abs(), 2, 4, 20, gen())
    assert torch.equal(perm, again) and kept == kept2
    g = gen()
    tries = [int(backward_mask(fm, w.abs(), torch.randperm(16, generator=g), 2, 4).sum()) for _ in range(20)]
    assert kept == max(tries)
    assert kept >= int(backward_mask(fm, w.abs(), torch.arange(16), 2, 4).sum()) or kept == max(tries)


def _input(kind, generator=None):
    shape = {"linear": (5, 16), "sequences": (3, 5, 16), "conv": (2, 8, 6, 6)}[kind]
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("kind", ["linear", "sequences", "conv"])
def test_backward_data_uses_w_times_the_backward_mask(kind):
    torch.manual_seed(0)
    mod = nn.Conv2d(8, 8, 3, padding=1) if kind == "conv" else nn.Linear(16, 8)
    x = _input(kind).requires_grad_(True)
    kind = "linear" if kind == "sequences" else kind       # a Linear on a batch of sequences: dX by the same rule
    with _bimask_attached({"layer": mod}, decay=0.0) as method:
        method.before_step(0)
        y = mod(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        fmask = method.masks()["layer"]
        bmask = method.backward_masks()["layer"]
        assert bool((bmask <= fmask).all()) and not torch.equal(bmask, fmask)
        w = mod.weight.detach()

        def dx_with(weight):
            xx = x.detach().clone().requires_grad_(True)
            out = F.linear(xx, weight) if kind == "linear" else F.conv2d(xx, weight, padding=1)
            out.backward(dy)
            return xx.grad

        # forward used B_f, backward-data used B_b
        ref_y = F.linear(x, w * fmask, mod.bias) if kind == "linear" else F.conv2d(x, w * fmask, mod.bias, padding=1)
        assert torch.allclose(y, ref_y, atol=1e-6)
        assert torch.allclose(x.grad, dx_with(w * bmask), atol=1e-5)
        assert not torch.allclose(x.grad, dx_with(w * fmask), atol=1e-5)
        assert not torch.allclose(x.grad, dx_with(w), atol=1e-5)
        # the weight gradient is dense (straight-through): it equals the gradient w.r.t. W~ everywhere
        ww = w.clone().requires_grad_(True)
        out = F.linear(x.detach(), ww) if kind == "linear" else F.conv2d(x.detach(), ww, padding=1)
        out.backward(dy)
        assert torch.allclose(mod.weight.grad, ww.grad, atol=1e-5)
        if kind == "linear":
            manual = dy.reshape(-1, 8).t() @ x.detach().reshape(-1, 16)
            assert torch.allclose(mod.weight.grad, manual, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "sequences", "conv"])
def test_the_gemm_takes_autograds_own_nodes_with_the_functions_bits(monkeypatch, kind):
    """A training forward runs torch's own product on a straight-through view of W whose data is swapped from
    W * B_f to W * B_b after it (`bimask._swapped_gemm`): no Python node, and the output and every gradient the
    bits `_BiMaskGEMM` gives, bias included. Where the swap would not reach the backward (checked once,
    `_swap_reaches_the_backward`) every layer takes the Function."""
    import nmtrain.experiments.methods.bimask as bimask_module

    def run(swap: bool):
        monkeypatch.setattr(bimask_module, "_swap_reaches_the_backward", lambda: swap)
        torch.manual_seed(3)
        mod = nn.Conv2d(8, 8, 3, padding=1) if kind == "conv" else nn.Linear(16, 8)
        g = torch.Generator().manual_seed(4)
        x = _input(kind, g).requires_grad_(True)
        with _bimask_attached({"layer": mod}, decay=0.0) as method:
            method.before_step(0)
            y = mod(x)
            y.backward(torch.randn(y.shape, generator=g))
        return y.grad_fn.name(), [t.detach().view(torch.int32) for t in (y, x.grad, mod.weight.grad, mod.bias.grad)]

    native, swapped = run(True)
    function, reference = run(False)
    assert "BiMaskGEMM" not in native and "BiMaskGEMM" in function
    assert all(torch.equal(a, b) for a, b in zip(swapped, reference))


def test_the_swap_check_fails_where_the_backward_would_read_the_forward_weight(monkeypatch):
    """`_swap_reaches_the_backward` is a real check: with a product that keeps W * B_f for its backward it says no."""
    import nmtrain.experiments.methods.bimask as bimask_module

    assert bimask_module._swap_reaches_the_backward.__wrapped__()
    swapped = bimask_module._swapped_gemm
    monkeypatch.setattr(bimask_module, "_swapped_gemm",
                        lambda x, w, b, w_f, w_b, conv: swapped(x, w, b, w_f, w_f, conv))
    assert not bimask_module._swap_reaches_the_backward.__wrapped__()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_only_the_gradients_asked_for_are_made_and_they_are_the_same(kind):
    torch.manual_seed(1)
    mod = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    with _bimask_attached({"layer": mod}, decay=0.0) as method:
        method.before_step(0)
        dy = torch.randn_like(mod(x))
        xx = x.clone().requires_grad_(True)
        mod(xx).backward(dy)                             # both asked for
        both_w, both_x = mod.weight.grad.clone(), xx.grad
        mod.weight.grad = None
        mod(x).backward(dy)                              # the data: no dX
        assert torch.equal(mod.weight.grad, both_w)
        mod.weight.grad = None
        mod.weight.requires_grad_(False)                 # a frozen weight: no dW
        xx = x.clone().requires_grad_(True)
        mod(xx).backward(dy)
        assert torch.equal(xx.grad, both_x) and mod.weight.grad is None


def test_decay_on_pruned_weights_and_checkpoint_state():
    lin = nn.Linear(8, 8, bias=False)
    with _bimask_attached({"lin": lin}, decay=0.5) as method:
        method.before_step(0)
        x = torch.zeros(1, 8)                    # no data gradient: only the decay remains
        lin(x).sum().backward()
        method.add_pruned_decay()                # once per optimizer step (loop.Stepper), not in the backward
        fmask = method.masks()["lin"]
        assert torch.allclose(lin.weight.grad, 0.5 * (~fmask) * lin.weight.detach())
        state = method.state_dict()
        other = _bimask({"lin": lin})
        other.load_state_dict(state)
        assert torch.equal(other.perms["lin"], method.perms["lin"])


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
def test_the_backward_mask_and_its_masked_weight_together_are_the_two_calls(n, m):
    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(32, 24, generator=g)
    fm = to_matrix(nm_mask(w, n, m))
    perm = torch.randperm(32, generator=g)
    keep, w_b = backward_mask_and_product(fm, w, perm, n, m)
    expected = backward_mask(fm, w.abs(), perm, n, m)
    assert torch.equal(keep, expected) and torch.equal(w_b.view(torch.int32), (w * expected).view(torch.int32))


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("kind", ["random", "integers (ties)"])
def test_a_convs_backward_mask_from_its_flatten_view_is_the_gemm_views(layout, n, m, kind):
    """B_b is column-wise, so a conv's operands come from its free flatten view (`BiMask._operands`): each weight
    gets the bit and the masked value the nhwc GEMM view gives it, ties included."""
    g = torch.Generator().manual_seed(n + m)
    shape = (16, 8, 3, 3)
    w = torch.randn(shape, generator=g) if kind == "random" else torch.randint(-2, 3, shape, generator=g).float()
    conv = nn.Conv2d(8, 16, 3)
    conv.weight.data.copy_(w)
    method = _bimask({"conv": conv})
    method.ctx.pattern, method.ctx.layout = Pattern(n, m), layout
    method.perms["conv"] = torch.randperm(16, generator=g)
    fmask, bmask, w_f, w_b = method._operands("conv", conv)
    fm = to_matrix(nm_mask(w, n, m, layout), layout)
    keep, masked = backward_mask_and_product(fm, to_matrix(w, layout), method.perms["conv"], n, m)
    assert torch.equal(fmask, nm_mask(w, n, m, layout)) and torch.equal(bmask, from_matrix(keep, shape, layout))
    assert torch.equal(w_b.view(torch.int32), from_matrix(masked, shape, layout).view(torch.int32))
    assert torch.equal(w_f.view(torch.int32), (w * fmask).view(torch.int32)) and w_b.is_contiguous()


@pytest.mark.parametrize("layer", ["linear", "flatten conv", "nhwc conv"])
@pytest.mark.parametrize("kind", ["random", "integers (ties)"])
def test_a_layers_four_operands_in_one_call_are_the_formulas(monkeypatch, layer, kind):
    """At M = 4 on a CPU a Linear's operands, and a conv's whose groups run along its flatten view, come from
    one call (`fused.bimask_operands4`); an nhwc conv's groups are not its matrix's rows, and it takes two."""
    import nmtrain.experiments.methods.bimask as bimask_module

    calls = []
    one_call = bimask_module.bimask_operands4
    monkeypatch.setattr(bimask_module, "bimask_operands4", lambda *a: calls.append(1) or one_call(*a))
    g = torch.Generator().manual_seed(5)
    module = nn.Linear(24, 16) if layer == "linear" else nn.Conv2d(8, 16, 3)
    shape = module.weight.shape
    w = torch.randn(shape, generator=g) if kind == "random" else torch.randint(-2, 3, shape, generator=g).float()
    module.weight.data.copy_(w)
    method = _bimask({"layer": module})
    method.ctx.layout = "nhwc" if layer == "nhwc conv" else "flatten"
    method.perms["layer"] = torch.randperm(16, generator=g)
    fmask, bmask, w_f, w_b = method._operands("layer", module)
    layout = method.ctx.layout
    fm = to_matrix(nm_mask(w, 2, 4, layout), layout)
    keep, masked = backward_mask_and_product(fm, to_matrix(w, layout), method.perms["layer"], 2, 4)
    assert torch.equal(fmask, nm_mask(w, 2, 4, layout)) and torch.equal(bmask, from_matrix(keep, shape, layout))
    assert torch.equal(w_b.view(torch.int32), from_matrix(masked, shape, layout).view(torch.int32))
    assert torch.equal(w_f.view(torch.int32), (w * fmask).view(torch.int32))
    assert len(calls) == (0 if layer == "nhwc conv" else 1)


def test_permutation_is_refreshed_every_iter_steps_and_is_reproducible():
    lin = nn.Linear(16, 16)
    a, b = _bimask({"lin": lin}, iter=3), _bimask({"lin": lin}, iter=3)
    a.before_step(0)
    b.before_step(0)
    assert torch.equal(a.perms["lin"], b.perms["lin"])     # same seed, same permutation on every rank
    first = a.perms["lin"].clone()
    a.before_step(1)
    a.before_step(2)
    assert a.searches == 1 and torch.equal(a.perms["lin"], first)
    a.before_step(3)
    assert a.searches == 2
    assert to_matrix(a.masks()["lin"]).shape == (16, 16)


def test_the_runs_seed_reaches_the_permutation_draws():
    # Issue #12: seeds 0, 1, 2 drew the same permutations. Same run seed: same pi (every rank agrees);
    # another run seed: another pi, for every one of 3 seeds and both searches.
    lin = nn.Linear(64, 64)
    perms = {}
    for run_seed in (0, 1, 2):
        a, b = _bimask({"lin": lin}, run_seed=run_seed, iter=1), _bimask({"lin": lin}, run_seed=run_seed, iter=1)
        a.before_step(0), b.before_step(0)
        assert torch.equal(a.perms["lin"], b.perms["lin"])
        first = a.perms["lin"].clone()
        a.before_step(1)
        perms[run_seed] = (first, a.perms["lin"].clone())
        assert not torch.equal(first, a.perms["lin"])          # the second search draws anew
    for s in (0, 1):
        for t in range(s + 1, 3):
            assert not torch.equal(perms[s][0], perms[t][0]) and not torch.equal(perms[s][1], perms[t][1])
    c = _bimask({"lin": lin}, run_seed=0, seed=5, iter=1)
    c.before_step(0)
    assert not torch.equal(c.perms["lin"], perms[0][0])        # params.seed still varies the draws


def test_training_runs_with_different_seeds_search_different_permutations(tmp_path):
    from nmtrain.experiments.runner import train
    from nmtrain.experiments.spec import Spec

    perms = []
    for seed in (0, 1):
        spec = Spec(seed=seed, out=str(tmp_path / f"s{seed}"))
        spec.data.dataset, spec.model.name, spec.data.batch_size = "synthetic", "mlp", 64
        spec.method.name, spec.train.max_steps = "bimask", 1
        train(spec, progress=False)
        ckpt = torch.load(tmp_path / f"s{seed}" / "checkpoint.pt", weights_only=True)
        perms.append(ckpt["method"]["perms"])
    assert perms[0].keys() == perms[1].keys() and perms[0]
    assert any(not torch.equal(perms[0][k], perms[1][k]) for k in perms[0])


def test_surviving_count_by_hand_and_as_the_backward_mask_keeps_it():
    from nmtrain.experiments.methods.bimask import surviving

    # 8 rows, 2 columns, 2:4 groups of rows: column 0 has 3 kept in rows 0-3 and 1 in rows 4-7.
    f = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 0], [1, 1], [0, 1], [0, 1], [0, 0]], dtype=torch.bool)
    ident = torch.arange(8)
    # groups (0-3) and (4-7): column 0 min(2,3)+min(2,1) = 3; column 1 min(2,1)+min(2,3) = 3
    assert surviving(f, ident, 2, 4) == 6
    swap = torch.tensor([0, 1, 3, 2, 4, 5, 6, 7])
    assert surviving(f, swap, 2, 4) == 6                       # a swap inside a group changes nothing
    better = torch.tensor([0, 1, 3, 5, 4, 2, 6, 7])            # rows 2 and 5 change groups:
    assert surviving(f, better, 2, 4) == 8 == int(f.sum())     # 2 kept per group and column, all survive
    w = torch.rand(8, 2) + 0.1                                 # no kept weight exactly zero
    for perm in (ident, swap, better):
        assert surviving(f, perm, 2, 4) == int(backward_mask(f, w, perm, 2, 4).sum())


def test_random_grouping_survival_is_the_binomial_expectation():
    from nmtrain.experiments.methods.bimask import random_grouping_survival

    assert random_grouping_survival(2, 4) == pytest.approx(0.8125)
    assert random_grouping_survival(1, 4) == pytest.approx(1 - 0.75 ** 4)
    # and it is what random permutations of a random N:M mask give on average
    gen = torch.Generator().manual_seed(0)
    fm = nm_mask(torch.randn(256, 256, generator=gen), 1, 4)
    from nmtrain.experiments.methods.bimask import surviving
    shares = [surviving(fm, torch.randperm(256, generator=gen), 1, 4) / int(fm.sum()) for _ in range(20)]
    assert sum(shares) / 20 == pytest.approx(random_grouping_survival(1, 4), abs=0.01)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_local_search_never_below_its_start_and_deterministic(n, m):
    from nmtrain.experiments.methods.bimask import local_search, surviving

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=gen)
    fm = nm_mask(w, n, m)
    start, kept = search_permutation(fm, w.abs(), n, m, 10, torch.Generator().manual_seed(2))
    perm, better = local_search(fm, start, n, m, torch.Generator().manual_seed(3), 100)
    again, same = local_search(fm, start, n, m, torch.Generator().manual_seed(3), 100)
    assert torch.equal(perm, again) and better == same
    assert sorted(perm.tolist()) == list(range(64))            # still a permutation
    assert better == surviving(fm, perm, n, m) and better > kept   # it found better groupings
    assert kept == surviving(fm, start, n, m)


def test_local_search_with_one_group_or_no_gain_keeps_the_permutation():
    from nmtrain.experiments.methods.bimask import local_search

    fm = nm_mask(torch.randn(4, 16), 2, 4)
    perm = torch.tensor([2, 0, 3, 1])
    out, _ = local_search(fm, perm, 2, 4, torch.Generator().manual_seed(0), 10)
    assert torch.equal(out, perm)
    full = torch.ones(8, 8, dtype=torch.bool)                  # every row identical: no swap gains
    out, kept = local_search(full, torch.arange(8), 2, 4, torch.Generator().manual_seed(0), 10)
    assert torch.equal(out, torch.arange(8)) and kept == 2 * 2 * 8


def test_survival_is_recorded_in_metrics_and_summary(tmp_path):
    import json

    from typer.testing import CliRunner

    from nmtrain.cli.main import app

    shares = {}
    for search in ("random", "local"):
        out = tmp_path / search
        result = CliRunner().invoke(app, ["train", "data.dataset=synthetic", "model.name=mlp", "train.epochs=2",
                                          "data.batch_size=64", "--method", "bimask", "--pattern", "1:4",
                                          f"method.params.search={search}", "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.stderr + result.stdout
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(0.0 < line["backward_survival"] <= 1.0 for line in lines)
        summary = json.loads((out / "summary.json").read_text())
        per_layer = summary["backward_survival"]
        assert {f"{k}.weight" for k in per_layer} == set(summary["sparse_layers"]) and per_layer
        assert summary["backward_survival_random_grouping"] == pytest.approx(1 - 0.75 ** 4)
        assert lines[-1]["backward_survival"] == pytest.approx(sum(per_layer.values()) / len(per_layer))
        shares[search] = lines[-1]["backward_survival"]
    assert shares["local"] > shares["random"]


def test_survival_is_the_share_the_backward_gemm_keeps():
    lin = nn.Linear(32, 16, bias=False)
    with _bimask_attached({"lin": lin}, search="local") as method:
        method.before_step(0)
        fmask = method.masks()["lin"]
        # the backward-data GEMM: dX = dY (W * B_b); with dY = one-hot rows, dX recovers the rows of W * B_b
        x = torch.randn(16, 32, requires_grad=True)
        (lin(x) * torch.eye(16)).sum().backward()
        used = x.grad != 0
        expected = method.backward_survival()["lin"]
        assert int(used.sum()) / int(fmask.sum()) == pytest.approx(expected)
        assert bool((used <= fmask).all())


def test_bad_search_names_the_field():
    from nmtrain.experiments.methods import MethodError

    with pytest.raises(MethodError, match="method.params.search"):
        _bimask({"lin": nn.Linear(8, 8)}, search="annealing")
