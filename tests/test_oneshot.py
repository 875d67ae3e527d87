"""`nmtrain adaprune --method ...`: every one-shot method end to end on tiny runs (an MLP, a LeNet-5, a GPT)
at 2:4 and 2:4-T, the fine-tune, data.holdout, refusals, Ctrl-C at any point, the registry's contract, a
layer's inputs in the GEMM view, and benchmarks/oneshot.py on a small setting."""

import csv
import importlib.util
import json
import signal

import pytest
import torch
from torch import nn

from helpers import ROOT, assert_refused, quick_train, run_cli, snapshot
from nmtrain.experiments import catalogue
from nmtrain.experiments.oneshot import Outcome, available, list_oneshot, registry
from nmtrain.experiments.oneshot import methods as oneshot_methods
from nmtrain.experiments.oneshot.calibration import gemm_rows
from nmtrain.experiments.rundir import RunDir
from nmtrain.sparsity import Pattern, nm_violation, parse_pattern, to_matrix

BUILT_IN = ["magnitude", "adaprune", "wanda", "sparsegpt"]
FAST = ["--calib-samples", "64", "--no-progress"]
GPT = ["data.dataset=synthetic_text", "model.name=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
       "data.batch_size=32", "data.eval_batch_size=64", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0",
       "schedule.warmup_epochs=0", "train.max_steps=40", "train.eval_interval=40", "--method", "dense", "--no-progress"]
LENET = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=lenet5",
         "train.epochs=1", "optim.lr=0.05", "schedule.warmup_epochs=0", "--method", "dense", "--no-progress"]


def _train(out, *args):
    result = run_cli("train", *args, "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    mlp = root / "mlp"
    assert quick_train(mlp, "--method", "dense").exit_code == 0
    return {"mlp": mlp, "gpt": _train(root / "gpt", *GPT), "lenet": _train(root / "lenet", *LENET)}


def _convert(source, out, *args):
    return run_cli("adaprune", source, "--out", out, *FAST, *args)


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _check_run(source, out, pattern):
    """The written run: every sparse weight valid (both directions for -T), every other tensor untouched."""
    s = _summary(out)
    state = torch.load(out / "model.pt", weights_only=True)
    original = torch.load(source / "model.pt", weights_only=True)
    assert list(state) == list(original) and set(s["sparse_layers"]) == set(s["layers"])
    for name in s["sparse_layers"]:
        assert nm_violation(state[name], pattern, s["layout"]) is None, name
        if pattern.transposable:
            cols = to_matrix(state[name], s["layout"]).t().contiguous()
            assert nm_violation(cols, Pattern(pattern.n, pattern.m)) is None, name
    untouched = [k for k in original if k not in s["sparse_layers"] and not k.endswith(".bias")]
    assert untouched and all(torch.equal(state[k], original[k]) for k in untouched)
    return s, state, original


# -- every method, end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "2:4-T"])
@pytest.mark.parametrize("method", BUILT_IN)
@pytest.mark.parametrize("source", ["mlp", "gpt"])
def test_every_method_converts_a_tiny_model(sources, tmp_path, source, method, pattern):
    out = tmp_path / "out"
    extra = ["--iters", "20"] if method == "adaprune" else []
    result = _convert(sources[source], out, "--pattern", pattern, "--method", method, *extra)
    assert result.exit_code == 0, result.stderr + result.stdout
    pat = parse_pattern(pattern)
    s, state, original = _check_run(sources[source], out, pat)
    primary = "accuracy" if source == "mlp" else "perplexity"
    assert s["method"] == method and s["pattern"] == pattern and s["calib_samples"] == 64 and s["calib_seed"] == 0
    assert s["eval_split"] == ("test" if source == "mlp" else "validation") and s["finetune"] is None
    for stage in ("original", "magnitude", "oneshot"):
        assert isinstance(s[f"{primary}_{stage}"], float)
    assert s[f"final_{primary}"] == s[f"{primary}_oneshot"] and s["recovered"] == s["recovered_oneshot"]
    assert s["seconds_oneshot"] >= 0 and s["sequential"] == (method in ("wanda", "sparsegpt"))
    rows = list(s["layers"].values())
    assert all({"shape", "error_magnitude", "error_oneshot", "seconds"} <= set(r) for r in rows)
    if method == "magnitude":
        assert s[f"{primary}_oneshot"] == s[f"{primary}_magnitude"]
        assert all(r["error_oneshot"] == r["error_magnitude"] for r in rows)
    if method in ("sparsegpt", "adaprune"):           # the first layer's inputs are the original's for all
        assert rows[0]["error_oneshot"] < rows[0]["error_magnitude"]
    if method == "sparsegpt":
        assert s["method_params"] == {"blocksize": 128, "percdamp": 0.01} and s["blocksize"] == 128
    if method != "adaprune":                           # only AdaPrune's fit touches a bias
        assert all(torch.equal(state[k], original[k]) for k in original if k.endswith(".bias"))
    assert "rel. error" in result.stdout and "calibration samples" in result.stdout


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "2:4-T"])
def test_conv_layers_convert_in_their_gemm_view(sources, tmp_path, method, pattern):
    out = tmp_path / "out"
    result = _convert(sources["lenet"], out, "--pattern", pattern, "--method", method)
    assert result.exit_code == 0, result.stderr + result.stdout
    s, state, _ = _check_run(sources["lenet"], out, parse_pattern(pattern))
    conv = [name for name, row in s["layers"].items() if len(row["shape"]) == 4]
    assert conv, s["layers"]
    if method == "sparsegpt":                          # the first sparse layer sees the original's inputs
        first = next(iter(s["layers"].values()))
        assert first["error_oneshot"] < first["error_magnitude"]


