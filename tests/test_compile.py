"""Training under torch.compile: every method that can trains compiled to the same weights and masks as eager,
bit for bit; the ones that cannot, and a compiled step not begun, are refused in one line; `nmtrain train`'s
``train.compile: true`` runs the same step compiled.

Compiled here means dynamo's capture and AOT autograd (the ``aot_eager`` backend): the same graph inductor
gets, run op by op, so the comparison is exact. Inductor's own code generation rounds differently (fused
kernels); one slow test runs the CLI with it and compares within tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import nmtrain
from nmtrain.experiments import runner as runner_module
from nmtrain.experiments.methods import get_method
from nmtrain.experiments.sparsify import COMPILE_REFUSED

from helpers import quick_train
from test_step_identity import STEPS, VARIANTS, _model, setup_variant


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # dynamo caches compiled frames per code object across models: each test starts and ends clean
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(method: str, params: dict):
    return get_method(method).Params(**params)


# Beside test_step_identity's variants, the phases they do not reach: SDGF's stages (1:8: 7, 4, 2, 1 kept of
# 8, after a dense start), and BAME scoring over two batches per update (its probes live across steps).
MORE_PHASES = {
    "pgf-sdgf": ("pgf", "1:8", {"schedule": "sdgf", "dense": 0.1, "fine_tune": 0.1}),
    "bame-score-2": ("bame", "2:4", {"interval": 3, "score_batches": 2}),
}
RUNS = {**VARIANTS, **MORE_PHASES}


def train_variant(name: str, backend=None, device: str = "cpu") -> tuple:
    """Train ``name`` (a `test_step_identity` variant, or one of MORE_PHASES) for STEPS steps on ``device``, eagerly
    or compiled with ``backend`` (a backend's name or a callable): (model, handle). Also tests/test_gpu.py's."""
    model, opt, handle, batches = setup_variant(name, RUNS, device)
    forward = torch.compile(model, backend=backend) if backend else model
    model.train()
    for x, y in batches:
        handle.begin_step()
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert handle.step == STEPS
    return model, handle


def _train(name: str, compiled: bool) -> tuple[dict, dict, int]:
    """The run of ``name``, eagerly or compiled with aot_eager: (weights, masks, graphs compiled)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    model, handle = train_variant(name, counting if compiled else None)
    # graphs that compute something (dynamo also hands the backend an empty one now and then: no cost)
    computing = sum(1 for gm in graphs if any(node.op.startswith("call") for node in gm.graph.nodes))
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in handle.masks().items()}, computing)


def assert_same_run(got: tuple[dict, dict], want: tuple[dict, dict]) -> None:
    """Two runs' (weights, masks) equal bit for bit, each entry named where it is not (also tests/test_gpu.py's)."""
    for ours, theirs in zip(got, want):
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key


COMPILING = sorted(name for name, (method, _, params) in RUNS.items()
                   if get_method(method).compile_problem(_params(method, params)) is None)
PHASES = {"pgf-sdgf": 5}        # a graph per phase: dense, then one per SDGF stage


@pytest.mark.parametrize("name", COMPILING)
def test_compiled_training_is_bit_identical_to_eager(name):
    weights, masks, _ = _train(name, compiled=False)
    compiled_weights, compiled_masks, graphs = _train(name, compiled=True)
    assert_same_run((compiled_weights, compiled_masks), (weights, masks))
    # A graph per phase at most (BAME: SR-STE, sparse, scoring; STEP: dense, sparse; PGF: dense, each
    # pattern), not one per step: past dynamo's recompile limit a model would go back to eager without a word.
    assert 1 <= graphs <= PHASES.get(name, 3)


def test_only_the_mvue_weight_gradient_cannot_compile():
    refused = sorted(name for name in RUNS if name not in COMPILING)
    assert refused == ["maskdecay", "srste-mvue"]           # both draw MVUE samples (mvue_dw: true)
    assert get_method("maskdecay").compile_problem(_params("maskdecay", {"mvue_dw": False})) is None


def _sparsified(method="srste", **params):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, nmtrain.sparsify(model, method, "2:4", opt, **params)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, 4, 4, generator=g), torch.randint(0, 8, (4,), generator=g)


def test_a_compiled_step_not_begun_is_refused_and_changes_nothing():
    model, handle = _sparsified()
    x, y = _batch()
    with pytest.raises(nmtrain.ExperimentError) as exc:
        F.cross_entropy(torch.compile(model, backend="aot_eager")(x), y).backward()
    assert str(exc.value) == COMPILE_REFUSED and "\n" not in COMPILE_REFUSED
    assert "handle.begin_step()" in COMPILE_REFUSED
    assert handle.step == 0 and not handle.stepper.begun


