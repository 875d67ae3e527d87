"""Progressive gradient flow (`pgf`): the MDGF mask value and the SDGF stages against transcriptions of
the authors' code (abhibambhaniya/progressive_gradient_flow_nm_sparsity), the masked weight, every
stage's mask, the final export, training and resuming with both schedules."""

import json
import math

import pytest
import torch
from torch import nn

from nmtrain.experiments.methods import MethodError, attach, build_params, get_method
from nmtrain.experiments.methods.pgf import sdgf_stages
from nmtrain.sparsity import Pattern, nm_violation

from helpers import interrupt_at, quick_train, resume, run_cli


def _pgf(layers, pattern=(2, 4), total=40, **params):
    return attach("pgf", layers, Pattern(*pattern), params, total_steps=total, steps_per_epoch=8)


# -- transcriptions of timm/sparse_pruning/sparse_functions.py --------------------------------------

def _authors_value(decay, coef, step, dense):
    """``LinearDecay`` / ``ExponentialDecay``'s mask value; ``current_step_num`` counts from the end of
    the dense steps (train.py subtracts them)."""
    current_step_num = step - dense
    if decay == "linear":
        return max(1.0 - (coef * current_step_num), 0.0)
    return math.exp(-1 * coef * current_step_num)


def _authors_sparsify(n, m, total, dense, fine):
    """``get_decay_config`` with ``structure_decay_type == "sparsify"``: {first step of a frame: N}."""
    num_sparse_frames = int(math.log2(m / n)) + 1
    sparse_frame_size = (total - dense - fine) / num_sparse_frames
    config = {}
    for i in range(num_sparse_frames):
        config[int(dense) + int(i * sparse_frame_size)] = (m - 1) if i == 0 else int(m / math.pow(2, i))
    return config


def _authors_kept(config, step):
    """``SparseLinear`` sets ``self.N`` whenever the step is a key, and keeps it until the next one."""
    return config[max(k for k in config if k <= step)]


def _authors_mask(weight, n, m):
    """``get_sparse_mask`` row-wise (a Linear) or ``isconv`` (groups along C_in at each tap), float 0/1."""
    if weight.dim() == 2:
        a = weight.detach().abs().reshape(-1, m)
        index = torch.argsort(a, dim=1)[:, :int(m - n)]
        return torch.ones(a.shape, dtype=weight.dtype).scatter_(1, index, 0).reshape(weight.shape)
    a = weight.detach().abs().permute(0, 2, 3, 1).reshape(-1, m)
    index = torch.argsort(a, dim=1)[:, :int(m - n)]
    w_b = torch.ones(a.shape, dtype=weight.dtype).scatter_(1, index, 0)
    return w_b.reshape(weight.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2)


# -- the schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["exp", "linear"])
@pytest.mark.parametrize("dense,fine", [(0.0, 0.0), (0.25, 0.0), (0.1, 0.3)])
def test_mdgf_mask_value_equals_the_authors(decay, dense, fine):
    total, coef = 400, 0.004
    with _pgf({"l": nn.Linear(8, 4)}, total=total, decay=decay, decay_coef=coef, dense=dense, fine_tune=fine) as m:
        d, f = round(dense * total), round(fine * total)
        for step in range(total):
            if step < d:
                expect = 1.0                                  # dense: the plain weight
            elif step >= total - f:
                expect = 0.0                                  # fine-tune: the binary mask ("step")
            else:
                expect = _authors_value(decay, coef, step, d)
            assert abs(m.value_at(step) - expect) <= 1e-12, step
            assert m.kept_at(step) == (None if step < d else 2)
    if decay == "linear":
        assert m.value_at(round(dense * total) + 250) == 0.0  # 1 - 0.004 t reaches 0 at t = 250


POWERS = [(1, 2), (2, 4), (1, 4), (1, 8), (2, 8), (1, 16), (4, 16), (2, 16), (1, 32)]


@pytest.mark.parametrize("n,m", POWERS)
@pytest.mark.parametrize("total,dense,fine", [(40, 0.0, 0.0), (100, 0.1, 0.2), (37, 0.3, 0.1), (10, 0.5, 0.5)])
def test_sdgf_stages_equal_the_authors_sparsify_config(n, m, total, dense, fine):
    with _pgf({"l": nn.Linear(32, 4)}, (n, m), total=total, schedule="sdgf", dense=dense, fine_tune=fine) as method:
        d, f = round(dense * total), round(fine * total)
        config = _authors_sparsify(n, m, total, d, f)
        for step in range(total):
            assert method.kept_at(step) == (None if step < d else _authors_kept(config, step)), step
            assert method.value_at(step) == (1.0 if step < d else 0.0)        # binary masks throughout
        assert method.kept_at(total - 1) == n                                 # ends at the target


