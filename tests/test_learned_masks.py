"""Learned masks (MaskLLM): the candidates, the group view, the Gumbel-softmax soft mask, the prior and the loop."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.experiments.learned_masks import LearnedError, LearnedSettings, learn_masks
from nmtrain.sparsity import (MAX_CANDIDATES, Pattern, PatternError, candidate_count, candidate_masks, choice_of,
                              from_groups, gumbel_noise, hard_mask, make_mask, masks_from_choice, nm_violation,
                              prior_logits, soft_mask, to_groups, to_matrix)

PATTERNS = [Pattern(2, 4), Pattern(1, 4), Pattern(4, 8), Pattern(2, 4, True), Pattern(1, 4, True)]


# -- candidates -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m,count", [(2, 4, 6), (1, 4, 4), (4, 8, 70), (3, 4, 4)])
def test_row_candidates_are_every_group_with_n_kept(n, m, count):
    c = candidate_masks(n, m)
    assert c.dtype == torch.bool and tuple(c.shape) == (count, m) and candidate_count(n, m) == count == math.comb(m, n)
    assert torch.all(c.sum(1) == n)
    assert len({tuple(r.tolist()) for r in c}) == count
    if (n, m) == (2, 4):        # MaskLLM's own order (differentiable_mask.py 646-651)
        assert c.int().tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("n,m,count", [(2, 4, 90), (1, 4, 24), (3, 4, 24), (1, 3, 6)])
def test_tile_candidates_are_every_tile_with_n_per_row_and_column(n, m, count):
    c = candidate_masks(n, m, transposable=True)
    assert tuple(c.shape) == (count, m, m) and candidate_count(n, m, True) == count
    assert torch.all(c.sum(2) == n) and torch.all(c.sum(1) == n)
    assert len({tuple(t.flatten().tolist()) for t in c}) == count
    # the same set as brute force over all 2**(m*m) 0/1 tiles
    bits = (torch.arange(2 ** (m * m)).unsqueeze(1) >> torch.arange(m * m)) & 1
    tiles = bits.reshape(-1, m, m)
    ok = tiles[(tiles.sum(2) == n).all(1) & (tiles.sum(1) == n).all(1)]
    assert {tuple(t.flatten().tolist()) for t in ok} == {tuple(t.flatten().int().tolist()) for t in c}


def test_a_tile_family_too_large_to_enumerate_is_refused_with_one_line():
    with pytest.raises(PatternError) as err:
        candidate_masks(4, 8, transposable=True)
    msg = str(err.value)
    assert "\n" not in msg and "4:8-T" in msg and "116,963,796,250" in msg and f"{MAX_CANDIDATES:,}" in msg
    assert "2:4-T" in msg and "row-wise 4:8" in msg
    with pytest.raises(PatternError, match="8:16"):
        candidate_masks(8, 16)


# -- the group view -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 16), (8, 16, 3, 3), (12, 8, 1, 2)])
@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(2, 4, True), Pattern(4, 8)])
def test_groups_round_trip_and_hold_the_gemm_views_groups(shape, layout, pattern):
    if pattern.m == 8 and shape[0] == 12:
        pytest.skip("K not a multiple of 8")
    w = torch.randn(shape, dtype=torch.float64)
    groups = to_groups(w, pattern, layout)
    assert torch.equal(from_groups(groups, shape, pattern, layout), w)
    matrix = to_matrix(w, layout)
    m = pattern.m
    if pattern.transposable:
        assert tuple(groups.shape) == (matrix.numel() // m ** 2, m, m)
        tiles_per_row = matrix.shape[1] // m
        for g in (0, 1, groups.shape[0] - 1):
            r, c = divmod(g, tiles_per_row)
            assert torch.equal(groups[g], matrix[r * m:(r + 1) * m, c * m:(c + 1) * m])
    else:
        assert torch.equal(groups, matrix.reshape(-1, m))


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_any_choice_is_a_valid_mask_and_choice_of_inverts_it(layout, pattern):
    shape = (8, 16, 3, 3)
    c = candidate_masks(pattern.n, pattern.m, pattern.transposable)
    groups = to_groups(torch.zeros(shape), pattern, layout).shape[0]
    choice = torch.randint(0, c.shape[0], (groups,))
    mask = masks_from_choice(choice, c, shape, layout)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert nm_violation(mask, pattern, layout, exact=True) is None
    assert torch.equal(choice_of(mask, c, layout), choice)
    logits = torch.randn(groups, c.shape[0])
    assert torch.equal(from_groups(hard_mask(logits, c), shape, pattern, layout),
                       masks_from_choice(logits.argmax(-1), c, shape, layout))


def test_choice_of_refuses_a_group_that_is_no_candidate():
    c = candidate_masks(2, 4)
    mask = torch.tensor([[True, True, True, False]])
    with pytest.raises(PatternError, match="group 0"):
        choice_of(mask, c)


# -- the soft mask ----------------------------------------------------------------------------------------------

def _soft_mask_float64(logits, candidates, tau, scale, seed):
    """MaskLLM's forward, written out: p = softmax((logits * scale + g) / tau), g = -log(E), E ~ Exp(1)."""
    e = torch.empty(logits.shape, dtype=torch.float64).exponential_(generator=torch.Generator().manual_seed(seed))
    flat = candidates.flatten(1).tolist()
    out = []
    for row, draws in zip(logits.tolist(), e.tolist()):
        z = [(l * scale - math.log(d)) / tau for l, d in zip(row, draws)]
        top = max(z)
        w = [math.exp(v - top) for v in z]
        total = sum(w)
        out.append([sum(w[k] / total * flat[k][j] for k in range(len(w))) for j in range(len(flat[0]))])
    return torch.tensor(out, dtype=torch.float64).reshape(logits.shape[0], *candidates.shape[1:])


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(2, 4, True), Pattern(4, 8)])
@pytest.mark.parametrize("tau,scale", [(4.0, 1e2), (0.5, 3e2), (0.05, 5e2)])
@pytest.mark.parametrize("tied", [False, True])
def test_soft_mask_matches_a_float64_transcription(pattern, tau, scale, tied):
    c = candidate_masks(pattern.n, pattern.m, pattern.transposable)
    logits = torch.randn(7, c.shape[0], dtype=torch.float64) * 0.01
    if tied:
        logits[:, :] = 0.02
    got = soft_mask(logits, c, tau, scale, torch.Generator().manual_seed(5))
    want = _soft_mask_float64(logits, c, tau, scale, 5)
    assert got.dtype == torch.float64 and tuple(got.shape) == tuple(want.shape)
    assert (got - want).abs().max().item() <= 1e-12
    # each group's soft mask keeps N in total per row (and column): a convex mix of valid candidates
    assert torch.allclose(got.sum(-1), torch.full(got.shape[:-1], float(pattern.n), dtype=torch.float64))


