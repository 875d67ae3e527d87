"""BAME: sparse forward/backward, loss-aware block adaptation, oscillation freezing, FLOPs, checkpoints."""

import io
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.grad import conv2d_input
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments.flops import macs_per_sample
from nmtrain.experiments.methods import Context, MethodError, attach, build_params, get_method
from nmtrain.experiments.models import image_model
from nmtrain.sparsity import Pattern, nm_mask, nm_violation

from helpers import method_step


def _bame(layers, total=100, pattern=Pattern(2, 4), layout="nhwc", **params):
    params.setdefault("switch", 0.0)      # the sparse phase's mechanics from step 0 (phases: test_bame_phases.py)
    cls = get_method("bame")
    ctx = Context(layers=layers, pattern=pattern, layout=layout, solver="exact", total_steps=total,
                  steps_per_epoch=10)
    return cls(build_params(cls, params), ctx)


def _bame_attached(layers, total=100, pattern=Pattern(2, 4), layout="nhwc", **params):
    """``_bame`` with the layers' forward routed through it until the block ends."""
    params.setdefault("switch", 0.0)
    return attach("bame", layers, pattern, params, layout=layout, total_steps=total, steps_per_epoch=10)


class _Net(nn.Module):
    """A conv and a linear layer, both sparse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _train_steps(method, model, steps, lr=0.05, start=0, seed=1, records=None):
    """Drive ``steps`` training steps as the runner does; returns the masks after every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    for step in range(start, start + steps):
        x = torch.randn(16, 8, 4, 4, generator=gen)
        y = torch.randint(0, 8, (16,), generator=gen)
        method_step(method, model, opt, x, y, step)
        history.append({k: v.clone() for k, v in method.masks().items()})
        if records is not None and method.last.get("step") == step:
            records.append(dict(method.last))
    return history


@pytest.mark.parametrize("pattern,layout,swaps", [(Pattern(2, 4), "nhwc", 1), (Pattern(1, 4), "flatten", 1),
                                                  (Pattern(2, 8), "nhwc", 2)])
def test_masks_stay_exactly_nm_after_updates(pattern, layout, swaps):
    model = _Net()
    layers = {"conv": model.conv, "fc": model.fc}
    with _bame_attached(layers, total=40, pattern=pattern, layout=layout, interval=2, fraction=0.5,
                        swaps_per_block=swaps) as method:
        history = _train_steps(method, model, 40)
    assert method.updates == 14 and method.swaps_total > 0       # updates at 2, 4, ..., 28 (t_f = 30)
    for masks in history:
        for name, mask in masks.items():
            assert mask.dtype == torch.bool and mask.shape == layers[name].weight.shape
            assert nm_violation(mask, pattern, layout, exact=True) is None
    for name, mod in layers.items():
        folded = mod.weight.detach() * method.masks()[name]
        assert nm_violation(folded, method.export_pattern(name), layout) is None
    changed = [not torch.equal(history[0]["fc"], h["fc"]) or not torch.equal(history[0]["conv"], h["conv"])
               for h in history]
    assert any(changed)


def test_no_updates_before_t_i_or_after_t_f():
    model = _Net()
    layers = {"conv": model.conv, "fc": model.fc}
    with _bame_attached(layers, total=60, t_i=0.3, t_f=0.6, interval=3, fraction=1.0,
                        freeze_threshold=100.0) as method:
        assert (method.t_i_step, method.t_f_step) == (18, 36)
        due = [s for s in range(60) if method.is_update_step(s)]
        assert due == [21, 24, 27, 30, 33]
        initial = {k: v.clone() for k, v in method.masks().items()}
        history = _train_steps(method, model, 60)
    changed_at = [s for s in range(60)
                  if any(not torch.equal(history[s][k], (history[s - 1] if s else initial)[k]) for k in initial)]
    assert changed_at and set(changed_at) <= set(due)
    for s in range(0, 21):
        assert all(torch.equal(history[s][k], initial[k]) for k in initial)    # fixed before t_i
    for s in range(33, 60):
        assert all(torch.equal(history[s][k], history[33][k]) for k in initial)  # fixed from t_f on
    assert method.updates == len(due)


