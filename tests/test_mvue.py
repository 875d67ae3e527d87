"""MVUE 2:4 (sparsity/mvue.py) and the MVUE weight gradient (experiments/methods/wgrad.py, `mvue_dw`).

The sampler against a float64 transcription of FRONTIER.md §2 "MVUE 2:4" (Hu et al.'s ``_MVUE24_approx``),
its unbiasedness and variance over 10,000 draws, and the layers' backward: dX and dbias exact, dW an
unbiased 2:4 sample along the tokens, the draws seeded by the run and restored by ``--resume``.
"""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from nmtrain.experiments.layers import gemm
from nmtrain.experiments.methods import attach, get_method, list_methods
from nmtrain.experiments.methods.ste import ste_mask
from nmtrain.experiments.methods.wgrad import WeightGradSampler, mvue_gemm
from nmtrain.sparsity import Pattern, is_mvue24, mvue24, mvue24_keep_probability, mvue24_variance, mvue24_violation
from nmtrain.sparsity.mvue import EPS

from helpers import assert_refused, interrupt_at, quick_train, resume
from test_resume import _assert_same_run, _run

DRAWS = 10_000


# --- the formula, transcribed ----------------------------------------------------------------------

def _p_transcribed(x: list[float]) -> list[float]:
    """p_i for one group of 4, straight from the formula (float64 Python arithmetic)."""
    a = [abs(v) + EPS for v in x]
    total = sum(a)
    t = [ai / total for ai in a]
    return [t[i] + a[i] * (sum(t[j] / (total - a[j]) for j in range(4)) - t[i] / (total - a[i])) for i in range(4)]


def _p_rows(x: torch.Tensor) -> torch.Tensor:
    """The transcription over the last dimension, zero-padded to a multiple of 4 and trimmed."""
    out = []
    for row in x.reshape(-1, x.shape[-1]).tolist():
        padded = row + [0.0] * ((-len(row)) % 4)
        ps = [p for g in range(0, len(padded), 4) for p in _p_transcribed(padded[g:g + 4])]
        out.append(ps[:len(row)])
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "random": torch.randn(6, 16, generator=g, dtype=torch.float64),
        "tied": torch.tensor([[1.0, 1, 1, 1, 2, 2, 0.5, 0.5, -3, 3, -3, 3, 1, 1, 0, 0]], dtype=torch.float64),
        "integers": torch.randint(-2, 3, (5, 12), generator=g).double(),     # many ties and zeros
        "zeros": torch.zeros(2, 8, dtype=torch.float64),
        "ragged": torch.randn(3, 10, generator=g, dtype=torch.float64),      # 10: a trailing group of 2
        "scales": torch.tensor([[1e-6, 1.0, 1e3, -1e-3, 5.0, -5.0, 1e-30, 2.0]], dtype=torch.float64),
    }


@pytest.mark.parametrize("kind", list(_inputs()))
def test_keep_probability_is_the_formula(kind):
    x = _inputs()[kind]
    p = mvue24_keep_probability(x)
    assert p.dtype == torch.float64 and p.shape == x.shape
    assert (p - _p_rows(x)).abs().max().item() <= 1e-12
    full = x.shape[-1] // 4 * 4
    assert torch.allclose(p[..., :full].reshape(*x.shape[:-1], -1, 4).sum(-1), torch.tensor(2.0, dtype=torch.float64))
    variance = x.square() * (1 / _p_rows(x) - 1)
    assert ((mvue24_variance(x) - variance).abs() / variance.abs().clamp_min(1)).max().item() <= 1e-12


def test_an_all_zero_group_keeps_each_entry_with_probability_one_half():
    assert torch.equal(mvue24_keep_probability(torch.zeros(4, dtype=torch.float64)),
                       torch.full((4,), 0.5, dtype=torch.float64))


# --- the sampler ----------------------------------------------------------------------------------

