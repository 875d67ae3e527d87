"""`step` (STEP, Lu et al., ICML 2023): dense AdamW until AutoSwitch sees the second moment settle (or the
cap), then the frozen second moment preconditions the sparse layers while their N:M mask is learned."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.experiments.methods import attach, train_step
from nmtrain.experiments.methods.step import preconditioned_step
from nmtrain.sparsity import Pattern, nm_mask

from helpers import assert_refused, quick_train, snapshot

P = Pattern(2, 4)
BETAS, LR, WD, EPS = (0.9, 0.99), 1e-2, 0.1, 1e-8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).double()


def _attach(model, total, **params):
    return attach("step", {"0": model[0], "2": model[2]}, P, params, total_steps=total, steps_per_epoch=total)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


def _linear_loss(model, grads):
    """A loss whose gradient is ``grads[i]`` for parameter i, exactly (no forward through the model)."""
    return lambda: sum((p * g).sum() for p, g in zip(model.parameters(), grads))


def _constant_grads(model):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]


def _window_means(model, grads, steps, window):
    """The AutoSwitch statistic under constant gradients, in float64 by formula: v_t = (1 - b2^t) g^2, so
    Z_t = mean |v_t - v_(t-1)| = (1 - b2) b2^(t-1) mean(g^2) over the sparse weights; the window's mean."""
    sparse = [g for p, g in zip(model.parameters(), grads) if p is model[0].weight or p is model[2].weight]
    mean_g2 = float(sum((g ** 2).sum() for g in sparse)) / sum(g.numel() for g in sparse)
    b2 = BETAS[1]
    z = [(1 - b2) * b2 ** (t - 1) * mean_g2 for t in range(1, steps + 1)]
    return [sum(z[max(0, t - window):t]) / len(z[max(0, t - window):t]) for t in range(1, steps + 1)]


# --- AutoSwitch ---------------------------------------------------------------------------------

def test_autoswitch_fires_when_the_second_moment_has_settled_and_not_before():
    model, total, window = _model(), 40, 5
    grads = _constant_grads(model)
    means = _window_means(model, grads, total, window)
    target = 12                                         # the optimizer step whose window mean first falls below
    threshold = math.sqrt(means[target - 2] * means[target - 1])
    with _attach(model, total, window=window, threshold=threshold, t_min=0.0, t_max=1.0) as method:
        opt = _adamw(model)
        method.bind_optimizer(opt)
        for step in range(total):
            train_step(method, step, opt, _linear_loss(model, grads))
            if method.switch_step is not None:
                break
            assert method.v_change == pytest.approx(means[step], rel=1e-9)      # the window, step by step
    assert method.switch_step == target and method.switch_reason == "settled"    # after step `target`
    assert step == target - 1 and method.v_change < threshold <= means[target - 2]
    assert not method.in_sparse_phase(target - 1) and method.in_sparse_phase(target)


def test_autoswitch_waits_for_t_min_and_fires_at_the_cap():
    model, total = _model(), 20
    grads = _constant_grads(model)
    for params, switch, reason in [({"threshold": 1e9, "t_min": 0.3, "t_max": 1.0}, 7, "settled"),   # T_min = 6
                                   ({"threshold": 1e-30, "t_min": 0.0, "t_max": 0.25}, 6, "cap")]:   # T_max = 5
        with _attach(model, total, **params) as method:
            opt = _adamw(model)
            method.bind_optimizer(opt)
            for step in range(total):
                train_step(method, step, opt, _linear_loss(model, grads))
                assert (method.switch_step is None) == (step + 1 < switch)
        assert (method.switch_step, method.switch_reason) == (switch, reason)


def test_without_an_optimizer_it_switches_at_the_cap():
    model = _model()
    with _attach(model, 10) as method:                  # t_max 0.5: T_max = 5
        for step in range(10):
            method.before_step(step)
            model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
            method.after_backward(step)
            method.after_step(step)
        assert method.switch_step == 6 and method.switch_reason == "cap"


def test_defaults_come_from_the_optimizer_as_the_reference():
    model = _model()
    with _attach(model, 100) as method:
        method.bind_optimizer(_adamw(model))
        p = method.params
        assert (p.window, p.threshold, p.t_min, p.t_max, p.decay) == (None, None, 0.1, 0.5, 2e-4)
        assert method.window_length() == int(1 / (1 - BETAS[1])) and method.threshold() == EPS
        assert (method.t_min, method.t_max) == (10, 50)


# --- the sparse phase: frozen v, moving m, the preconditioned update -----------------------------

def test_after_the_switch_v_stays_frozen_m_keeps_learning_and_the_update_is_the_formula():
    model, total = _model(), 12
    gen = torch.Generator().manual_seed(4)
    with _attach(model, total, t_min=0.0, t_max=0.25, threshold=1e-30) as method:     # switches after step 3
        opt = _adamw(model)
        method.bind_optimizer(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))       # the lr moves every step
        weights = [model[0].weight, model[2].weight]
        frozen = None
        for step in range(total):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
            before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                      for p in weights if opt.state[p]}
            bias_v = opt.state[model[0].bias].get("exp_avg_sq")
            bias_v = None if bias_v is None else bias_v.clone()
            lr = opt.param_groups[0]["lr"]                  # this step's, before the scheduler moves it
            train_step(method, step, opt, _linear_loss(model, grads), sched)
            if step == 3:
                frozen = {id(p): opt.state[p]["exp_avg_sq"].clone() for p in weights}
            if step < 4:
                continue
            assert not torch.equal(opt.state[model[0].bias]["exp_avg_sq"], bias_v)    # the bias: plain AdamW
            for p, g in ((model[0].weight, grads[0]), (model[2].weight, grads[2])):
                w, st = before[id(p)]
                k = float(st["step"]) + 1
                m = BETAS[0] * st["exp_avg"] + (1 - BETAS[0]) * g
                want = w * (1 - lr * WD) - lr / (1 - BETAS[0] ** k) * m / (
                    frozen[id(p)].sqrt() + EPS ** 0.75)
                assert torch.equal(opt.state[p]["exp_avg_sq"], frozen[id(p)])       # v: frozen
                assert float((opt.state[p]["exp_avg"] - m).abs().max()) <= 1e-12    # m: still learning
                assert float(opt.state[p]["step"]) == k
                assert float((p.detach() - want).abs().max()) <= 1e-12
    assert method.switch_step == 4