def test_soft_mask_draws_torchs_gumbel_and_hard_is_straight_through():
    c = candidate_masks(2, 4)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    p = F.gumbel_softmax(logits * 100.0, tau=2.0)
    assert torch.allclose(soft_mask(logits, c, 2.0, 100.0, torch.Generator().manual_seed(3)), p @ c.double(),
                          atol=1e-12, rtol=0)
    hard = soft_mask(logits, c, 2.0, 100.0, torch.Generator().manual_seed(3), hard=True)
    assert torch.equal(hard, c.double()[p.argmax(-1)])           # forward: a candidate
    weights = torch.randn(5, 4, dtype=torch.float64)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft_mask(logits, c, 2.0, 100.0, torch.Generator().manual_seed(3)) * weights)
                                    .sum(), logits)
    assert torch.allclose(g_hard, g_soft, atol=1e-12, rtol=0)   # backward: the soft gradient
    assert gumbel_noise(logits, torch.Generator().manual_seed(0)).shape == logits.shape


# -- the prior ----------------------------------------------------------------------------------------------------

def _weight(shape, tied):
    w = torch.randn(shape)
    return w.sign() * 0.5 if tied else w          # tied: every |w| equal, the one-shot mask breaks the ties


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tied", [False, True])
def test_prior_logits_are_maskllms_formula_and_the_priors_candidate_wins(pattern, tied):
    shape = (8, 16, 3, 3)
    c = candidate_masks(pattern.n, pattern.m, pattern.transposable)
    prior = make_mask(_weight(shape, tied), pattern, "nhwc")
    logits = prior_logits(prior, c, "nhwc", 3.0, torch.Generator().manual_seed(1), init_std=0.01,
                          dtype=torch.float64)
    # float64 transcription of differentiable_mask.py 636 and 246-247
    noise = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.01
    groups = to_groups(prior, pattern, "nhwc").flatten(1).double()
    priors = groups @ c.flatten(1).double().t()
    assert (logits - (noise + (priors - 1) * noise.std() * 3.0)).abs().max().item() <= 1e-12
    # the boost alone puts the prior's candidate first by at least std * strength
    boost = (logits - noise) / (noise.std() * 3.0)
    top2 = boost.topk(2, dim=-1).values
    assert torch.all(top2[:, 0] - top2[:, 1] >= 1 - 1e-9)
    assert torch.equal(masks_from_choice(boost.argmax(-1), c, shape, "nhwc"), prior)
    # with a strength that dominates the N(0, 0.01) noise, the logits' argmax is the prior mask itself
    strong = prior_logits(prior, c, "nhwc", 50.0, torch.Generator().manual_seed(1))
    assert torch.equal(masks_from_choice(strong.argmax(-1), c, shape, "nhwc"), prior)
    assert torch.equal(from_groups(hard_mask(strong, c), shape, pattern, "nhwc"), prior)


