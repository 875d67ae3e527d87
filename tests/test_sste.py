"""S-STE (`sste`): S(W) and beta against a float64 transcription, the fixed beta, the straight-through
gradient, and the exported weight being the one the forward used."""

import itertools
import json

import pytest
import torch
from torch import nn

from nmtrain.experiments.methods import attach
from nmtrain.experiments.methods.sste import scale_of, soft_threshold
from nmtrain.sparsity import Pattern, nm_violation

from helpers import quick_train


# -- a direct transcription, float64, one group at a time --------------------------------------------

def _rows(weight, layout):
    """The GEMM view, written out: a Linear as it is; a conv's K as (kh, kw, C_in) for nhwc, (C_in, kh, kw)
    for flatten."""
    w = weight.detach().double()
    if w.dim() == 2:
        return w.tolist()
    return (w.permute(0, 2, 3, 1) if layout == "nhwc" else w).reshape(w.shape[0], -1).tolist()


def _reference(weight, n, m, layout):
    """(S(W) in the GEMM view, beta): per group t = the (n+1)-th largest |w|, s = sign(w) max(|w| - t, 0)."""
    rows, s_rows = _rows(weight, layout), []
    for row in rows:
        out = []
        for j in range(0, len(row), m):
            group = row[j:j + m]
            t = sorted((abs(v) for v in group), reverse=True)[n]
            out += [(1.0 if v > 0 else -1.0) * max(abs(v) - t, 0.0) for v in group]
        s_rows.append(out)
    ws = sum(a * b for r, q in zip(rows, s_rows) for a, b in zip(r, q))
    ss = sum(b * b for q in s_rows for b in q)
    return torch.tensor(s_rows, dtype=torch.float64), (ws / ss if ss else 1.0)


def _as_rows(tensor, layout):
    return torch.tensor(_rows(tensor, layout), dtype=torch.float64)


def _tied(shape):
    """Weights full of ties: a few magnitudes, random signs, some groups constant, some all zero."""
    g = torch.Generator().manual_seed(1)
    values = torch.tensor([0.0, 0.5, 0.5, 1.0, 2.0], dtype=torch.float64)
    w = values[torch.randint(0, len(values), shape, generator=g)]
    return w * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


WEIGHTS = [("linear", (8, 16)), ("conv", (8, 8, 3, 3))]


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("kind,shape", WEIGHTS)
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (1, 8), (3, 8)])
@pytest.mark.parametrize("tied", [False, True])
def test_soft_threshold_and_beta_equal_the_transcription(layout, kind, shape, pattern, tied):
    n, m = pattern
    w = _tied(shape) if tied else torch.randn(shape, dtype=torch.float64)
    s = soft_threshold(w, n, m, layout)
    ref_s, ref_beta = _reference(w, n, m, layout)
    assert (_as_rows(s, layout) - ref_s).abs().max().item() <= 1e-12
    assert abs(scale_of(w, s).item() - ref_beta) <= 1e-12 * max(1.0, abs(ref_beta))
    assert nm_violation(s, Pattern(n, m), layout) is None             # at most N non-zeros per group
    assert not bool(torch.signbit(s[s == 0]).any())                  # pruned entries are +0.0, never -0.0


def test_the_authors_2_4_threshold_is_the_third_largest():
    """``_soft_threshold``'s t = min(max(min(a0,a1), min(a2,a3)), min(max(a0,a1), max(a2,a3))) is the
    (N+1)-th largest of 4 for N = 2, ties included."""
    for group in itertools.product([0.0, 1.0, 2.0, 3.0], repeat=4):
        a0, a1, a2, a3 = group
        t = min(max(min(a0, a1), min(a2, a3)), min(max(a0, a1), max(a2, a3)))
        assert t == sorted(group, reverse=True)[2]
    w = torch.tensor([list(g) for g in itertools.product([0.0, -1.0, 2.0, -3.0], repeat=4)], dtype=torch.float64)
    expect = _reference(w, 2, 4, "nhwc")[0]
    assert torch.equal(soft_threshold(w, 2, 4), expect)


def test_soft_threshold_is_continuous_in_w():
    """A weight crossing the threshold enters S(W) at 0: S moves by no more than W does (per group, 2x)."""
    w = torch.randn(16, 32, dtype=torch.float64)
    for eps in (1e-3, 1e-6, 1e-9):
        d = eps * torch.randn_like(w)
        jump = (soft_threshold(w + d, 2, 4) - soft_threshold(w, 2, 4)).abs().max().item()
        assert jump <= 2 * d.abs().max().item() + 1e-15
    # across the threshold: two weights swap places, and S changes by the swap's size only
    w = torch.tensor([[1.0, 0.5, 0.5 + 1e-9, 0.1]], dtype=torch.float64)
    assert soft_threshold(w, 2, 4)[0].tolist() == pytest.approx([0.5, 0.0, 1e-9, 0.0], abs=1e-15)


