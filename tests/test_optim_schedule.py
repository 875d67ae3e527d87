"""The optimizer and schedule a spec asks for: AdamW's betas, weight decay on the matrices alone, gradient
clipping in the step's contract order, warmup in steps and a cosine that ends at min_lr."""

import json
import math

import pytest
import torch
from torch import nn

from helpers import assert_refused, quick_train, snapshot
from nmtrain.experiments.methods import Capabilities, Method, train_step
from nmtrain.experiments.runner import _lr_lambda, _optimizer
from nmtrain.experiments.spec import SpecError, load_spec
from nmtrain.experiments.sparsify import sparsify


def _spec(*overrides):
    return load_spec(None, list(overrides))


def _cosine_to_floor(step, lr, min_lr, warmup, total):
    """Direct transcription: linear warmup over ``warmup`` steps, then a half cosine from lr to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup,min_lr", [(0, 0.0), (7, 0.0), (7, 1e-4), (0, 1e-3)])
def test_cosine_warmup_steps_and_min_lr_follow_the_formula(warmup, min_lr):
    spec = _spec("optim.lr=1e-3", f"schedule.warmup_steps={warmup}", f"schedule.min_lr={min_lr}")
    factor = _lr_lambda(spec, steps_per_epoch=13, total_steps=50)
    for step in range(0, 55):
        assert factor(step) * 1e-3 == pytest.approx(_cosine_to_floor(step, 1e-3, min_lr, warmup, 50), rel=1e-12,
                                                   abs=1e-18)
    assert factor(50) * 1e-3 == pytest.approx(min_lr, abs=1e-18)


def test_adamw_betas_and_decay_on_matrices_alone():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    opt = _optimizer(_spec("optim.name=adamw", "optim.betas=[0.8, 0.95]", "optim.weight_decay=0.1",
                           "optim.decay_params=matrices"), model)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["betas"] == (0.8, 0.95) and decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(plain["params"]) == 4          # two biases, the norm's weight and bias
    every = _optimizer(_spec("optim.name=adamw", "optim.weight_decay=0.1"), model)
    assert len(every.param_groups) == 1 and every.param_groups[0]["weight_decay"] == 0.1


class _Probe(Method):
    """Records the gradient norm the method sees in after_backward."""
    caps = Capabilities(sparse=False)

    def __init__(self, model):
        super().__init__(None, None)
        self.model, self.norms = model, []

    def after_backward(self, step):
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1)
                                                                    for p in self.model.parameters()]))))


def test_gradients_are_clipped_before_the_methods_own_terms():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    x, y = torch.randn(16, 8) * 50, torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = _Probe(model)
    train_step(probe, 0, opt, lambda: nn.functional.cross_entropy(model(x), y))
    assert probe.norms[0] > 1.0                     # unclipped, the norm is large
    train_step(probe, 1, opt, lambda: nn.functional.cross_entropy(model(x), y), clip=0.5)
    assert probe.norms[1] == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("override,needle", [
    ("optim.betas=[0.9]", "optim.betas: give two values"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: "),
    ("optim.decay_params=biases", "optim.decay_params: "),
    ("optim.grad_clip=0", "optim.grad_clip: "),
    ("schedule.min_lr=-1", "schedule.min_lr: "),
])
def test_bad_optimizer_and_schedule_values_are_refused_at_load(override, needle):
    with pytest.raises(SpecError, match=needle.replace(".", r"\.")):
        _spec(override)


def test_min_lr_above_lr_and_two_warmups_are_refused_before_anything_is_written(tmp_path):
    before = snapshot(tmp_path)
    assert_refused(quick_train(tmp_path / "run", "schedule.warmup_steps=5", "schedule.warmup_epochs=1"),
                   "schedule.warmup_steps, schedule.warmup_epochs: both set")
    assert_refused(quick_train(tmp_path / "run", "schedule.min_lr=1.0"), "schedule.min_lr: ")
    assert snapshot(tmp_path) == before


def test_a_clipped_adamw_run_trains(tmp_path):
    result = quick_train(tmp_path / "run", "optim.name=adamw", "optim.lr=0.01", "optim.grad_clip=1.0",
                         "optim.decay_params=matrices", "schedule.warmup_steps=3", "schedule.min_lr=0.001")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["lr"] == pytest.approx(0.001)          # the cosine ended at min_lr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_accuracy"] > 50


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optim_fused_asks_for_torchs_fused_kernel_and_is_off_by_default(name):
    model = nn.Linear(4, 3)
    assert _optimizer(_spec(f"optim.name={name}"), model).defaults["fused"] is None     # torch's own choice
    assert _optimizer(_spec(f"optim.name={name}", "optim.fused=true"), model).defaults["fused"] is True
    with pytest.raises(SpecError, match=r"optim\.fused: expected bool"):
        _spec("optim.fused=maybe")


def _sparsified_adamw_weights(fused: bool, decay: float, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(24, 16), torch.randint(0, 4, (24,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True if fused else None)
    with sparsify(model, "srste", "2:4", opt, decay=decay, keep_first_dense=False):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_fused_optimizer_takes_the_methods_hooks_as_the_unfused_one():
    """torch's fused AdamW runs the method's work around its step as the default one does: SR-STE's decay on the
    pruned weights is in the gradient it updates from. The two kernels' arithmetic differs in the last bits
    alone; without the decay the weights move by far more than that."""
    plain, fused = _sparsified_adamw_weights(False, 0.05), _sparsified_adamw_weights(True, 0.05)
    undecayed = _sparsified_adamw_weights(True, 0.0)
    for a, b, c in zip(plain, fused, undecayed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert max(float((b - c).abs().max()) for b, c in zip(fused, undecayed)) > 1e-3


def test_a_fused_run_trains_as_the_unfused_one(tmp_path):
    """`optim.fused: true` end to end: the run trains, its resolved spec records the field, and its weights are
    the unfused run's up to the kernels' last bits."""
    weights = {}
    for fused in ("false", "true"):
        out = tmp_path / f"fused-{fused}"
        result = quick_train(out, "--method", "srste", "optim.name=adamw", "optim.lr=0.01", f"optim.fused={fused}")
        assert result.exit_code == 0, result.output
        assert f"fused: {fused}" in (out / "config.yaml").read_text()
        weights[fused] = torch.load(out / "model.pt", weights_only=True)
    assert weights["true"].keys() == weights["false"].keys()
    for key, value in weights["true"].items():
        torch.testing.assert_close(value, weights["false"][key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(value, weights["false"][key]) for key, value in weights["true"].items())