def test_a_method_that_cannot_compile_is_refused_even_with_the_step_begun():
    model, handle = _sparsified("srste", mvue_dw=True)
    x, y = _batch()
    handle.begin_step()
    with pytest.raises(nmtrain.ExperimentError) as exc:
        F.cross_entropy(torch.compile(model, backend="aot_eager")(x), y).backward()
    assert str(exc.value) == ("model: srste with mvue_dw: true cannot train compiled: the MVUE weight gradient "
                              "draws from the method's own torch.Generator, which torch.compile cannot trace; set "
                              "mvue_dw: false, or train uncompiled")


def test_fullgraph_compiles_a_begun_step_in_one_graph():
    # fullgraph=True turns any graph break into an error: the begun step's hooks trace without one
    model, handle = _sparsified("transposable")
    x, y = _batch()
    handle.begin_step()
    F.cross_entropy(torch.compile(model, backend="aot_eager", fullgraph=True)(x), y).backward()
    model2, handle2 = _sparsified("transposable")
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"handle.begin_step\(\)"):
        F.cross_entropy(torch.compile(model2, backend="aot_eager", fullgraph=True)(x), y).backward()


def test_begin_step_after_remove_is_refused():
    _, handle = _sparsified()
    handle.remove()
    with pytest.raises(nmtrain.ExperimentError, match="begin_step"):
        handle.begin_step()


# ------------------------------------------------------------------------------------------------
# nmtrain train: train.compile


def _final(out) -> tuple[dict, dict]:
    weights = torch.load(out / "model.pt", weights_only=True)
    return weights, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["srste", "pgf"])
def test_train_compile_gives_the_uncompiled_run_bit_for_bit(tmp_path, monkeypatch, method):
    eager = quick_train(tmp_path / "eager", "--method", method, "train.max_steps=6")
    assert eager.exit_code == 0, eager.output
    calls = []
    real = torch.compile

    def compile_aot_eager(model, **options):        # the runner's torch.compile, captured exactly
        calls.append(model)
        return real(model, backend="aot_eager", **options)

    monkeypatch.setattr(runner_module.torch, "compile", compile_aot_eager)
    compiled = quick_train(tmp_path / "compiled", "--method", method, "train.max_steps=6", "train.compile=true")
    assert compiled.exit_code == 0, compiled.output
    assert len(calls) == 1
    (w_eager, s_eager), (w_compiled, s_compiled) = _final(tmp_path / "eager"), _final(tmp_path / "compiled")
    assert w_eager.keys() == w_compiled.keys()
    for key in w_eager:
        assert torch.equal(w_eager[key], w_compiled[key]), key
    assert (s_compiled["final_accuracy"], s_compiled["final_test_loss"]) == (s_eager["final_accuracy"], s_eager["final_test_loss"])
    assert "compile: true" in (tmp_path / "compiled" / "config.yaml").read_text()


MVUE_REFUSED = ("error: train.compile: {} with mvue_dw: true cannot train compiled: the MVUE weight gradient draws "
                "from the method's own torch.Generator, which torch.compile cannot trace; set mvue_dw: false, or "
                "train uncompiled")


@pytest.mark.parametrize("args, message", [
    (("--method", "maskdecay"), MVUE_REFUSED.format("maskdecay")),
    (("--method", "srste", "method.params.mvue_dw=true"), MVUE_REFUSED.format("srste")),
    (("--method", "transposable", "--pattern", "2:4-T", "accel=semi_structured"),
     "error: train.compile: accel: semi_structured does not run compiled (its sparse-tensor kernels are untested "
     "under torch.compile); use accel=none, or train.compile=false"),
])
def test_train_compile_of_what_cannot_compile_is_refused_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    result = quick_train(out, *args, "train.compile=true")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [message], result.output
    assert not out.exists()


def test_train_compile_must_be_a_boolean(tmp_path):
    result = quick_train(tmp_path / "run", "train.compile=3")
    assert result.exit_code == 2 and "train.compile" in result.output


# inductor's C++ compile takes seconds on a 2-core CPU (~14 s with a cold cache): slow
@pytest.mark.slow
def test_train_compile_with_inductor_trains_like_eager(tmp_path):
    eager = quick_train(tmp_path / "eager", "--method", "srste", "train.max_steps=6")
    compiled = quick_train(tmp_path / "compiled", "--method", "srste", "train.max_steps=6", "train.compile=true")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    (w_eager, _), (w_compiled, _) = _final(tmp_path / "eager"), _final(tmp_path / "compiled")
    for key in w_eager:         # fused kernels round differently: close, not equal
        torch.testing.assert_close(w_compiled[key], w_eager[key], rtol=1e-4, atol=1e-5)