def test_at_maskllms_strength_the_prior_is_the_argmax_of_most_groups_not_all():
    """MaskLLM's boost is relative to the noise: at strength 3 a 2:4 group starts on another candidate with
    probability about 1 - (1 - P(Z > 3/sqrt(2)))**4 ~ 6.5%."""
    c = candidate_masks(2, 4)
    prior = make_mask(torch.randn(64, 256), Pattern(2, 4))
    logits = prior_logits(prior, c, "nhwc", 3.0, torch.Generator().manual_seed(0))
    agree = (logits.argmax(-1) == choice_of(prior, c)).double().mean().item()
    assert 0.88 < agree < 0.98


# -- learn_masks -------------------------------------------------------------------------------------------------

def _toy(seed=1):
    """An MLP and its own outputs on inputs whose features have very different scales, with weights inverse
    to the scales: |w| ranks the weights against their contribution |w| * |x|, so magnitude is a bad mask."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.where(torch.rand(32, generator=g) < 0.5, 3.0, 0.2)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        w = torch.randn(16, 32, generator=g).sign() / scales * (0.7 + 0.6 * torch.rand(16, 32, generator=g))
        model[0].weight.copy_(w)
        x = torch.randn(512, 32, generator=g) * scales
        y = model(x)
    return model, x, y


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _masked_loss(model, layers, masks, x, y):
    saved = {k: v.weight.detach().clone() for k, v in layers.items()}
    with torch.no_grad():
        for k, v in layers.items():
            v.weight.mul_(masks[k])
        loss = F.mse_loss(model(x), y).item()
        for k, v in layers.items():
            v.weight.copy_(saved[k])
    return loss


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(2, 4, True)])
def test_learn_masks_beats_its_prior_valid_at_every_step_and_leaves_the_model_as_it_was(pattern):
    model, x, y = _toy()
    layers = {"0": model[0], "2": model[2]}
    model[2].bias.requires_grad_(False)            # flags are restored as they were, not all set to True
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v for k, v in model.named_parameters()}
    out_before = model(x).detach()
    prior = {k: make_mask(v.weight, pattern) for k, v in layers.items()}
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    seen, steps = [], []

    def on_masks(step, masks, logits):
        c = candidate_masks(pattern.n, pattern.m, pattern.transposable)
        for name, mask in masks.items():
            assert nm_violation(mask, pattern, "nhwc", exact=True) is None, (step, name)
            assert torch.equal(mask, masks_from_choice(logits[name].argmax(-1), c, mask.shape, "nhwc"))
        seen.append((step, {k: v.clone() for k, v in masks.items()}, {k: v.clone() for k, v in logits.items()}))

    settings = LearnedSettings(steps=200)
    masks, stats = learn_masks(model, layers, pattern, "nhwc", prior, lambda: iter(data), _mse, settings,
                               torch.Generator().manual_seed(0), on_step=lambda s, l: steps.append((s, l)),
                               on_masks=on_masks)
    assert [s[0] for s in seen] == list(range(200)) and [s for s, _ in steps] == list(range(200))
    c = candidate_masks(pattern.n, pattern.m, pattern.transposable)
    for name, mask in masks.items():                # deployed = argmax of the final logits
        assert torch.equal(mask, seen[-1][1][name])
        assert torch.equal(mask, masks_from_choice(seen[-1][2][name].argmax(-1), c, mask.shape, "nhwc"))
    assert _masked_loss(model, layers, masks, x, y) < 0.8 * _masked_loss(model, layers, prior, x, y)
    assert stats["steps"] == 200 and stats["seconds"] > 0 and 0 < stats["changed_vs_prior"] <= 1
    assert stats["loss_first"] == steps[0][1] and stats["loss_last"] == steps[-1][1]
    _assert_untouched(model, before, params, out_before, x)
    assert model.training and not model[2].bias.requires_grad and model[0].weight.requires_grad


def _assert_untouched(model, before, params, out_before, x):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[k] and type(p) is nn.Parameter for k, p in model.named_parameters())
    assert torch.equal(model(x).detach(), out_before)


def test_learn_masks_is_seeded():
    model, x, y = _toy()
    layers = {"0": model[0]}
    prior = {"0": make_mask(model[0].weight, Pattern(1, 4))}
    data = [(x[:128], y[:128])]
    runs = [learn_masks(model, layers, Pattern(1, 4), "nhwc", prior, lambda: iter(data), _mse,
                        LearnedSettings(steps=20), torch.Generator().manual_seed(7))[0]["0"] for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(2, 4, True)])
def test_learn_masks_on_a_conv_with_batch_norm(layout, pattern):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3))
    x, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    layers = {"3": model[3]}
    before = {k: v.clone() for k, v in model.state_dict().items()}     # BN's running stats included
    params = {k: v for k, v in model.named_parameters()}
    model.eval()
    out_before = model(x).detach()
    prior = {"3": make_mask(model[3].weight, pattern, layout)}
    masks, _ = learn_masks(model, layers, pattern, layout, prior, lambda: iter([(x, labels)]),
                           lambda m, b: F.cross_entropy(m(b[0]), b[1]), LearnedSettings(steps=5),
                           torch.Generator().manual_seed(0),
                           on_masks=lambda s, ms, _: [nm_violation(v, pattern, layout, exact=True) is None or
                                                      pytest.fail(f"step {s}") for v in ms.values()])
    assert nm_violation(masks["3"], pattern, layout, exact=True) is None
    _assert_untouched(model, before, params, out_before, x)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_restores_the_model(interrupt):
    model, x, y = _toy()
    layers = {"0": model[0], "2": model[2]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v for k, v in model.named_parameters()}
    model.train()
    out_before = model(x).detach()
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 4:
            raise interrupt("stop")
        return _mse(m, batch)

    prior = {k: make_mask(v.weight, Pattern(2, 4)) for k, v in layers.items()}
    with pytest.raises(interrupt):
        learn_masks(model, layers, Pattern(2, 4), "nhwc", prior, lambda: iter([(x, y)]), loss_fn,
                    LearnedSettings(steps=10), torch.Generator().manual_seed(0))
    _assert_untouched(model, before, params, out_before, x)
    assert model.training and all(p.requires_grad for p in model.parameters())


# -- settings and bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("steps", 0), ("steps", 1.5), ("lr", 0.0), ("tau", (4.0, 0.0)),
                                         ("scale", (1e2,)), ("prior_strength", -1.0), ("betas", (0.9, 1.0)),
                                         ("clip_grad", float("nan"))])
def test_bad_settings_are_one_line_errors_naming_the_field(field, value):
    with pytest.raises(LearnedError) as err:
        LearnedSettings(**{field: value}).check()
    assert str(err.value).startswith(f"{field}:") and "\n" not in str(err.value)


def test_bad_input_is_refused_before_any_step():
    model, x, y = _toy()
    layers = {"0": model[0]}
    good = {"0": make_mask(model[0].weight, Pattern(2, 4))}
    run = lambda pattern, prior, batches=lambda: iter([(x, y)]): learn_masks(   # noqa: E731
        model, layers, pattern, "nhwc", prior, batches, _mse, LearnedSettings(steps=2), torch.Generator())
    with pytest.raises(LearnedError, match=r"4:8-T .*116,963,796,250"):
        run(Pattern(4, 8, True), {"0": make_mask(model[0].weight, Pattern(4, 8))})
    with pytest.raises(LearnedError, match=r"prior\['0'\] is not an exact 1:4"):
        run(Pattern(1, 4), good)
    with pytest.raises(LearnedError, match=r"prior\['0'\]: want a bool mask"):
        run(Pattern(2, 4), {})
    with pytest.raises(LearnedError, match="batches are empty"):
        run(Pattern(2, 4), good, lambda: iter([]))
    with pytest.raises(LearnedError, match="no layers"):
        learn_masks(model, {}, Pattern(2, 4), "nhwc", {}, lambda: iter([]), _mse, LearnedSettings(), torch.Generator())


def test_the_schedules_are_maskllms():
    s = LearnedSettings(steps=100)
    assert s.at(0) == (4.0, 100.0, 5e-4, 0.0)
    tau, scale, lr, _ = s.at(50)
    assert math.isclose(tau, (4.0 + 0.05) / 2) and math.isclose(scale, 300.0) and math.isclose(lr, (5e-4 + 5e-5) / 2)
    tau, scale, lr, _ = s.at(99)
    assert math.isclose(tau, 4.0 - 3.95 * 0.99) and math.isclose(scale, 100 + 400 * 0.99)
    assert LearnedSettings(steps=10, weight_reg=1e-5).at(5)[3] == pytest.approx(5e-6)
