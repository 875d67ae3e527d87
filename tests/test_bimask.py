"""Bi-Mask: the backward-data product really uses the permuted backward mask."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.experiments.layers import route_forward
from nmtrain.experiments.methods import Context, build_params, get_method
from nmtrain.experiments.methods.bimask import backward_mask, search_permutation
from nmtrain.sparsity import Pattern, nm_mask, nm_violation, to_matrix


def _bimask(layers, run_seed=0, **params):
    cls = get_method("bimask")
    ctx = Context(layers=layers, pattern=Pattern(2, 4), layout="nhwc", solver="exact", total_steps=10,
                  steps_per_epoch=5, seed=run_seed)
    return cls(build_params(cls, params), ctx)


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


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_data_uses_w_times_the_backward_mask(kind):
    torch.manual_seed(0)
    mod = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 8, 3, padding=1)
    method = _bimask({"layer": mod}, decay=0.0)
    route_forward({"layer": mod}, method)
    method.before_step(0)
    x = torch.randn(5, 16, requires_grad=True) if kind == "linear" else torch.randn(2, 8, 6, 6, requires_grad=True)
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
        manual = dy.t() @ x.detach()
        assert torch.allclose(mod.weight.grad, manual, atol=1e-5)


def test_decay_on_pruned_weights_and_checkpoint_state():
    lin = nn.Linear(8, 8, bias=False)
    method = _bimask({"lin": lin}, decay=0.5)
    route_forward({"lin": lin}, method)
    method.before_step(0)
    x = torch.zeros(1, 8)                    # no data gradient: only the decay remains
    lin(x).sum().backward()
    fmask = method.masks()["lin"]
    assert torch.allclose(lin.weight.grad, 0.5 * (~fmask) * lin.weight.detach())
    state = method.state_dict()
    other = _bimask({"lin": lin})
    other.load_state_dict(state)
    assert torch.equal(other.perms["lin"], method.perms["lin"])


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
