"""nmtrain's AdamW (experiments/optim.py) is torch's AdamW bit for bit: parameters and state, on pruned (zero)
gradients, gradients whose square underflows, several groups and a changing learning rate; torch's own
update wherever torch would not run its single-tensor loop; hooks and closures as torch's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nmtrain
from nmtrain.experiments import optim as optim_module
from nmtrain.experiments.optim import AdamW
from nmtrain.experiments.runner import _optimizer
from nmtrain.experiments.spec import load_spec
from nmtrain.sparsity import fused


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(_bits(p), _bits(q)) for p, q in zip(a.parameters(), b.parameters()))


def _same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(
        sa[k].keys() == sb[k].keys() and all(torch.equal(_bits(sa[k][n]), _bits(sb[k][n])) for n in sa[k])
        for k in sa)


def _groups(model: nn.Module, decay: float) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 5)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, masks: dict[str, torch.Tensor], steps: int,
           tiny: bool, dtype: torch.dtype) -> None:
    """``steps`` steps; the masked entries' gradients exactly zero (as a pruned weight's), a shrinking lr (as a
    schedule's); with ``tiny``, gradients scaled so far down that some squares underflow to zero."""
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 24, generator=g, dtype=dtype), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if name in masks:
                p.grad.mul_(masks[name])
            if tiny and step % 3 == 1:
                p.grad.mul_(1e-21 if dtype == torch.float32 else 1e-160)
        opt.step()
        for group in opt.param_groups:
            group["lr"] *= 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("betas,decay", [((0.9, 0.999), 0.01), ((0.8, 0.95), 0.1), ((0.9, 0.999), 0.0)])
def test_adamw_is_torchs_adamw_bit_for_bit(dtype, tiny, betas, decay, monkeypatch):
    served = []
    kernel = fused.adam_denominator
    monkeypatch.setattr(fused, "adam_denominator", lambda v, b, eps: served.append(int((v == 0).sum())) or
                        kernel(v, b, eps))
    ours = _model(dtype)
    masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) < 0.5
             for name, p in ours.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.mul_(masks.get(name, 1))
    theirs = copy.deepcopy(ours)
    a = AdamW(_groups(ours, decay), lr=1e-2, betas=betas)
    b = torch.optim.AdamW(_groups(theirs, decay), lr=1e-2, betas=betas)
    _train(ours, a, masks, 9, tiny, dtype)
    _train(theirs, b, masks, 9, tiny, dtype)
    assert _same(ours, theirs) and _same_state(a, b)
    assert len(served) == 9 * 3 and max(served) > 0         # every matrix's denominator, zeros among them
    assert not all(torch.equal(p, q) for p, q in zip(ours.parameters(), _model(dtype).parameters()))


def test_a_matrix_without_zeros_is_looked_at_again_every_few_steps(monkeypatch):
    """A dense gradient's moments skip the kernel's look for `LOOK_EVERY` steps; zeros that appear later (a mask
    that starts pruning) are taken by the kernel from the next look on; the bits are torch's throughout."""
    asked, served = [], []
    kernel = fused.adam_denominator

    def counting(v, b, eps):
        asked.append(v.shape)
        out = kernel(v, b, eps)
        served.append(out is not None)
        return out

    monkeypatch.setattr(fused, "adam_denominator", counting)
    ours = nn.Linear(64, 64, bias=False)
    theirs = copy.deepcopy(ours)
    a, b = AdamW(ours.parameters(), lr=1e-2), torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    pruned = torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) < 0.5
    steps = 3 * optim_module.LOOK_EVERY
    for step in range(steps):
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            if step >= optim_module.LOOK_EVERY + 3:           # pruning starts: zero gradients from here on
                model.weight.grad[pruned] = 0.0
                if step == optim_module.LOOK_EVERY + 3:
                    opt.state[model.weight]["exp_avg_sq"][pruned] = 0.0     # as if pruned from the start
            opt.step()
        assert _same(ours, theirs) and _same_state(a, b)
    # looks at steps 1 and 17 found none; from the look at step 33 on, the kernel serves every step
    assert served[:2] == [False, False] and all(served[2:])
    assert len(asked) == 2 + (steps - 2 * optim_module.LOOK_EVERY)