def test_adapted_fraction_decays_to_zero_at_t_f():
    method = _bame({"fc": nn.Linear(8, 4)}, total=100, t_i=0.1, t_f=0.9, fraction=0.4, interval=10)
    assert method.fraction_at(9) == 0.0                     # before t_i
    assert method.fraction_at(10) == pytest.approx(0.4)
    values = [method.fraction_at(s) for s in range(10, 91)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert method.fraction_at(50) == pytest.approx(0.2)     # cosine: half way at the middle
    assert method.fraction_at(89) < 0.001 and method.fraction_at(90) == 0.0 and method.fraction_at(99) == 0.0
    assert not any(method.is_update_step(s) for s in range(90, 200))


def test_adapted_block_count_follows_the_fraction():
    model = _Net()
    layers = {"conv": model.conv, "fc": model.fc}           # 8 x 18 and 8 x 32 blocks of 4
    with _bame_attached(layers, total=40, interval=4, fraction=0.5, t_f=1.0, freeze_threshold=100.0) as method:
        records = []
        _train_steps(method, model, 40, records=records)
    assert [r["step"] for r in records] == list(range(4, 40, 4))
    for r in records:
        assert r["frozen"] == 0 and r["scored"] == r["blocks"] == 144 + 256
        assert r["adapted"] <= math.ceil(r["fraction"] * 144 - 1e-9) + math.ceil(r["fraction"] * 256 - 1e-9)
        assert r["swaps"] == r["adapted"]                    # one swap per adapted block
    adapted = [r["adapted"] for r in records]
    assert adapted[0] >= 150 and adapted[-1] <= 10 and adapted == sorted(adapted, reverse=True)


def test_a_block_with_a_large_pruned_gradient_gets_its_mask_changed():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.01, 0.02, 0.5, -0.6, 0.03, 0.04],
                                       [0.7, 0.02, -0.8, 0.01, 0.03, 0.9, 0.02, -0.6]]))
    with _bame_attached({"lin": lin}, total=100, t_f=1.0, interval=10, fraction=0.25) as method:
        method.before_step(0)
        before = method.masks()["lin"].clone()
        assert before.tolist() == [[True, True, False, False, True, True, False, False],
                                   [True, False, True, False, False, True, False, True]]
        x = torch.ones(1, 8)
        x[0, 2] = 100.0                        # d loss / d W~[0, 2] = 100: pruned, very salient
        method.before_step(10)
        assert method.is_update_step(10)
        lin(x)[:, 0].sum().backward()          # loss = y_0: dW~ = [x; 0]
        method.after_backward(10)
        after = method.masks()["lin"]
        # 4 blocks, fraction 0.25 * cos factor (0.98) -> one block: row 0, group 0. Its least salient kept
        # weight (|w g| = 0.9 < 1.0) makes room for the regrown one.
        assert after[0, :4].tolist() == [True, False, True, False]
        assert torch.equal(after[:, 4:], before[:, 4:]) and torch.equal(after[1], before[1])
        assert lin.weight[0, 2].item() == 0.0                           # regrown at zero
        assert lin.weight[0, 1].item() == pytest.approx(0.9)            # pruned one keeps its value
        assert lin.weight.grad[0, 2].item() == pytest.approx(100.0)     # the step uses the new mask
        assert lin.weight.grad[0, 1].item() == 0.0
        assert method.last == {"step": 10, "fraction": pytest.approx(0.25 * 0.5 * (1 + math.cos(math.pi * 0.1))),
                               "blocks": 4, "frozen": 0, "scored": 4, "adapted": 1, "swaps": 1}
        assert method.oscillation()["lin"].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_oscillation_freezing_stops_a_block_from_flipping():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.8, 0.1, 0.05]]))
    with _bame_attached({"lin": lin}, total=1000, t_f=1.0, interval=1, fraction=1.0, osc_decay=0.9,
                        freeze_threshold=2.5) as method:
        flips, frozen = [], []
        for step in range(1, 7):
            method.before_step(step)
            mask = method.masks()["lin"].clone()
            x = torch.ones(1, 4)
            x[0, int((~mask[0]).nonzero()[0])] = 100.0     # a pruned weight with a large gradient, every time
            lin.weight.grad = None
            lin(x).sum().backward()
            method.after_backward(step)                     # no optimizer step: only the mask moves
            flips.append(not torch.equal(mask, method.masks()["lin"]))
            frozen.append(method.last["frozen"])
            assert nm_violation(method.masks()["lin"], Pattern(2, 4), exact=True) is None
    # the regrown weight sits at 0, so it is the next to go: the block would flip at every update.
    # osc: 1, 1.9, 2.71 (>= 2.5: frozen), 2.44 (thawed by the decay), 3.19 ...
    assert flips == [True, True, True, False, True, False]
    assert frozen == [0, 0, 0, 1, 0, 1]


