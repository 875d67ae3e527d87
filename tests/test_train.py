"""`nmtrain train` run in-process on synthetic data, for every method."""

import json

import pytest
import torch
import yaml

from nmtrain.experiments.methods import get_method, list_methods
from nmtrain.sparsity import Pattern, nm_violation

from helpers import assert_refused, quick_train


def _train(tmp_path, *extra):
    out = tmp_path / "run"
    return quick_train(out, *extra), out


# What a method needs to run the quick spec: STEP is Adam-only (and switches at half the run at the latest).
METHOD_ARGS = {"step": ["optim.name=adamw", "optim.lr=0.005"]}


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_every_method_trains_and_writes_a_complete_run_directory(tmp_path, method):
    pattern = "2:4"
    result, out = _train(tmp_path, "--method", method, "--pattern", pattern, *METHOD_ARGS.get(method, []))
    assert result.exit_code == 0, result.stderr + result.stdout
    for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "model.pt", "summary.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".*.tmp"))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["name"] == method and config["sparsity"]["pattern"] == pattern
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1.0, 2.0]
    assert set(metrics[0]) >= {"step", "epoch", "loss", "accuracy", "lr", "mask_change_rate"}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "pattern", "final_accuracy", "best_accuracy", "epochs", "wall_seconds", "sparse_layers",
                "train_flops"):
        assert key in summary
    assert summary["final_accuracy"] > 30.0, summary          # 10 classes: chance is 10%
    flops = summary["train_flops"]
    assert flops["total"] == flops["forward"] + flops["backward_data"] + flops["backward_weight"]
    assert flops["ratio"] == pytest.approx(flops["total"] / flops["dense_total"])

    model = torch.load(out / "model.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "method", "rng", "step"} <= set(ckpt) and ckpt["step"] == 16
    if not get_method(method).caps.sparse:
        assert summary["sparse_layers"] == {} and flops["ratio"] == 1.0
        return
    assert summary["sparse_layers"], "no sparse layer"
    for name, info in summary["sparse_layers"].items():
        w = model[name]
        assert info["layout"] == "nhwc"
        # density N/M; or 1, with no pattern, for a layer its method fine-tuned dense at the end (maskdecay)
        assert info["density"] == 0.5 or (info["pattern"] is None and info["density"] == 1.0)
        assert abs((w != 0).float().mean().item() - info["density"]) < 0.01
        if info["pattern"] is not None:
            p = Pattern(2, 4, info["transposable"])
            assert nm_violation(w, p) is None                       # both directions for -T
    expected_ratio = {"srste": (0.5 + 2) / 3, "transposable": (2 * 0.5 + 1) / 3, "fixed": (0.5 + 1 + 0.5) / 3}
    if method in expected_ratio:
        # the sparse layer dominates but the dense first layer and classifier add their 3F
        assert flops["ratio"] < 1.0
        assert expected_ratio[method] < flops["ratio"]
    if get_method(method).caps.needs_transposable:
        # N:M-T, or dense after a dense fine-tune (pattern null, density 1: checked above)
        assert all(i["transposable"] or i["pattern"] is None for i in summary["sparse_layers"].values())


def test_overrides_reach_the_saved_config_and_output_dir_is_protected(tmp_path):
    result, out = _train(tmp_path, "--method", "srste", "method.params.decay=0.001", "train.max_steps=3")
    assert result.exit_code == 0, result.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["params"] == {"decay": 0.001, "mvue_dw": False} and config["train"]["max_steps"] == 3
    again, _ = _train(tmp_path, "--method", "srste", "train.max_steps=3")
    assert again.exit_code == 2 and "already holds a run" in again.stderr
    assert (out / "config.yaml").read_text() == yaml.safe_dump(config, sort_keys=False)
    ok, _ = _train(tmp_path, "--method", "dense", "train.max_steps=2", "--overwrite")
    assert ok.exit_code == 0


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=0.1"], "optim.lrr: unknown key"),
    (["--method", "magic"], "method.name: 'magic' is unknown"),
    (["--pattern", "5:4"], "smaller than M"),
    (["--pattern", "2:3"], "sparsity: no layer"),
    (["model.name=resnet9000"], "model.name"),
    (["data.dataset=mnist9"], "data.dataset"),
    (["data.dataset=fashion_mnist", "data.root=/nonexistent/dir"], "data.root"),
    (["--method", "dense", "method.params.decay=0.1"], "method.params.decay: unknown key"),
    (["sparsity.include=['nothing*']", "--method", "srste"], "sparsity.include"),
])
def test_bad_specs_are_one_line_exit_2_and_write_nothing(tmp_path, args, needle):
    result, out = _train(tmp_path, *args)
    assert_refused(result, needle)
    assert not out.exists()