def test_default_method_is_adaprune_under_its_old_names(sources, tmp_path):
    out = tmp_path / "out"
    result = _convert(sources["mlp"], out, "--pattern", "2:4", "--iters", "30")
    assert result.exit_code == 0, result.stderr
    s = _summary(out)
    assert s["method"] == "adaprune" and s["accuracy_adaprune"] == s["accuracy_oneshot"] and s["iters"] == 30
    assert all(r["error_adaprune"] == r["error_oneshot"] and "error_init" in r for r in s["layers"].values())
    assert (tmp_path / "out").is_dir() and "AdaPrune" in result.stdout


def test_finetune_is_reported_after_the_one_shot_figure(sources, tmp_path):
    out = tmp_path / "out"
    result = _convert(sources["gpt"], out, "--pattern", "2:4", "--method", "sparsegpt", "--finetune", "--iters", "20",
                      "--batch", "16")
    assert result.exit_code == 0, result.stderr + result.stdout
    s, _, _ = _check_run(sources["gpt"], out, Pattern(2, 4))
    assert s["finetune"] == {"iters": 20, "batch": 16, "lr_weight": 1e-3, "lr_bias": 1e-2, "sequential": False}
    assert s["final_perplexity"] == s["perplexity_finetune"] != s["perplexity_oneshot"]
    assert s["recovered"] == s["recovered_finetune"] and "recovered_oneshot" in s and s["seconds_finetune"] > 0
    assert all("error_finetune" in r and "seconds_finetune" in r for r in s["layers"].values())
    assert "fine-tune" in result.stdout


def test_holdout_calibrates_on_the_rest_and_measures_on_the_held_out_samples(tmp_path):
    src = tmp_path / "src"
    assert quick_train(src, "--method", "dense", "data.holdout=64").exit_code == 0
    trained = _summary(src)
    out = tmp_path / "out"
    result = run_cli("adaprune", src, "--out", out, "--pattern", "2:4", "--method", "sparsegpt", "--calib-samples",
                     "100000", "--no-progress")
    assert result.exit_code == 0, result.stderr + result.stdout
    s = _summary(out)
    assert s["eval_split"] == trained["eval_split"] == "holdout (64 train samples)"
    assert s["accuracy_original"] == pytest.approx(trained["final_accuracy"])
    assert s["calib_samples"] == 512 - 64 and "64 held-out" in s["calib_split"]
    assert "holdout (64 train samples) accuracy" in result.stdout