def test_pruned_weights_get_no_gradient_on_non_update_steps():
    model = _Net()
    layers = {"conv": model.conv, "fc": model.fc}
    with _bame_attached(layers, total=100, interval=10) as method:
        x = torch.randn(4, 8, 4, 4)
        for step in (0, 3, 9):
            assert not method.is_update_step(step)
            method.before_step(step)
            model.zero_grad(set_to_none=True)
            model(x).pow(2).sum().backward()
            method.after_backward(step)
            for name, mod in layers.items():
                mask = method.masks()[name]
                assert bool((mod.weight.grad[~mask] == 0).all()) and bool((mod.weight.grad[mask] != 0).any())
        # the kept entries get exactly the gradient of W~ = W * E (fc: dW~ = dY^T h)
        fc = model.fc
        h = torch.relu(model.conv(x)).flatten(1).detach()
        dy = 2 * (h @ (fc.weight * method.masks()["fc"]).t() + fc.bias).detach()
        assert torch.allclose(fc.weight.grad, (dy.t() @ h) * method.masks()["fc"], atol=1e-5)


def test_backward_data_uses_the_masked_weight():
    lin = nn.Linear(8, 4)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    with _bame_attached({"lin": lin, "conv": conv}, total=100) as method:
        method.before_step(0)
        e = method.masks()["lin"]
        x = torch.randn(5, 8, requires_grad=True)
        dy = torch.randn(5, 4)
        lin(x).backward(dy)
        assert torch.allclose(x.grad, dy @ (lin.weight.detach() * e), atol=1e-6)
        assert not torch.allclose(x.grad, dy @ lin.weight.detach(), atol=1e-3)
        xc = torch.randn(2, 8, 5, 5, requires_grad=True)
        dyc = torch.randn(2, 4, 5, 5)
        conv(xc).backward(dyc)
        expected = conv2d_input(xc.shape, conv.weight.detach() * method.masks()["conv"], dyc, padding=1)
        assert torch.allclose(xc.grad, expected, atol=1e-5)


