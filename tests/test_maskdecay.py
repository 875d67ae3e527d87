"""`maskdecay` (Hu et al., ICML 2024): transposable N:M mask recomputed every ``mask_interval`` steps, masked
decay on the pruned weights' gradient after clipping and before the step, a dense fine-tune at the end."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.experiments.methods import attach, train_step
from nmtrain.experiments.methods.maskdecay import masked_decay_
from nmtrain.experiments.methods.ste import change_rate
from nmtrain.sparsity import Pattern, nm_violation, transposable_mask

from helpers import quick_train

PT = Pattern(2, 4, transposable=True)


def _model(inputs: str = "random"):
    """A float64 MLP whose two Linear layers (8 x 8: two 4 x 4 tiles each way) are the sparse ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).double()
    if inputs == "tied":        # few distinct magnitudes: the mask solver meets ties in every tile
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, dtype=torch.float64) * 0.25)
    return model


def _batch(inputs: str = "random", n: int = 16):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    if inputs == "tied":
        x = torch.randint(-1, 2, (n, 8), generator=gen).double()
    return x, torch.randint(0, 8, (n,), generator=gen)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it is handed at each ``step()``: what the optimizer sees."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None}
        return super().step(closure)


def _attach(model, total=12, **params):
    return attach("maskdecay", {"0": model[0], "2": model[2]}, PT, params, total_steps=total, steps_per_epoch=total)


# --- the masked decay ---------------------------------------------------------------------------

@pytest.mark.parametrize("inputs", ["random", "tied"])
def test_masked_decay_equals_the_formula_on_pruned_entries_only(inputs):
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    if inputs == "tied":
        g, w = g.sign() * 0.5, w.sign() * 0.25
    mask = transposable_mask(w, 2, 4)
    expected = g + 3e-2 * (1 - mask.double()) * w            # g + alpha (1 - E) ⊙ W
    got = g.clone()
    masked_decay_(got, w, mask, 3e-2)
    assert float((got - expected).abs().max()) <= 1e-12
    assert torch.equal(got[mask], g[mask])                   # kept entries bit-untouched


@pytest.mark.parametrize("inputs", ["random", "tied"])
def test_the_optimizer_sees_the_clipped_gradient_plus_the_masked_decay(inputs):
    """One training step with clipping on: the gradient the optimizer steps with equals a float64
    transcription, clip(dL/dW~) + alpha (1 - E) ⊙ W; the decay itself is not clipped."""
    model, (x, y) = _model(inputs), _batch(inputs)
    ref = copy.deepcopy(model)
    alpha, clip = 0.05, 0.1
    with _attach(model, alpha=alpha, mvue_dw=False) as method:
        opt = RecordingSGD(model.parameters(), lr=0.1)
        train_step(method, 0, opt, lambda: F.cross_entropy(model(x), y), clip=clip)
        masks = method.masks()

    # the transcription: W~ = W ⊙ E, straight-through gradient (dL/dW = dL/dW~), clip, then the decay
    e0, e2 = masks["0"].double(), masks["2"].double()
    w0t, w2t = (ref[0].weight * e0).detach().requires_grad_(), (ref[2].weight * e2).detach().requires_grad_()
    b0, b2 = ref[0].bias.detach().requires_grad_(), ref[2].bias.detach().requires_grad_()
    loss = F.cross_entropy(F.linear(torch.relu(F.linear(x, w0t, b0)), w2t, b2), y)
    grads = torch.autograd.grad(loss, [w0t, b0, w2t, b2])
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    coef = min(1.0, clip / (float(norm) + 1e-6))
    assert coef < 0.5                                        # the clip is active
    clipped = [g * coef for g in grads]
    w0, w2 = ref[0].weight.detach(), ref[2].weight.detach()
    expected = {id(model[0].weight): clipped[0] + alpha * (1 - e0) * w0,
                id(model[0].bias): clipped[1],
                id(model[2].weight): clipped[2] + alpha * (1 - e2) * w2,
                id(model[2].bias): clipped[3]}
    for key, want in expected.items():
        assert float((opt.seen[key] - want).abs().max()) <= 1e-12
    # decayed before the clip instead, the pruned entries would read differently
    before = clipped[0] + coef * alpha * (1 - e0) * w0
    assert float((opt.seen[id(model[0].weight)] - before).abs().max()) > 1e-6