@pytest.mark.parametrize("tied", [False, True])
def test_masks_are_exact_nm_and_hold_every_nonzero_of_s(tied):
    lin = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_tied((8, 16)) if tied else torch.randn(8, 16))
    with attach("sste", {"lin": lin}, Pattern(2, 4)) as method:
        mask = method.masks()["lin"]
        assert nm_violation(mask, Pattern(2, 4), exact=True) is None
        assert bool(mask[soft_threshold(lin.weight, 2, 4) != 0].all())
        deployed = method.deployed_weight("lin", lin, mask)
        assert torch.equal(deployed, method.beta("lin") * soft_threshold(lin.weight, 2, 4))


def test_beta_is_set_at_the_first_use_then_fixed():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    w0 = lin.weight.detach().clone()
    with attach("sste", {"lin": lin}, Pattern(2, 4)) as method:
        lin(torch.randn(3, 16))                          # an evaluation before the first step sets it
        beta = method.beta("lin").clone()
        assert beta.item() == pytest.approx(_reference(w0, 2, 4, "nhwc")[1], rel=1e-6)
        assert beta.item() > 1.0                         # S shrinks the kept weights: beta scales them back
        opt = torch.optim.SGD(lin.parameters(), lr=0.5)
        for step in range(5):
            method.before_step(step)
            opt.zero_grad()
            lin(torch.randn(5, 16)).pow(2).sum().backward()
            opt.step()
        assert not torch.equal(lin.weight, w0)
        assert torch.equal(method.beta("lin"), beta)     # weights changed, beta did not
        recomputed = scale_of(lin.weight, soft_threshold(lin.weight, 2, 4))
        assert not torch.equal(recomputed, beta)
        state = method.state_dict()
    with attach("sste", {"lin": lin}, Pattern(2, 4)) as again:
        again.load_state_dict(state)                     # a resumed run keeps the saved beta
        again.before_step(5)
        assert torch.equal(again.beta("lin"), beta)


def test_a_weight_made_ahead_is_used_only_with_the_beta_it_was_made_with():
    """`Method.per_forward`: every layer's beta * S(W) made at the first training forward; a layer whose beta
    was replaced since (a checkpoint's, say) gets the product with its beta of now."""
    layers = {"a": nn.Linear(16, 8), "b": nn.Linear(16, 8)}
    with attach("sste", layers, Pattern(2, 4)) as method:
        method.before_step(0)
        method.forward_weight("a", layers["a"])                     # makes b's too
        method._beta["b"] = method._beta["b"] * 2
        expect = method._beta["b"] * soft_threshold(layers["b"].weight, 2, 4)
        assert torch.equal(method.forward_weight("b", layers["b"]).detach(), expect.detach())


def test_an_all_zero_layer_gets_beta_one():
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
    with attach("sste", {"lin": lin}, Pattern(2, 4)) as method:
        method.before_step(0)
        assert method.beta("lin").item() == 1.0
        assert torch.equal(lin(torch.randn(2, 8)), torch.zeros(2, 4))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_is_beta_s_w_and_the_gradient_passes_straight_through(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    with attach("sste", {"l": layer}, Pattern(2, 4)) as method:
        method.before_step(0)
        w_tilde = (method.beta("l") * soft_threshold(layer.weight, 2, 4)).requires_grad_(True)
        plain = (nn.functional.linear(x, w_tilde, layer.bias) if kind == "linear"
                 else layer._conv_forward(x, w_tilde, layer.bias))
        y = layer(x)
        assert torch.equal(y, plain)                     # the forward weight is beta * S(W)
        g = torch.randn_like(y)
        y.backward(g)
        plain.backward(g)
        assert torch.equal(layer.weight.grad, w_tilde.grad)   # dL/dW = dL/dW~, unscaled, no decay


def test_densities_and_the_mvue_flag():
    lin = nn.Linear(16, 8)
    with attach("sste", {"lin": lin}, Pattern(1, 4)) as method:
        assert method.densities("lin", 0) == (0.25, 1.0, 1.0)
    with attach("sste", {"lin": lin}, Pattern(2, 4), {"mvue_dw": True}) as method:
        assert method.densities("lin", 0) == (0.5, 1.0, 0.5)


def test_model_pt_is_the_network_the_last_forward_trained(tmp_path):
    """model.pt holds beta * S(W) of the final weights bit for bit, and the final evaluation of the plain
    folded model equals the last evaluation through the method's forward."""
    out = tmp_path / "run"
    result = quick_train(out, "--method", "sste", "--pattern", "2:4")
    assert result.exit_code == 0, result.stderr + result.stdout
    model = torch.load(out / "model.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)      # the final step: dense W and beta
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == ckpt["step"] == summary["steps"]
    for key in summary["sparse_layers"]:
        name = key.rsplit(".", 1)[0]
        beta = ckpt["method"]["beta"][name]
        assert summary["beta"][name] == beta.item()
        w = ckpt["model"][key]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        with attach("sste", {name: lin}, Pattern(2, 4)) as method:
            method.load_state_dict({"beta": {name: beta}})
            assert torch.equal(model[key], method.forward_weight(name, lin).detach())
        assert nm_violation(model[key], Pattern(2, 4)) is None
    assert summary["final_accuracy"] == last["accuracy"]              # the network measured is the one trained
    assert summary["final_test_loss"] == last["test_loss"]