def test_sdgf_stage_lists():
    assert sdgf_stages(1, 8) == [7, 4, 2, 1]            # dense -> 7:8 -> 4:8 -> 2:8 -> 1:8 (the readme)
    assert sdgf_stages(2, 4) == [3, 2] and sdgf_stages(1, 4) == [3, 2, 1]
    assert sdgf_stages(1, 16) == [15, 8, 4, 2, 1]       # the layer classes' comment
    # nmtrain: every list ends at the target (the authors' would stop at 4:8 for 3:8, at 7:8 for 5:8)
    assert sdgf_stages(3, 8) == [7, 4, 3] and sdgf_stages(5, 8) == [7, 5] and sdgf_stages(2, 6) == [5, 3, 2]
    assert sdgf_stages(3, 4) == [3] and sdgf_stages(1, 2) == [1]
    for n, m in [(n, m) for m in range(2, 33) for n in range(1, m)]:
        stages = sdgf_stages(n, m)
        assert stages[-1] == n and stages == sorted(set(stages), reverse=True)


# -- the forward --------------------------------------------------------------------------------------

def _tied(shape):
    g = torch.Generator().manual_seed(3)
    values = torch.tensor([0.0, 0.25, 0.25, 1.0, 3.0], dtype=torch.float64)
    w = values[torch.randint(0, len(values), shape, generator=g)]
    return w * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("tied", [False, True])
def test_masked_weight_equals_the_authors_formula(kind, tied):
    shape = (8, 16) if kind == "linear" else (4, 8, 3, 3)
    layer = nn.Linear(16, 8).double() if kind == "linear" else nn.Conv2d(8, 4, 3).double()
    with torch.no_grad():
        layer.weight.copy_(_tied(shape) if tied else torch.randn(shape, dtype=torch.float64))
    with _pgf({"l": layer}, (1, 4), total=100, decay_coef=0.01) as method:
        method.before_step(30)
        v = math.exp(-0.01 * 30)
        w_tilde = method.forward_weight("l", layer)
        if not tied:             # no ties: the same mask as the authors' argsort
            w_b = _authors_mask(layer.weight, 1, 4)
            assert torch.equal(w_b.bool(), method.masks()["l"])
        w_b = method.masks()["l"].double()
        expect = layer.weight * (w_b + (1 - w_b) * v)   # output*(w_b + (1-w_b)*mask_decay_value)
        assert (w_tilde - expect).abs().max().item() <= 1e-12
        assert nm_violation(method.masks()["l"], Pattern(1, 4), exact=True) is None


def test_a_weight_made_ahead_is_used_only_at_the_pattern_and_mask_value_it_was_made_at():
    """`Method.per_forward`: PGF's decayed weights made at the first training forward; a layer whose forward
    comes after the mask value moved (or the stage's N) gets the product at the value and N of now."""
    layers = {"a": nn.Linear(16, 8), "b": nn.Linear(16, 8)}
    with _pgf(layers, total=100, decay_coef=0.01) as method:
        method.before_step(10)
        method.forward_weight("a", layers["a"])                     # makes b's too, at step 10's value
        method.before_step(20)                                      # the value moves; the weights do not
        w_b = method.masks()["b"].float()
        expect = layers["b"].weight * (w_b + (1 - w_b) * method.value_at(20))
        assert (method.forward_weight("b", layers["b"]) - expect).abs().max().item() <= 1e-6
        method.forward_weight("a", layers["a"])                     # a new batch at step 20's value
        made = method._ready["b"][2]
        assert made[1] == method._value._version
        assert torch.equal(method.forward_weight("b", layers["b"]).detach(), made[3])    # taken as made


def test_the_gradient_passes_straight_through_to_every_weight():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with _pgf({"l": lin}, total=100, decay_coef=0.01) as method:
        method.before_step(10)
        w_tilde = method.forward_weight("l", lin).detach().requires_grad_(True)
        y, plain = lin(x), nn.functional.linear(x, w_tilde, lin.bias)
        assert torch.equal(y, plain)
        g = torch.randn_like(y)
        y.backward(g)
        plain.backward(g)
        assert torch.equal(lin.weight.grad, w_tilde.grad)     # not scaled by the mask value, no decay