# -- refusals: one line, exit 2, nothing written -----------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "--method: 'nope' is unknown"),
    (["--method", "sparsegpt", "--blocksize", "6"], "--blocksize"),
    (["--method", "sparsegpt", "--percdamp", "-1"], "--percdamp"),
    (["--method", "wanda", "--blocksize", "64"], "--blocksize: --method wanda does not use it"),
    (["--method", "sparsegpt", "--iters", "5"], "add --finetune"),
    (["--method", "magnitude", "--add-back"], "--add-back: --method magnitude does not use it"),
    (["--method", "adaprune", "--finetune"], "--finetune"),
    (["--calib-seed", "-1"], "--calib-seed"),
    (["--calib-samples", "0"], "--calib-samples"),
    (["--method", "wanda", "--solver", "nope"], "--solver"),
    (["--method", "adaprune", "--batch", "0"], "--batch"),
])
def test_bad_options_are_refused_in_one_line(sources, tmp_path, args, needle):
    before = snapshot(tmp_path)
    result = run_cli("adaprune", sources["mlp"], "--pattern", "2:4", "--out", tmp_path / "out", "--no-progress", *args)
    assert_refused(result, needle, before, snapshot(tmp_path))


@pytest.mark.parametrize("args,needle", [
    (["--prior", "bogus"], "--prior: 'bogus' is unknown"),
    (["--learn-steps", "0"], "--learn-steps: "),
    (["--learn-lr", "0"], "--learn-lr: "),
    (["--prior-strength", "-1"], "--prior-strength: "),
    (["--pattern", "4:8-T"], "4:8-T"),                    # 116,963,796,250 candidate tiles: refused, one line
])
def test_learned_refuses_bad_options_in_one_line(sources, tmp_path, args, needle):
    before = snapshot(tmp_path)
    result = run_cli("adaprune", sources["gpt"], "--pattern", "2:4", "--method", "learned", "--out", tmp_path / "o",
                     "--no-progress", *args)
    assert_refused(result, needle, before, snapshot(tmp_path))


def test_an_absent_optional_method_is_refused_in_one_line(sources, tmp_path, monkeypatch):
    monkeypatch.delitem(registry._METHODS, "learned", raising=False)
    monkeypatch.setitem(catalogue.ONESHOT_MODULES, "learned", "oneshot.not_installed")
    monkeypatch.setattr(registry, "ONESHOT_MODULES", catalogue.ONESHOT_MODULES)
    assert not available("learned")
    before = snapshot(tmp_path)
    result = run_cli("adaprune", sources["mlp"], "--pattern", "2:4", "--method", "learned", "--out", tmp_path / "o")
    assert_refused(result, "--method: learned is not available", before, snapshot(tmp_path))


# -- learned masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "2:4-T"])
@pytest.mark.parametrize("source", ["mlp", "gpt"])
def test_learned_masks_convert_a_tiny_model_without_changing_kept_weights(sources, tmp_path, source, pattern):
    out = tmp_path / "out"
    result = _convert(sources[source], out, "--pattern", pattern, "--method", "learned", "--learn-steps", "6")
    assert result.exit_code == 0, result.stderr + result.stdout
    s, state, original = _check_run(sources[source], out, parse_pattern(pattern))
    assert s["method"] == "learned" and s["learned_steps"] == 6 and s["learned_seconds"] > 0
    assert s["method_params"] == {"learn_steps": 6, "learn_lr": 5e-4, "prior": "magnitude", "prior_strength": 3.0}
    assert 0.0 <= s["learned_changed_vs_prior"] <= 1.0 and s["learned_candidates"] == (90 if "T" in pattern else 6)
    for name in s["sparse_layers"]:                   # weights frozen: every kept entry is the source's
        kept = state[name] != 0
        assert torch.equal(state[name][kept], original[name][kept])


def test_learned_masks_start_from_another_methods_prior(sources, tmp_path):
    out = tmp_path / "out"
    result = _convert(sources["gpt"], out, "--pattern", "2:4", "--method", "learned", "--learn-steps", "3",
                      "--prior", "wanda", "--finetune", "--iters", "5")
    assert result.exit_code == 0, result.stderr + result.stdout
    s, _, _ = _check_run(sources["gpt"], out, Pattern(2, 4))
    assert s["method_params"]["prior"] == "wanda" and s["finetune"]["iters"] == 5 and "perplexity_finetune" in s


# -- Ctrl-C leaves nothing ------------------------------------------------------------------------------


