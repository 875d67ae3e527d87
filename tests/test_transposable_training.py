"""Transposable training with the paper's interval: why masks flipped en masse, and the fix.

Between two recomputes (``mask_interval`` steps) the mask is fixed. A pruned weight gets the
straight-through gradient dL/dW~, but its own value does not enter the loss, so nothing in that gradient
shrinks as the weight grows: it integrates the same push for the whole interval (with momentum), and SR-STE's
decay (2e-4) is far too weak to hold it. The pruned weights outgrow the kept ones, and at the next
recompute a large share of the mask flips at once onto weights whose values were never tested by the loss:
on LeNet-5 at 1:4-T (interval 40) the loss jumps to 10 and the run ends at chance. ``bound_pruned`` (the
default) keeps every pruned weight's magnitude within the largest kept magnitude of its group after each
optimizer step, so a recompute swaps weights of comparable size, as a per-step recompute would.
"""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments.methods import attach
from nmtrain.experiments.methods.transposable import bound_pruned
from nmtrain.sparsity import Pattern, from_matrix, nm_mask, to_matrix

from helpers import ROOT, method_step


def _run(bound: bool, steps: int = 40, interval: int = 40):
    """A 2-layer MLP whose hidden layer is 1:4-T, trained ``steps`` steps with SGD + momentum."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    layers = {"hidden": net[2]}
    params = {"mask_interval": interval, "bound_pruned": bound}
    with attach("transposable", layers, Pattern(1, 4, True), params, total_steps=steps,
                steps_per_epoch=steps) as method:
        opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        teacher = torch.randn(16, 4, generator=gen)
        for step in range(steps + 1):
            x = torch.randn(64, 16, generator=gen)
            y = (x @ teacher).argmax(1)
            if step == steps:
                method.before_step(step)    # the recompute, without a step after it
                break
            method_step(method, net, opt, x, y, step)
            if step == steps - 1:      # just before the recompute: pruned weights above their group's kept ones
                w = layers["hidden"].weight.detach().abs()
                mask = method.masks()["hidden"]
                cap = (w * mask).reshape(32, 8, 4).amax(-1, keepdim=True).expand(-1, -1, 4).reshape(32, 32)
                growth = float((w[~mask] > cap[~mask]).float().mean())
    events = method.pop_mask_events()
    return growth, events


def test_pruned_weights_outgrow_the_kept_ones_without_the_bound_and_flip_the_mask_en_masse():
    growth, events = _run(bound=False)
    assert growth > 0.1                     # over a tenth of the pruned weights outgrew their group's kept one
    assert [e["step"] for e in events] == [40] and events[0]["change_rate"] > 0.2


def test_bound_keeps_pruned_weights_within_the_kept_ones_and_the_recompute_calm():
    growth, events = _run(bound=True)
    assert growth == 0.0
    unbounded = _run(bound=False)[1][0]["change_rate"]
    assert events[0]["change_rate"] < 0.25 * unbounded


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
def test_bound_pruned_clamps_only_pruned_weights_to_their_groups_largest_kept(layout):
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3) * 3
    mask = torch.rand(8, 8, 3, 3) < 0.3
    before = w.clone()
    bound_pruned(w, mask, 4, layout)
    assert torch.equal(w[mask], before[mask])                                   # kept untouched
    wm, bm, em = to_matrix(w, layout), to_matrix(before, layout), to_matrix(mask, layout)
    cap = (bm.abs() * em).reshape(8, -1, 4).amax(-1, keepdim=True).expand(-1, -1, 4).reshape(wm.shape)
    pruned = ~em
    assert bool((wm.abs()[pruned] <= cap[pruned] + 1e-7).all())
    assert torch.equal(torch.sign(wm[pruned]) * (wm[pruned] != 0), torch.sign(bm[pruned]) * (wm[pruned] != 0))
    small = pruned & (bm.abs() <= cap)
    assert torch.equal(wm[small], bm[small])                                    # within the cap: unchanged


def test_metrics_record_the_change_rate_of_every_recompute(tmp_path):
    out = tmp_path / "t"
    result = CliRunner().invoke(app, ["train", "data.dataset=synthetic", "model.name=mlp", "train.epochs=2",
                                      "data.batch_size=64", "--method", "transposable", "--pattern", "2:4-T",
                                      "method.params.mask_interval=5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for line in lines for e in line["mask_recomputes"]]
    assert steps == [5, 10, 15]                  # 16 steps: recomputes at 5, 10, 15 (the first mask is at 0)
    rates = [e["change_rate"] for line in lines for e in line["mask_recomputes"]]
    assert all(0.0 <= r <= 1.0 for r in rates)
    summary = json.loads((out / "summary.json").read_text())
    for name in summary["sparse_layers"]:
        assert summary["sparse_layers"][name]["pattern"] == "2:4-T"


def test_stability_benchmark_runs_both_variants_and_reuses_finished_runs(tmp_path):
    import subprocess
    import sys

    script = ROOT / "benchmarks" / "transposable_stability.py"
    cmd = [sys.executable, str(script), "--patterns", "2:4-T", "--seeds", "0,1", "--interval", "2",
           "--out", str(tmp_path), "--set", "data.dataset=synthetic", "--set", "model.name=mlp",
           "--set", "train.max_steps=6", "--set", "data.batch_size=64"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    rows = list(__import__("csv").DictReader((tmp_path / "stability.csv").open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [("unbounded", "0"), ("unbounded", "1"),
                                                         ("bounded", "0"), ("bounded", "1")]
    assert all(r["max_change_rate"] != "" for r in rows)
    assert (tmp_path / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = tmp_path / "bounded" / "transposable-2of4T" / "seed1" / "model.pt"
    stamp = model.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and model.stat().st_mtime_ns == stamp      # finished runs are reused


def _bound_formula(weight, mask, m, layout):
    """The clamp as first written (GEMM-view copies, kept entries restored by a select): the transcription
    the in-place version must equal bit for bit."""
    w, e = to_matrix(weight, layout), to_matrix(mask, layout)
    rows, k = w.shape
    wg, eg = w.reshape(rows, k // m, m), e.reshape(rows, k // m, m)
    cap = torch.where(eg, wg.abs(), torch.zeros((), dtype=w.dtype)).amax(-1, keepdim=True)
    return from_matrix(torch.where(eg, wg, wg.clamp(-cap, cap)).reshape(rows, k), weight.shape, layout)


@pytest.mark.parametrize("shape,layout,channels_last", [((8, 16), "nhwc", False), ((8, 8, 3, 3), "nhwc", False),
                                                        ((8, 8, 3, 3), "flatten", False),
                                                        ((8, 8, 3, 3), "nhwc", True), ((8, 8, 3, 3), "flatten", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_pruned_in_place_equals_the_formula_bit_for_bit(shape, layout, channels_last, dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(shape, generator=g) * 3).to(dtype)
    flat = w.view(-1)
    flat[1::4] = -flat[0::4]                                         # tied magnitudes within groups
    # an N:M mask (2 kept of every 4 along K), drawn at random rather than by magnitude
    mask = nm_mask(torch.rand(shape, generator=g), 2, 4, layout)
    w[~mask & (torch.rand(shape, generator=g) < 0.3)] = -0.0          # signed zeros among the pruned
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    want = _bound_formula(w.clone(), mask, 4, layout)
    ptr = w.data_ptr()
    bound_pruned(w, mask, 4, layout)
    assert w.data_ptr() == ptr                                       # in place
    assert torch.equal(w, want) and torch.equal(torch.signbit(w), torch.signbit(want))


def test_grouped_is_a_view_with_the_groups_of_m_along_k():
    from nmtrain.sparsity import grouped
    conv = torch.arange(4 * 8 * 3 * 3, dtype=torch.float32).reshape(4, 8, 3, 3)
    g, dim = grouped(conv, 4, "nhwc")
    assert g.data_ptr() == conv.data_ptr() and dim == 2 and g.shape == (4, 2, 4, 3, 3)
    # a group is 4 consecutive input channels at one tap: the nhwc matrix's groups of 4 along K
    assert torch.equal(g.movedim(2, -1).permute(0, 2, 3, 1, 4).reshape(4, -1, 4),
                       to_matrix(conv, "nhwc").reshape(4, -1, 4))
    g, dim = grouped(conv, 4, "flatten")
    assert torch.equal(g, to_matrix(conv, "flatten").reshape(4, -1, 4)) and g.data_ptr() == conv.data_ptr()
    with pytest.raises(RuntimeError):
        grouped(conv.contiguous(memory_format=torch.channels_last), 4, "flatten")


@pytest.mark.parametrize("bound", [True, False])
def test_the_bound_makes_the_next_forwards_masked_weight_in_its_pass(monkeypatch, bound):
    """After the optimizer step, the bound reads every weight; the next eager forward's W ⊙ E is made in that
    pass (`Method.hold_for_forward`) and taken, not made again: the same weights as making it in the forward
    (tests/test_step_identity.py holds every bit). Nothing is held before a forward has taken the eager path
    (a compiled forward makes its own), nor without the bound."""
    import nmtrain
    from nmtrain.experiments.methods.base import StoredMaskMethod

    made = []
    held_product, held_batch = StoredMaskMethod._held_product, StoredMaskMethod._held_batch
    monkeypatch.setattr(StoredMaskMethod, "_held_product",
                        lambda self, name, module: made.append(name) or held_product(self, name, module))

    def batch(self, weights):                   # every layer's product at once (sparsity.batch)
        out = held_batch(self, weights)
        made.extend(self.ctx.layers if out is not None else [])
        return out
    monkeypatch.setattr(StoredMaskMethod, "_held_batch", batch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with nmtrain.sparsify(net, "transposable", "2:4", opt, mask_interval=3, bound_pruned=bound) as handle:
        method = handle.method
        assert not method.forwards_eagerly
        per_step = []
        for _ in range(6):
            made.clear()
            handle.begin_step()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
            per_step.append(len(made))
        layers = len(handle.layers)
        assert method.forwards_eagerly and layers == 2
    # the first step makes its own; with the bound each later one takes what the bound made, except after a
    # recompute (step 3: the mask it was made with is gone), which makes its own again
    assert per_step == ([layers, 0, 0, layers, 0, 0] if bound else [layers] * 6)
    # steps whose forward never took per_forward's path (as a compiled one does not): the bound holds nothing
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with nmtrain.sparsify(net, "transposable", "2:4", opt, bound_pruned=bound) as handle:
        for _ in range(2):
            handle.begin_step()
            for p in net.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        assert handle.method._masks and not handle.method.forwards_eagerly and not handle.method._ready
