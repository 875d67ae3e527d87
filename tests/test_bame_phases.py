"""BAME's two phases: SR-STE (dense backward) up to `switch`, then the sparse phase; FLOPs per phase."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments.flops import macs_per_sample
from nmtrain.experiments.methods import Context, MethodError, Stepper, attach, build_params, get_method
from nmtrain.experiments.models import image_model
from nmtrain.sparsity import Pattern, nm_mask, nm_violation


def _bame(layers, total=20, pattern=Pattern(2, 4), **params):
    cls = get_method("bame")
    ctx = Context(layers=layers, pattern=pattern, layout="nhwc", solver="exact", total_steps=total,
                  steps_per_epoch=10)
    return cls(build_params(cls, params), ctx)


def _bame_attached(layers, total=20, pattern=Pattern(2, 4), **params):
    """``_bame`` with the layers' forward routed through it until the block ends."""
    return attach("bame", layers, pattern, params, total_steps=total, steps_per_epoch=10)


def _step(method, lin, opt, step, x, y):
    """One step in the contract's order (`Stepper`); returns the gradient the optimizer steps with."""
    stepper = Stepper(method, step)
    stepper.begin()
    loss = nn.functional.cross_entropy(lin(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    stepper.before_update()                 # SR-STE's decay, then after_backward
    grad = lin.weight.grad.clone()
    opt.step()
    stepper.after_update()
    return grad


def test_first_phase_is_srste_then_the_mask_freezes_at_the_switch():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    with _bame_attached({"lin": lin}, total=20, switch=0.5, fraction=0.0, decay=0.1) as method:   # switch at step 10
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(1)
        for step in range(20):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 8, (8,), generator=gen)
            w_before = lin.weight.detach().clone()
            # phase 1 and the switch step: the magnitude mask of the weights now; then the frozen mask
            mask = nm_mask(w_before, 2, 4) if step <= 10 else method.masks()["lin"].clone()
            grad = _step(method, lin, opt, step, x, y)
            w_tilde = (w_before * mask).requires_grad_()
            nn.functional.cross_entropy(x @ w_tilde.t(), y).backward()
            if step < 10:     # SR-STE: dL/dW~ at every weight + decay on the pruned ones
                assert method.densities("lin", step) == (0.5, 1.0, 1.0)
                assert torch.allclose(grad, w_tilde.grad + 0.1 * (~mask) * w_before, atol=1e-6)
                assert bool((grad[~mask] != 0).any())                    # pruned weights learn
            else:             # sparse phase: the mask frozen at the switch, pruned weights get nothing
                if step == 10:
                    switch_mask = method.masks()["lin"].clone()
                    assert torch.equal(switch_mask, nm_mask(w_before, 2, 4))
                assert torch.equal(method.masks()["lin"], switch_mask)   # fraction 0: no adaptation
                assert method.densities("lin", step) == (0.5, 0.5, 0.5)
                assert torch.allclose(grad, w_tilde.grad * switch_mask, atol=1e-6)


def test_adaptation_opens_at_the_switch():
    lin = nn.Linear(16, 8)
    method = _bame({"lin": lin}, total=100, switch=0.3, interval=10, t_f=0.75)
    assert method.t_i_step == 30
    updates = [s for s in range(100) if method.is_update_step(s)]
    assert updates == [40, 50, 60, 70]
    later = _bame({"lin": lin}, total=100, switch=0.3, t_i=0.5, interval=10, t_f=0.75)
    assert [s for s in range(100) if later.is_update_step(s)] == [60, 70]


def test_score_batches_sum_the_gradients_of_the_batches_before_the_update():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    layers = {"lin": lin}
    with _bame_attached(layers, total=40, switch=0.0, interval=5, fraction=1.0, score_batches=3) as one:
        assert [s for s in range(12) if one.is_scoring_step(s)] == [3, 4, 5, 8, 9, 10]
        seen = {}
        real_update = one._update

        def spy(step, scores, current):
            seen["scores"] = {k: v.clone() for k, v in scores.items()}
            seen["current"] = {k: v.clone() for k, v in current.items()}
            return real_update(step, scores, current)

        one._update = spy
        opt = torch.optim.SGD(lin.parameters(), lr=0.0)             # weights stay: the three dW~ are comparable
        gen = torch.Generator().manual_seed(2)
        grads = []
        for step in range(6):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 8, (8,), generator=gen)
            mask = one.masks()["lin"]
            w_tilde = (lin.weight.detach() * mask).requires_grad_()
            nn.functional.cross_entropy(x @ w_tilde.t(), y).backward()
            grads.append(w_tilde.grad)
            _step(one, lin, opt, step, x, y)
            if step in (3, 4):
                assert one.densities("lin", step)[2] == pytest.approx(0.5 + 0.5 * 1.0)   # scored blocks' dense dW
            if step in (1, 2):
                assert one.densities("lin", step) == (0.5, 0.5, 0.5)
    assert torch.allclose(seen["scores"]["lin"], grads[3] + grads[4] + grads[5], atol=1e-6)
    assert torch.allclose(seen["current"]["lin"], grads[5], atol=1e-6)