@pytest.mark.parametrize("flags", [{"amsgrad": True}, {"maximize": True}, {"foreach": True}, {"fused": True}])
def test_what_torch_updates_otherwise_is_torchs_own_update(flags, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "adam_denominator", lambda *a: calls.append(a))
    ours = _model(torch.float32)
    theirs = copy.deepcopy(ours)
    a, b = AdamW(ours.parameters(), lr=1e-2, **flags), torch.optim.AdamW(theirs.parameters(), lr=1e-2, **flags)
    _train(ours, a, {}, 4, False, torch.float32)
    _train(theirs, b, {}, 4, False, torch.float32)
    assert _same(ours, theirs) and _same_state(a, b) and not calls


def test_what_torch_refuses_it_refuses_as_torch():
    model = _model(torch.float32)
    opt = AdamW(model.parameters(), lr=1e-2, capturable=True)       # CUDA graphs' option, on CPU parameters
    model(torch.ones(2, 24)).sum().backward()
    with pytest.raises(AssertionError, match="capturable=True"):
        opt.step()


def test_a_tensor_learning_rate_is_torchs_update():
    ours = _model(torch.float32)
    theirs = copy.deepcopy(ours)
    a = AdamW(ours.parameters(), lr=torch.tensor(1e-2))
    b = torch.optim.AdamW(theirs.parameters(), lr=torch.tensor(1e-2))
    for opt, model in ((a, ours), (b, theirs)):
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 24)).sum().backward()
            opt.step()
    assert _same(ours, theirs)


def test_hooks_closure_and_state_dict_are_torchs():
    model = _model(torch.float32)
    opt = AdamW(model.parameters(), lr=1e-2)
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append("pre"))
    opt.register_step_post_hook(lambda *_: seen.append("post"))

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(3, 24)).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen == ["pre", "post"] and loss.item() > 0
    twin = torch.optim.AdamW(_model(torch.float32).parameters(), lr=1e-2)
    twin.load_state_dict(opt.state_dict())          # a checkpoint moves between the two either way
    assert _same_state(twin, opt)
    back = AdamW(_model(torch.float32).parameters(), lr=1e-2)
    back.load_state_dict(twin.state_dict())
    assert _same_state(back, opt) and back.param_groups[0]["decoupled_weight_decay"]


@pytest.mark.parametrize("method,params", [("fixed", {}), ("unstructured", {"gradual": True, "interval": 3}),
                                           ("bame", {"interval": 2})])
def test_a_sparsified_model_trains_to_the_same_bits_as_under_torchs_adamw(method, params):
    """The pruned weights' zero moments go through the kernel; weights and masks come out as torch's AdamW
    leaves them."""
    runs = []
    for cls in (AdamW, torch.optim.AdamW):
        model = _model(torch.float32)
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.05)
        handle = nmtrain.sparsify(model, method, "2:4", opt, total_steps=12, seed=3, **params)
        _train(model, opt, {}, 12, False, torch.float32)
        runs.append((model, handle.masks()))
        handle.remove()
    (a, masks_a), (b, masks_b) = runs
    assert _same(a, b) and masks_a.keys() == masks_b.keys()
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_a_spec_trains_with_it():
    model = nn.Linear(4, 4)
    assert type(_optimizer(load_spec(None, ["optim.name=adamw"]), model)) is optim_module.AdamW
    fused_opt = _optimizer(load_spec(None, ["optim.name=adamw", "optim.fused=true"]), model)
    assert fused_opt.param_groups[0]["fused"]         # torch's fused kernel, through torch's own update
