"""AdaPrune: the add-back rule, layer-wise reconstruction, the run directory and bad input."""

import json

import pytest
import torch
import yaml

from nmtrain.experiments.adaprune import add_back_pruned, reconstruct, relative_error
from nmtrain.experiments.spec import Spec, from_dict
from nmtrain.sparsity import Pattern, make_mask, nm_violation, to_matrix

from helpers import run_cli

TRAIN = ["train", "data.dataset=synthetic", "data.batch_size=32", "data.eval_batch_size=256", "model.name=lenet5",
         "train.epochs=6", "optim.lr=0.05", "schedule.warmup_epochs=0", "--method", "unstructured",
         "--pattern", "2:4", "--no-progress"]
FAST = ["--calib-samples", "128", "--iters", "150", "--batch", "32", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("src") / "us50"
    result = run_cli(*TRAIN, "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    return out


@pytest.mark.parametrize("pattern,layout", [(Pattern(2, 4), "nhwc"), (Pattern(1, 4), "flatten"),
                                            (Pattern(4, 8, True), "nhwc")])
def test_add_back_keeps_each_groups_l1_norm_and_signs(pattern, layout):
    w = torch.randn(8, 16, 3, 3)
    w[0, :4] = 0                                            # all-zero groups stay zero
    mask = make_mask(w, pattern, layout)
    out = add_back_pruned(w, mask, pattern.m, layout)
    assert torch.all(out[~mask] == 0) and not torch.signbit(out[~mask]).any()
    assert torch.equal(torch.sign(out[mask]), torch.sign(w[mask]))
    g_in = to_matrix(w, layout).reshape(8, -1, pattern.m).abs().sum(-1)
    g_out = to_matrix(out, layout).reshape(8, -1, pattern.m).abs().sum(-1)
    assert torch.allclose(g_in, g_out, rtol=1e-5, atol=1e-6)
    assert nm_violation(out, pattern, layout) is None


def test_reconstruct_beats_magnitude_projection_and_keeps_the_mask():
    layer = torch.nn.Linear(32, 16)
    x = torch.relu(torch.randn(256, 32))
    y = layer(x).detach()
    mask = make_mask(layer.weight, Pattern(2, 4))
    plain = layer.weight.detach() * mask
    w, b = reconstruct(layer, mask, plain, x, y, iters=300, batch=50, lr_weight=1e-3, lr_bias=1e-2,
                       generator=torch.Generator().manual_seed(0))
    assert torch.all(w[~mask] == 0)
    before = relative_error(layer, x, y, plain, layer.bias.detach())
    after = relative_error(layer, x, y, w, b)
    assert after < 0.75 * before


@pytest.mark.parametrize("pattern,extra", [("2:4", []), ("4:8", ["--transposable"]), ("2:4", ["--sequential"])])
def test_adaprune_writes_a_valid_run_directory(source, tmp_path, pattern, extra):
    out = tmp_path / "ap"
    result = run_cli("adaprune", source, "--pattern", pattern, *extra, *FAST, "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "density" in result.stdout and "AdaPrune" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_original", "accuracy_magnitude", "accuracy_adaprune", "calib_samples", "iters",
                "pattern", "density", "sequential", "wall_seconds", "layers", "sparse_layers"):
        assert key in summary, key
    assert summary["calib_samples"] == 128 and summary["iters"] == 150
    assert summary["sequential"] == ("--sequential" in extra)
    pat = Pattern(int(pattern[0]), int(pattern[2]), "--transposable" in extra)
    assert summary["pattern"] == str(pat) and summary["density"] == pat.density
    assert len(summary["layers"]) == 3                                 # conv2, fc1, fc2 of LeNet-5
    for name, row in summary["layers"].items():
        assert row["error_adaprune"] < row["error_magnitude"], (name, row)
    assert summary["accuracy_adaprune"] >= summary["accuracy_magnitude"] - 2.0
    # config.yaml is the loadable source spec; model.pt holds valid N:M layers (both directions for -T).
    from_dict(Spec, yaml.safe_load((out / "config.yaml").read_text()))
    state = torch.load(out / "model.pt", weights_only=True)
    original = torch.load(source / "model.pt", weights_only=True)
    assert list(state) == list(original)
    assert set(summary["sparse_layers"]) == set(summary["layers"])
    for name, info in summary["sparse_layers"].items():
        assert info == {"pattern": str(pat), "density": pat.density, "transposable": pat.transposable,
                        "layout": "nhwc"}
        assert nm_violation(state[name], pat, "nhwc") is None
        if pat.transposable and state[name].dim() == 2:       # the column direction, checked on its own
            assert nm_violation(state[name].t().contiguous(), Pattern(pat.n, pat.m)) is None
    for name in ("features.0.weight", "classifier.5.weight"):           # first layer, classifier: untouched
        assert torch.equal(state[name], original[name])


def test_adaprune_from_a_state_dict_with_spec(source, tmp_path):
    out = tmp_path / "ap"
    result = run_cli("adaprune", source / "model.pt", "--spec", source / "config.yaml", "--pattern", "2:4", *FAST,
                  "--iters", "20", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("args,needle", [
    (["{src}/model.pt", "--pattern", "2:4"], "--spec"),
    (["{tmp}/missing", "--pattern", "2:4"], "does not exist"),
    (["{src}", "--pattern", "4:2"], "smaller than M"),
    (["{src}", "--pattern", "2:4", "--iters", "-1"], "--iters"),
    (["{src}", "--pattern", "2:4", "--calib-samples", "0"], "--calib-samples"),
    (["{src}", "--pattern", "1:32"], "no layer"),
    (["{tmp}", "--pattern", "2:4"], "config.yaml"),
])
def test_bad_input_is_one_line_and_exit_2(source, tmp_path, args, needle):
    out = tmp_path / "out"
    args = [a.format(src=source, tmp=tmp_path) for a in args]
    result = run_cli("adaprune", *FAST, *args, "--out", out)
    assert result.exit_code == 2, result.stdout
    assert result.stderr.startswith("error: ") and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_refuses_an_out_dir_holding_a_run_unless_overwrite(source, tmp_path):
    out = tmp_path / "ap"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = run_cli("adaprune", source, "--pattern", "2:4", *FAST, "--iters", "5", "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "summary.json").read_text() == "{}"
    result = run_cli("adaprune", source, "--pattern", "2:4", *FAST, "--iters", "5", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "accuracy_adaprune" in json.loads((out / "summary.json").read_text())