def test_every_sdgf_stage_mask_is_valid_for_its_pattern():
    torch.manual_seed(0)
    layers = {"fc": nn.Linear(32, 8), "conv": nn.Conv2d(16, 8, 3)}
    with _pgf(layers, (1, 8), total=30, schedule="sdgf", dense=0.1, fine_tune=0.1) as method:
        seen = []
        for step in range(30):
            method.before_step(step)
            kept = method.kept_at(step)
            for name, mod in layers.items():
                w_tilde = method.forward_weight(name, mod)
                if kept is None:
                    assert w_tilde is mod.weight
                    continue
                assert nm_violation(w_tilde, Pattern(kept, 8), exact=True) is None, (step, name)
                assert method.densities(name, step) == (kept / 8, 1.0, 1.0)
            seen.append(kept)
        assert [k for i, k in enumerate(seen) if i == 0 or k != seen[i - 1]] == [None, 7, 4, 2, 1]


def test_mdgf_forward_is_dense_until_the_mask_value_is_zero():
    lin = nn.Linear(8, 4)
    with _pgf({"l": lin}, (1, 4), total=100, decay="linear", decay_coef=0.05, dense=0.1, fine_tune=0.2) as m:
        assert m.densities("l", 5) == (1.0, 1.0, 1.0)                 # dense phase
        assert m.densities("l", 20) == (1.0, 1.0, 1.0)                # v = 0.5: pruned weights still count
        assert m.value_at(30) == 0.0 and m.densities("l", 30) == (0.25, 1.0, 1.0)
    with _pgf({"l": lin}, (1, 4), total=100, fine_tune=0.2) as m:     # exp never reaches 0: the fine-tune does
        assert m.densities("l", 79) == (1.0, 1.0, 1.0) and m.densities("l", 80) == (0.25, 1.0, 1.0)


def test_parameters_are_checked():
    cls = get_method("pgf")
    with pytest.raises(MethodError, match="method.params.fine_tune: dense \\+ fine_tune must be at most 1"):
        build_params(cls, {"dense": 0.6, "fine_tune": 0.5})
    with pytest.raises(MethodError, match="method.params.schedule"):
        build_params(cls, {"schedule": "sdfg"})
    p = build_params(cls, {})
    assert (p.schedule, p.decay, p.decay_coef, p.dense, p.fine_tune) == ("mdgf", "exp", 1e-4, 0.0, 0.0)


# -- runs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["mdgf", "sdgf"])
def test_train_runs_and_exports_the_target_pattern(tmp_path, schedule):
    out = tmp_path / schedule
    result = quick_train(out, "--method", "pgf", "--pattern", "1:8", f"method.params.schedule={schedule}",
                         "train.eval_interval=4")
    assert result.exit_code == 0, result.stderr + result.stdout
    model = torch.load(out / "model.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparse_layers"]
    for key, info in summary["sparse_layers"].items():
        assert info["pattern"] == "1:8"
        assert nm_violation(model[key], Pattern(1, 8)) is None
        assert abs((model[key] != 0).float().mean().item() - 0.125) < 0.01
    densities = [json.loads(line)["pgf_density"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert densities == ([0.125] * 4 if schedule == "mdgf" else [0.875, 0.5, 0.25, 0.125])


RESUME = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=mlp",
          "train.epochs=3", "optim.lr=0.05", "schedule.warmup_epochs=0", "train.eval_interval=3",
          "train.checkpoint_interval=5", "--no-progress", "--method", "pgf", "--pattern", "1:8",
          "method.params.schedule=sdgf", "method.params.dense=0.25", "method.params.fine_tune=0.125"]


def test_sdgf_ctrl_c_then_resume_is_bit_identical(tmp_path, monkeypatch):
    """24 steps: dense to 6, stages 7:8, 4:8, 2:8, 1:8 from 6, 9, 13, 17, fine-tune from 21; cut at 10."""
    ref = run_cli("train", *RESUME, "--out", tmp_path / "ref")
    assert ref.exit_code == 0, ref.stderr
    with monkeypatch.context() as m:
        interrupt_at(m, 10)
        stopped = run_cli("train", *RESUME, "--out", tmp_path / "cut")
    assert stopped.exit_code == 130, stopped.stderr + stopped.stdout
    resumed = resume(tmp_path / "cut")
    assert resumed.exit_code == 0, resumed.stderr
    a, b = tmp_path / "ref", tmp_path / "cut"
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("wall_seconds"), sb.pop("wall_seconds")
    assert sa == sb
    densities = [json.loads(line)["pgf_density"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert densities == [1.0, 1.0, 0.875, 0.5, 0.25, 0.125, 0.125, 0.125]