def test_no_decay_in_the_dense_fine_tune_and_a_plain_dense_forward():
    model, (x, y) = _model(), _batch()
    ref = copy.deepcopy(model)
    with _attach(model, total=4, dense_finetune=0.25, alpha=0.5) as method:     # dense from step 3
        assert method.dense_start == 3
        opt = RecordingSGD(model.parameters(), lr=0.0)                           # lr 0: the weights stay
        calls = []
        original = method.sparse_gemm
        method.sparse_gemm = lambda *a: calls.append(a[0]) or original(*a)
        for step in range(4):
            calls.clear()
            train_step(method, step, opt, lambda: F.cross_entropy(model(x), y))
            assert calls == ([] if step == 3 else ["0", "2"])     # the sparse phase goes through sparse_gemm
        out = model(x)
    assert torch.equal(out, ref(x))                                  # a plain dense layer
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    assert torch.equal(opt.seen[id(model[0].weight)], ref[0].weight.grad)   # dense gradient, no decay


# --- the masks: N:M-T, recomputed every mask_interval steps, flip rates ---------------------------

def test_masks_are_exact_nmt_recomputed_every_interval_with_their_flip_rates_until_the_dense_phase():
    model, (x, y) = _model(), _batch()
    with _attach(model, total=12, mask_interval=3, dense_finetune=0.25, mvue_dw=False) as method:
        assert method.dense_start == 9
        opt = torch.optim.SGD(model.parameters(), lr=2.0)
        seen, expected_events = [], []
        for step in range(12):
            weights = {n: m.weight.detach().clone() for n, m in method.ctx.layers.items()}
            train_step(method, step, opt, lambda: F.cross_entropy(model(x), y))
            masks = method.masks()
            if step < 9:
                for name, mask in masks.items():
                    assert nm_violation(mask, PT, exact=True) is None      # N:M along K and along C_out
                if step % 3 == 0:         # computed from the weights the step started with, by the exact solver
                    assert all(torch.equal(masks[n], transposable_mask(weights[n], 2, 4, "exact")) for n in masks)
                if step % 3 == 0 and step > 0:
                    expected_events.append({"step": step, "change_rate": change_rate(seen[-1], masks)})
                elif step > 0:
                    assert all(torch.equal(masks[n], seen[-1][n]) for n in masks)    # fixed in between
                assert method.export_pattern("0") == PT
                assert method.densities("0", step) == (0.5, 0.5, 1.0)
            else:
                assert all(bool(m.all()) for m in masks.values())        # dense: what the layers deploy
                assert method.export_pattern("0") is None
                assert method.densities("0", step) == (1.0, 1.0, 1.0)
            seen.append(masks)
        assert method.pop_mask_events() == expected_events
        assert [e["step"] for e in expected_events] == [3, 6]
        assert any(e["change_rate"] > 0 for e in expected_events)


def test_defaults_and_the_switch_step_of_the_authors_run():
    model = _model()
    with _attach(model, total=300000) as method:
        p = method.params
        assert (p.alpha, p.mask_interval, p.dense_finetune, p.mvue_dw) == (6e-5, 40, 1 / 6, True)
        assert method.dense_start == 250000              # train.py: `if iter_num == 250000` of 300000
        assert method.densities("0", 0) == (0.5, 0.5, method.wgrad_density())
    with _attach(model, total=10, dense_finetune=0.0) as method:
        assert method.dense_start == 10 and not method.in_dense_phase(9)


# --- the CLI ------------------------------------------------------------------------------------

def test_train_writes_the_recomputes_and_exports_dense_after_the_fine_tune(tmp_path):
    out = tmp_path / "run"
    result = quick_train(out, "--method", "maskdecay", "--pattern", "2:4", "method.params.mask_interval=4")
    assert result.exit_code == 0, result.stderr + result.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 16 steps, dense from 16 - round(16/6) = 13: recomputes at 4, 8 and 12, reported at the next evaluation
    assert [[e["step"] for e in m.get("mask_recomputes", [])] for m in metrics] == [[4], [8, 12]]
    assert all(0.0 <= e["change_rate"] <= 1.0 for m in metrics for e in m["mask_recomputes"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_finetune_step"] == 13
    model = torch.load(out / "model.pt", weights_only=True)
    for name, info in summary["sparse_layers"].items():
        assert info["pattern"] is None and info["density"] == 1.0
        assert bool((model[name] != 0).all())


def test_train_without_the_fine_tune_exports_nmt_weights(tmp_path):
    out = tmp_path / "run"
    result = quick_train(out, "--method", "maskdecay", "--pattern", "2:4", "method.params.dense_finetune=0")
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense_finetune_step"] is None
    model = torch.load(out / "model.pt", weights_only=True)
    for name, info in summary["sparse_layers"].items():
        assert info["pattern"] == "2:4-T" and info["transposable"] and info["density"] == 0.5
        assert nm_violation(model[name], PT, exact=True) is None