def test_densities_count_the_scored_blocks_at_update_steps_only():
    lin = nn.Linear(16, 4)
    with _bame_attached({"lin": lin}, total=100, pattern=Pattern(1, 4), t_f=1.0, interval=5) as method:
        method.before_step(0)
        assert method.densities("lin", 0) == (0.25, 0.25, 0.25)
        method._osc["lin"][0] = 10.0                 # row 0 frozen: 4 of 16 blocks
        x = torch.randn(3, 16)
        for step in (4, 5, 6):
            method.before_step(step)
            lin.weight.grad = None
            lin(x).pow(2).sum().backward()
            method.after_backward(step)
            method.after_step(step)
            if step == 5:
                assert method.last["frozen"] == 4 and method.last["scored"] == 12
                assert method.densities("lin", 5) == (0.25, 0.25, pytest.approx(0.25 + 0.75 * 12 / 16))
            else:
                assert method.densities("lin", step) == (0.25, 0.25, 0.25)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = _Net()
    layers = {"conv": model.conv, "fc": model.fc}
    with _bame_attached(layers, total=40, interval=2, fraction=0.5) as method:
        _train_steps(method, model, 9)
        state = method.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert method.updates == 4 and loaded["updates"] == 4 and loaded["last"]["step"] == 8
        other = _bame(layers, total=40, interval=2, fraction=0.5)
        other.load_state_dict(loaded)
        for name in layers:
            assert torch.equal(other.masks()[name], method.masks()[name])
            assert torch.equal(other.oscillation()[name], method.oscillation()[name])
        assert other.last == method.last and other.swaps_total == method.swaps_total
        assert other.densities("fc", 8) == method.densities("fc", 8)
        # both continue identically
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        a = _train_steps(method, model, 4, start=9, seed=5)[-1]
    model.load_state_dict(snapshot)
    with _bame_attached(layers, total=40, interval=2, fraction=0.5) as other:    # the restored method
        other.load_state_dict(loaded)
        b = _train_steps(other, model, 4, start=9, seed=5)[-1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_initial_mask_is_the_magnitude_mask():
    conv = nn.Conv2d(8, 4, 3)
    method = _bame({"conv": conv}, layout="nhwc")
    assert torch.equal(method.masks()["conv"], nm_mask(conv.weight, 2, 4, "nhwc"))


@pytest.mark.parametrize("params,needle", [
    ({"t_i": 0.8, "t_f": 0.5}, "method.params.t_f"),
    ({"t_i": -0.1}, "method.params.t_i"),
    ({"interval": 0}, "method.params.interval"),
    ({"fraction": 1.5}, "method.params.fraction"),
    ({"osc_decay": 2.0}, "method.params.osc_decay"),
    ({"freeze_threshold": 0.0}, "method.params.freeze_threshold"),
    ({"swaps_per_block": 2}, "method.params.swaps_per_block"),    # 1:4 allows one swap per block
])
def test_bad_params_name_the_field(params, needle):
    with pytest.raises(MethodError) as info:
        _bame({"fc": nn.Linear(8, 4)}, pattern=Pattern(1, 4), **params)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_cli_run_is_sparser_than_srste(tmp_path):
    out = tmp_path / "bame"
    result = CliRunner().invoke(app, ["train", "data.dataset=synthetic", "model.name=mlp", "train.epochs=2",
                                      "data.batch_size=64", "--method", "bame", "--pattern", "2:4", "--out",
                                      str(out), "--no-progress", "method.params.interval=4",
                                      "method.params.switch=0"])
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    flops = summary["train_flops"]
    assert summary["steps"] == 16 and summary["final_accuracy"] > 30.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["method"]["updates"] == 2                       # steps 4 and 8 (t_f = 12)
    # split the counted MACs into the dense layers (3F each) and the sparse ones
    model = image_model("mlp", num_classes=10, in_channels=1, image_size=28, width=1.0)
    macs = macs_per_sample(model, torch.zeros(1, 1, 28, 28))
    sparse = set(summary["sparse_layers"])
    f_sparse = sum(f for n, f in macs.items() if f"{n}.weight" in sparse)
    f_dense = sum(macs.values()) - f_sparse
    samples = flops["dense_total"] / (3 * sum(macs.values()))
    assert samples == 16 * 64
    sparse_ratio = (flops["total"] - 3 * f_dense * samples) / (3 * f_sparse * samples)
    assert sparse_ratio < (0.5 + 2) / 3
    assert 0.5 < sparse_ratio < 0.5 + 0.5 * 2 / 16 / 3 + 1e-6     # 3rF plus two update steps' scored blocks
    srste_ratio = (3 * f_dense + 2.5 * f_sparse) / (3 * (f_dense + f_sparse))
    assert flops["ratio"] < srste_ratio
    for name in sparse:
        assert summary["sparse_layers"][name]["pattern"] == "2:4"