def _sigint_on_call(monkeypatch, owner, attr, at_call):
    calls = {"n": 0}
    original = getattr(owner, attr)

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, attr, interrupted)


@pytest.mark.parametrize("where", ["method", "staging", "moving"])
def test_ctrl_c_at_any_point_leaves_no_output(sources, tmp_path, monkeypatch, where):
    import nmtrain.experiments.oneshot.pipeline as pipeline

    target = {"method": (oneshot_methods, "sparsegpt", 2),       # the second of the GPT's four layers
              "staging": (RunDir, "write_summary", 1),           # the last file written to the temporary directory
              "moving": (pipeline, "_move", 2)}[where]            # after the first file is in place
    _sigint_on_call(monkeypatch, *target)
    before = snapshot(tmp_path)
    result = _convert(sources["gpt"], tmp_path / "out", "--pattern", "2:4", "--method", "sparsegpt")
    monkeypatch.undo()
    assert result.exit_code == 130, (result.exit_code, result.stderr, result.exception)
    assert "interrupted" in result.stderr and not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before                 # nor a temporary directory beside it


# -- the registry's contract -------------------------------------------------------------------------


def test_the_catalogue_is_the_registry():
    assert catalogue.ONESHOT_METHODS[:4] == tuple(BUILT_IN)
    assert tuple(list_oneshot()) == tuple(n for n in catalogue.ONESHOT_METHODS if available(n))
    assert set(catalogue.ONESHOT_MODULES) == set(catalogue.ONESHOT_METHODS)


def _toy_learned(job, params):
    """A method that needs what a learned-mask method needs: the model, the task's loss on the calibration
    batches, a prior mask, and a fresh copy of the original (for another method's prior)."""
    losses = []
    for x, y in job.calib.batches(job.device):
        with torch.no_grad():
            losses.append(float(job.task.loss(job.model, x, y)))
    other = job.fresh()
    assert other.model is not job.model and all(other.layers[n] is not job.layers[n] for n in job.layers)
    for name, layer in job.layers.items():
        with torch.no_grad():
            layer.weight.mul_(job.prior[name])
    return Outcome(masks=dict(job.prior), fields={"toy_loss": sum(losses) / len(losses)})


def test_a_method_using_model_loss_calibration_and_prior_plugs_in(sources, tmp_path, monkeypatch):
    method = registry.OneShotMethod("learned", _toy_learned, registry.NoParams, lambda p: False, False, "toy", "")
    monkeypatch.setitem(registry._METHODS, "learned", method)
    out = tmp_path / "out"
    result = _convert(sources["gpt"], out, "--pattern", "2:4-T", "--method", "learned", "--finetune", "--iters", "5")
    assert result.exit_code == 0, result.stderr + result.stdout
    s, _, _ = _check_run(sources["gpt"], out, Pattern(2, 4, True))
    assert s["method"] == "learned" and s["toy_loss"] > 0 and s["perplexity_oneshot"] == s["perplexity_magnitude"]


def test_a_mask_that_breaks_the_pattern_is_never_written(sources, tmp_path, monkeypatch):
    def broken(job, params):
        return Outcome(masks={name: torch.ones_like(mask) for name, mask in job.prior.items()})
    method = registry.OneShotMethod("learned", broken, registry.NoParams, lambda p: False, False, "broken", "")
    monkeypatch.setitem(registry._METHODS, "learned", method)
    result = _convert(sources["mlp"], tmp_path / "out", "--pattern", "2:4", "--method", "learned")
    assert result.exit_code == 1 and "internal error" in str(result.exception)
    assert not (tmp_path / "out").exists()


# -- a layer's inputs in the GEMM view -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("kwargs", [{"padding": "same"}, {"padding": 1, "padding_mode": "reflect", "stride": 2},
                                    {"padding": (2, 1), "dilation": 2, "padding_mode": "circular"}])
def test_gemm_rows_reproduce_the_layer(layout, kwargs):
    conv = nn.Conv2d(4, 8, 3, **kwargs).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    rows = gemm_rows(conv, x, layout)
    via_rows = rows @ to_matrix(conv.weight.detach(), layout).t() + conv.bias.detach()
    assert (via_rows - conv(x).permute(0, 2, 3, 1).reshape(-1, 8)).abs().max() <= 1e-12
    linear = nn.Linear(6, 3).double()
    t = torch.randn(2, 5, 6, dtype=torch.float64)
    assert torch.equal(gemm_rows(linear, t, layout), t.reshape(10, 6))