def _statistical_input():
    """Random, tied and all-zero groups; entries that are kept rarely (p < 0.05) are left out, so that
    10,000 draws see every kept entry often (the normal approximation behind the 4-SE bounds holds)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(24, generator=g, dtype=torch.float64).sign() * (0.5 + torch.rand(24, generator=g,
                                                                                                dtype=torch.float64)),
                   torch.tensor([1.0, 1, 1, 1, 2, -2, 1, 1, 0, 0, 0, 0, 3, 0, 0, 0], dtype=torch.float64)])
    assert mvue24_keep_probability(x)[x != 0].min() > 0.05
    return x


def _draws(x, seed=0, n=DRAWS):
    return mvue24(x.expand(n, *x.shape), torch.Generator().manual_seed(seed))


def test_unbiased_within_4_standard_errors_for_every_element():
    x = _statistical_input()
    y = _draws(x)
    se = (mvue24_variance(x) / DRAWS).sqrt()
    assert ((y.mean(0) - x).abs() <= 4 * se).all(), ((y.mean(0) - x).abs() / se).max()
    assert torch.equal(y[:, x == 0], torch.zeros_like(y[:, x == 0]))   # a zero is sampled as zero, no variance


def test_keep_frequency_and_variance_match_the_closed_form():
    x = _statistical_input()
    y = _draws(x, seed=2)
    p = mvue24_keep_probability(x)
    nz = x != 0
    kept = (y != 0).double().mean(0)
    assert ((kept - p).abs()[nz] <= 4 * (p * (1 - p) / DRAWS).sqrt()[nz]).all()
    # Sample variance against σ² = x²(1/p − 1): a two-point variable (x/p w.p. p, else 0) has fourth central
    # moment μ4 = x⁴((1−p)⁴/p³ + 1 − p), and the (unbiased) sample variance of n draws has variance
    # (μ4 − σ⁴(n − 3)/(n − 1))/n exactly (positive also where p = 1/2 makes (Y − x)² constant).
    var = mvue24_variance(x)
    mu4 = x.pow(4) * ((1 - p).pow(4) / p.pow(3) + 1 - p)
    se = ((mu4 - var.square() * (DRAWS - 3) / (DRAWS - 1)) / DRAWS).clamp_min(0).sqrt()
    measured = y.var(0)
    assert ((measured - var).abs()[nz] <= 4 * se[nz]).all(), ((measured - var).abs() / se)[nz].max()


def test_a_sample_is_2_of_4_and_keeps_x_over_p():
    x = _inputs()["ragged"]
    y = _draws(x, n=500)
    assert is_mvue24(y)
    nz = (y != 0).reshape(500, 3, -1)
    assert (nz[..., :8].reshape(500, 3, 2, 4).sum(-1) == 2).all()        # no zero in x: exactly 2 of every 4
    assert (nz[..., 8:].sum(-1) <= 2).all()                              # the trailing 2 (padded to 4)
    scaled = (x / mvue24_keep_probability(x)).expand_as(y)
    assert torch.equal(y[y != 0], scaled[y != 0])
    assert mvue24_violation(torch.ones(2, 6)) == ("index (0,), entries 0..3 of the last dimension hold 4 non-zeros, "
                                                  "want at most 2")
    assert is_mvue24(torch.ones(3, 2)) and not is_mvue24(torch.ones(3, 7))


def test_the_draws_follow_the_generator_and_keep_the_dtype():
    x = torch.randn(8, 32)
    assert torch.equal(mvue24(x, torch.Generator().manual_seed(5)), mvue24(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(mvue24(x, torch.Generator().manual_seed(5)), mvue24(x, torch.Generator().manual_seed(6)))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        y = mvue24(x.to(dtype), torch.Generator().manual_seed(0))
        assert y.dtype == dtype and is_mvue24(y)


# --- the layers' backward ---------------------------------------------------------------------------

LAYERS = {
    "linear": (lambda: nn.Linear(12, 8), (3, 8, 12)),                   # 24 tokens over two leading dims
    "linear-ragged": (lambda: nn.Linear(12, 8), (10, 12)),              # 10 tokens: padded, trimmed
    "conv": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 7, 7)),
    "conv-reflect": (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), (2, 4, 5, 5)),
    "conv-same": (lambda: nn.Conv2d(4, 8, (2, 3), padding="same", bias=False), (2, 4, 5, 5)),
}


def _layer(kind):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    return make(), torch.randn(shape)


def _sampled_dy_t(module, dy, generator):
    """MVUE(dYᵀ) as the backward draws it: (C_out, tokens)."""
    if isinstance(module, nn.Linear):
        return mvue24(dy.reshape(-1, dy.shape[-1]).t(), generator)
    return mvue24(dy.transpose(0, 1).reshape(dy.shape[1], -1), generator)


def _dense_dw_of(module, x, dy_t):
    """The weight gradient autograd gives for the output gradient whose (C_out, tokens) view is dy_t."""
    w = module.weight.detach().requires_grad_()
    y = gemm(module, x, w)
    dy = dy_t.t().reshape(y.shape) if isinstance(module, nn.Linear) else \
        dy_t.reshape(y.shape[1], y.shape[0], *y.shape[2:]).transpose(0, 1)
    return torch.autograd.grad(y, w, dy)[0]


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_backward_data_and_bias_are_exact_and_dw_is_the_sampled_product(kind):
    module, x = _layer(kind)
    mask = torch.rand(module.weight.shape) > 0.5
    sampler = WeightGradSampler(seed=3)
    grads = []
    for route in (gemm, lambda m, xi, w: mvue_gemm(m, xi, w, sampler.generator)):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y = route(module, xi, ste_mask(module.weight, mask))     # dW flows through the STE to module.weight
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        before = sampler.generator(torch.device("cpu")).get_state()
        y.backward(dy)
        grads.append((y.detach(), xi.grad, module.bias.grad if module.bias is not None else None,
                      module.weight.grad.clone()))
    (y0, dx0, db0, dw0), (y1, dx1, db1, dw1) = grads
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert (db0 is None and db1 is None) or torch.equal(db0, db1)
    replay = torch.Generator()
    replay.set_state(before)
    sampled = _sampled_dy_t(module, dy, replay)
    assert is_mvue24(sampled)
    assert torch.allclose(dw1, _dense_dw_of(module, x, sampled), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dw1, dw0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dw_is_unbiased_over_many_draws(kind):
    module, x = _layer(kind)
    sampler = WeightGradSampler(seed=0)
    y = mvue_gemm(module, x, module.weight, sampler.generator)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    dense = torch.autograd.grad(gemm(module, x, module.weight), module.weight, dy)[0]
    n = 3000
    draws = torch.stack([torch.autograd.grad(y, module.weight, dy, retain_graph=True)[0] for _ in range(n)]).double()
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - dense).abs() <= 4.5 * se + 1e-6).all(), ((draws.mean(0) - dense).abs() / se).max()


# --- the method's generator -------------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def _grads(model, method, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _attach(model, seed, name="srste", mvue=True):
    layers = {"0": model[0], "2": model[2]}
    cls = get_method(name)
    return attach(cls, layers, cls.caps.mask_pattern(Pattern(2, 4)), {"mvue_dw": mvue}, seed=seed)


@pytest.mark.parametrize("name", ["srste", "transposable"])
def test_the_draws_are_seeded_by_the_run_and_restored_from_the_state_dict(name):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    runs = {}
    for seed in (0, 0, 1):
        model = _mlp()
        with _attach(model, seed, name) as method:
            runs.setdefault(seed, []).append(_grads(model, method, x))
            state = method.state_dict()
            after = _grads(model, method, x)
        with _attach(model, seed, name) as fresh:       # a resumed run: the saved state, the same next draws
            fresh.load_state_dict(state)
            assert all(torch.equal(a, b) for a, b in zip(after, _grads(model, fresh, x)))
    (a, b), (c,) = runs[0], runs[1]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])          # weight grads differ with the seed
    assert torch.equal(a[1], c[1])              # the bias gradient is exact
    assert torch.is_tensor(state["wgrad_rng"]["cpu"])
    # Not torch's global stream nor a plain manual_seed(seed) one: the run's seed is mixed with a tag.
    assert WeightGradSampler(0).stream_seed() not in (0, torch.initial_seed())


def test_evaluation_draws_nothing():
    model = _mlp()
    x = torch.randn(8, 16)
    with _attach(model, 0) as method:
        with torch.no_grad():
            model(x)
        model(x)                                # a forward with grad mode and no backward
        assert method.state_dict() == {}        # no generator was ever needed
        _grads(model, method, x)
        state = method.wgrad_sampler().generator(torch.device("cpu")).get_state()
        with torch.no_grad():
            model(x)
        model(x)
        assert torch.equal(method.wgrad_sampler().generator(torch.device("cpu")).get_state(), state)


def test_mvue_dw_sets_the_weight_gradient_density():
    for mvue, dw in ((False, 1.0), (True, 0.5)):
        model = _mlp()
        with _attach(model, 0, "srste", mvue) as s, _attach(_mlp(), 0, "transposable", mvue) as t:
            assert s.densities("0", 0) == (0.5, 1.0, dw) and t.densities("0", 0) == (0.5, 0.5, dw)


# --- runs --------------------------------------------------------------------------------------------

def test_a_run_with_mvue_dw_counts_the_weight_gradient_at_half(tmp_path):
    summaries = {}
    for mvue in ("false", "true"):
        result = quick_train(tmp_path / mvue, "--method", "srste", "--pattern", "2:4", f"method.params.mvue_dw={mvue}")
        assert result.exit_code == 0, result.stderr
        summaries[mvue] = json.loads((tmp_path / mvue / "summary.json").read_text())
    off, on = (summaries[k]["train_flops"] for k in ("false", "true"))
    assert summaries["true"]["method_params"]["mvue_dw"] is True
    assert on["forward"] == off["forward"] and on["backward_data"] == off["backward_data"]
    # SR-STE at 2:4 runs its sparse layers' forward at 0.5, as the MVUE weight gradient: the two now agree,
    # and the run saves half of the sparse layers' dense weight-gradient MACs.
    assert on["backward_weight"] == on["forward"] < off["backward_weight"]
    assert off["total"] - on["total"] == off["backward_weight"] - off["forward"] > 0
    assert on["dense_total"] == off["dense_total"] and on["ratio"] < off["ratio"]
    w_off, w_on = (torch.load(tmp_path / k / "model.pt", weights_only=True) for k in ("false", "true"))
    assert any(not torch.equal(w_off[k], w_on[k]) for k in w_off)      # the sampled gradient trained it


def test_mvue_dw_is_refused_with_the_sparse_kernels(tmp_path):
    result = quick_train(tmp_path / "run", "--method", "transposable", "--pattern", "2:4-T", "accel=semi_structured",
                         "method.params.mvue_dw=true")
    assert_refused(result, "method.params.mvue_dw: ")
    assert not (tmp_path / "run").exists()


MVUE_METHODS = sorted(name for name, cls in list_methods().items()
                      if "mvue_dw" in {f.name for f in dataclasses.fields(cls.Params)})


def test_the_methods_that_take_mvue_dw():
    assert MVUE_METHODS == ["maskdecay", "srste", "sste", "transposable"]


@pytest.mark.parametrize("method", MVUE_METHODS)
def test_ctrl_c_then_resume_with_mvue_dw_is_bit_identical(tmp_path, monkeypatch, method):
    own = {"maskdecay": ["method.params.mask_interval=4", "method.params.dense_finetune=0.25"]}
    extra = ["--method", method, "--pattern", "2:4", "method.params.mvue_dw=true", *own.get(method, [])]
    ref = _run(tmp_path / "ref", *extra)
    assert ref.exit_code == 0, ref.stderr
    with monkeypatch.context() as m:
        interrupt_at(m, 10)
        stopped = _run(tmp_path / "cut", *extra)
    assert stopped.exit_code == 130, stopped.stderr + stopped.stdout
    assert "wgrad_rng" in torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["method"]
    resumed = resume(tmp_path / "cut")
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