def test_the_sparse_phases_denominator_is_made_once_per_frozen_v_and_again_when_it_changes():
    model = _model()
    with _attach(model, 10) as method:
        v = torch.rand(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        first = method._preconditioner("0", v, EPS)
        assert torch.equal(first, v.sqrt() + math.sqrt(EPS) * math.sqrt(math.sqrt(EPS)))
        assert method._preconditioner("0", v, EPS) is first                   # kept
        assert method._preconditioner("2", v, EPS) is not first               # per layer
        with torch.no_grad():
            v.mul_(4)                                                          # a checkpoint loaded into it, say
        second = method._preconditioner("0", v, EPS)
        assert second is not first and torch.equal(second, v.sqrt() + math.sqrt(EPS) * math.sqrt(math.sqrt(EPS)))
        assert method._preconditioner("0", v, 1e-6) is not second             # another eps
        other = v.clone()
        fresh = method._preconditioner("0", other, 1e-6)                      # another v
        assert torch.equal(fresh, v.sqrt() + math.sqrt(1e-6) * math.sqrt(math.sqrt(1e-6)))


@pytest.mark.parametrize("inputs", ["random", "tied"])
def test_preconditioned_step_equals_a_float64_transcription(inputs):
    gen = torch.Generator().manual_seed(5)
    p, g, m = (torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.rand(8, 8, generator=gen, dtype=torch.float64) * 1e-3
    if inputs == "tied":
        p, g, m, v = p.sign() * 0.5, g.sign() * 0.25, m.sign() * 0.125, torch.full_like(v, 1e-4)
    state = {"step": torch.tensor(7.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    group = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    got = p.clone()
    preconditioned_step(got, g, state, group)
    m1 = 0.9 * m + 0.1 * g
    want = p * (1 - 3e-3 * 0.1) - 3e-3 / (1 - 0.9 ** 8) * m1 / (v.sqrt() + math.sqrt(1e-6) * 1e-6 ** 0.25)
    assert float((got - want).abs().max()) <= 1e-12
    assert torch.equal(state["exp_avg_sq"], v) and float(state["step"]) == 8.0


def test_forward_dense_while_dense_evaluation_and_sparse_phase_nm_with_the_srste_gradient():
    model = _model()
    lin = model[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    with _attach(model, 10, decay=0.01) as method:
        w = lin.weight.detach().clone()
        e = nm_mask(w, 2, 4)
        assert torch.equal(lin(x), F.linear(x, w, lin.bias))                   # phase 1 trains dense
        lin.eval()
        assert torch.equal(lin(x), F.linear(x, w * e, lin.bias))               # evaluation is N:M
        lin.train()
        method.switch_step = 0
        out = lin(x)
        assert torch.equal(out, F.linear(x, w * e, lin.bias))
        out.pow(2).sum().backward()
        method.add_pruned_decay()                                              # once per step (loop.Stepper)
        wt = (w * e).requires_grad_()
        (dwt,) = torch.autograd.grad(F.linear(x, wt, lin.bias.detach()).pow(2).sum(), [wt])
        want = dwt + 0.01 * (1 - e.double()) * w                              # straight through + SR-STE decay
        assert float((lin.weight.grad - want).abs().max()) <= 1e-12
        assert method.densities("0", 0) == (0.5, 1.0, 1.0)
        method.switch_step = 3
        assert method.densities("0", 2) == (1.0, 1.0, 1.0)


# --- the CLI ------------------------------------------------------------------------------------

def test_refused_under_sgd_with_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = quick_train(out, "--method", "step", "--pattern", "2:4")            # optim.name defaults to sgd
    assert_refused(result, "optim.name: method step needs optim.name adamw, not 'sgd'", before, snapshot(tmp_path))


def test_t_max_before_t_min_is_refused(tmp_path):
    result = quick_train(tmp_path / "run", "--method", "step", "optim.name=adamw", "method.params.t_min=0.6",
                         "method.params.t_max=0.2")
    assert_refused(result, "method.params.t_max: must not be before t_min=0.6")


def test_train_with_adamw_records_the_switch(tmp_path):
    out = tmp_path / "run"
    result = quick_train(out, "--method", "step", "--pattern", "2:4", "optim.name=adamw", "optim.lr=0.005",
                         "method.params.t_min=0.5", "method.params.t_max=0.5", "method.params.threshold=1e-30")
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["switch_step"], summary["switch_reason"]) == (9, "cap")    # T_max = 8 of 16 steps
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["switch_step"] for m in metrics] == [None, 9]
    assert all(m["v_change"] > 0 for m in metrics)
    assert all(info["pattern"] == "2:4" for info in summary["sparse_layers"].values())
    assert summary["train_flops"]["ratio"] < 1.0 and summary["final_accuracy"] > 30.0