# -- benchmarks/oneshot.py, on a small setting ---------------------------------------------------------


def test_the_benchmark_runs_in_seconds_and_writes_its_table(sources, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("oneshot_bench", ROOT / "benchmarks" / "oneshot.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out = tmp_path / "bench"
    assert bench.main(["--source", f"mlp={sources['mlp']}", "--methods", "magnitude,adaprune,sparsegpt",
                       "--patterns", "2:4,2:4-T,3:512", "--seeds", "0,1", "--calib-samples", "64", "--iters", "10",
                       "--finetune", "--out", str(out)]) == 0
    text = (out / "oneshot.md").read_text()
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "64 calibration samples" in text
    data = json.loads((out / "oneshot.json").read_text())
    assert data["environment"]["OMP_WAIT_POLICY"] == "PASSIVE" and len(data["runs"]) == 3 * 3 * 2
    assert sum("skipped" in r for r in data["runs"]) == 3 * 2 and "Not measured: mlp at 3:512" in text
    labels = {(r["method"], r["pattern"]) for r in data["rows"]}
    assert labels == {(m, p) for m in ("magnitude", "magnitude+ft", "adaprune", "sparsegpt", "sparsegpt+ft")
                      for p in ("2:4", "2:4-T")}
    for row in data["rows"]:
        assert row["n_seeds"] == 2 and len(row["values"]) == 2 and row["seconds_mean"] >= 0
        if row["method"] == "magnitude":
            assert row["std"] == 0 and row["recovered_mean"] in (0.0, None) and row["mean"] == row["magnitude"]
    rows = list(csv.DictReader((out / "oneshot.csv").open()))
    assert len(rows) == len(data["rows"]) and {"mean", "std", "recovered_mean", "seconds_mean"} <= set(rows[0])
    assert text.count("\n| mlp |") == len(data["rows"])


def test_layer_errors_in_one_pass_equal_a_pass_per_layer_with_in_place_activations():
    """Every layer's error from one hooked pass of each model equals the direct per-layer computation
    (capture the layer's inputs, apply both weights), also where an in-place ReLU follows a layer."""
    import copy
    from nmtrain.experiments.oneshot.calibration import capture_inputs, layer_errors
    from nmtrain.experiments.oneshot.registry import Calibration

    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True),
                             nn.Linear(32, 4))
    model = copy.deepcopy(original)
    masks = {}
    with torch.no_grad():
        for name in ("0", "2"):
            masks[name] = torch.rand_like(model.get_submodule(name).weight) > 0.5
            model.get_submodule(name).weight.mul_(masks[name])
    calib = Calibration(torch.randn(100, 16), torch.zeros(100, dtype=torch.long), 0, 32)
    torch.set_grad_enabled(False)       # plain arithmetic below (restored by the finally)
    try:
        _compare_layer_errors(original, model, masks, calib, layer_errors, capture_inputs)
    finally:
        torch.set_grad_enabled(True)


def _compare_layer_errors(original, model, masks, calib, layer_errors, capture_inputs):
    for sequential in (False, True):
        got = layer_errors(original, model, ["0", "2"], calib, sequential, torch.device("cpu"), masks)
        for name in ("0", "2"):
            orig, mod = original.get_submodule(name), model.get_submodule(name)
            x0 = capture_inputs(original, orig, calib.inputs, calib.batch, "cpu").double()
            x = capture_inputs(model, mod, calib.inputs, calib.batch, "cpu").double() if sequential else x0
            y = x0 @ orig.weight.double().t() + orig.bias.double()
            den = float(y.pow(2).sum())
            want = float((x @ mod.weight.double().t() + mod.bias.double() - y).pow(2).sum()) / den
            plain = orig.weight.double() * masks[name]
            magnitude = float((x @ plain.t() + orig.bias.double() - y).pow(2).sum()) / den
            assert got[name]["error"] == pytest.approx(want, rel=1e-5), (sequential, name)
            assert got[name]["magnitude"] == pytest.approx(magnitude, rel=1e-5), (sequential, name)