@pytest.mark.parametrize("regrow", ["zero", "stale"])
def test_regrown_weights_restart_at_zero_or_keep_their_value(regrow):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    with _bame_attached({"lin": lin}, total=40, switch=0.0, interval=2, fraction=1.0, regrow=regrow) as method:
        before_mask = method.masks()["lin"].clone()
        w = lin.weight.detach().clone()
        method.before_step(2)
        lin(torch.randn(4, 16)).pow(2).sum().backward()
        method.after_backward(2)
    grown = method.masks()["lin"] & ~before_mask
    assert bool(grown.any())
    if regrow == "zero":
        assert bool((lin.weight.detach()[grown] == 0).all())
    else:
        assert torch.equal(lin.weight.detach()[grown], w[grown])
    assert nm_violation(method.masks()["lin"], Pattern(2, 4), "nhwc", exact=True) is None


def test_state_dict_keeps_the_phase():
    lin = nn.Linear(16, 8)
    method = _bame({"lin": lin}, total=20, switch=0.5)
    method.before_step(12)                        # past the switch
    assert not method._first_phase
    other = _bame({"lin": lin}, total=20, switch=0.5)
    assert other._first_phase
    other.load_state_dict(method.state_dict())
    assert not other._first_phase and torch.equal(other.masks()["lin"], method.masks()["lin"])


@pytest.mark.parametrize("params,needle", [({"switch": 1.5}, "method.params.switch"),
                                           ({"regrow": "random"}, "method.params.regrow"),
                                           ({"score_batches": 0}, "method.params.score_batches"),
                                           ({"decay": -1.0}, "method.params.decay")])
def test_bad_phase_params_name_the_field(params, needle):
    with pytest.raises(MethodError) as info:
        _bame({"fc": nn.Linear(8, 4)}, **params)
    assert needle in str(info.value)


def test_training_flops_count_each_phase_as_it_ran(tmp_path):
    """By hand: 16 steps of 64 samples; switch at step 8; no adaptation (fraction 0). Phase 1 costs
    3 F_d + (r + 2) F_s per sample, phase 2 3 F_d + 3 r F_s."""
    out = tmp_path / "bame"
    result = CliRunner().invoke(app, ["train", "data.dataset=synthetic", "model.name=mlp", "train.epochs=2",
                                      "data.batch_size=64", "--method", "bame", "--pattern", "1:4", "--out", str(out),
                                      "--no-progress", "method.params.switch=0.5", "method.params.fraction=0"])
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16
    model = image_model("mlp", num_classes=10, in_channels=1, image_size=28, width=1.0)
    macs = macs_per_sample(model, torch.zeros(1, 1, 28, 28))
    sparse = set(summary["sparse_layers"])
    f_s = sum(f for n, f in macs.items() if f"{n}.weight" in sparse)
    f_d = sum(macs.values()) - f_s
    assert f_s > 0 and f_d > 0
    r = 0.25
    expected = 8 * 64 * (3 * f_d + (r + 2) * f_s) + 8 * 64 * (3 * f_d + 3 * r * f_s)
    flops = summary["train_flops"]
    assert flops["total"] == pytest.approx(expected, rel=1e-9)
    assert flops["dense_total"] == 16 * 64 * 3 * (f_d + f_s)
    for name in sparse:   # the exported masks are the frozen phase-2 masks, exactly 1:4
        assert summary["sparse_layers"][name]["pattern"] == "1:4"
