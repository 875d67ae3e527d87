"""Your own model and data: package.module:function and torchvision:NAME models, data.image_size/mean/std.

A user's module is written into a temporary folder put on sys.path, as a file on PYTHONPATH would be;
an ImageFolder tree of PNGs is written by the test. Everything runs the CLI in-process.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest
import torch
import torchvision
import yaml
from torch import nn

from nmtrain.cli.main import app
from nmtrain.experiments.flops import macs_per_sample
from nmtrain.experiments.errors import ModelError
from nmtrain.experiments.layers import called_layers, plan_layers
from nmtrain.experiments.models import image_model
from nmtrain.sparsity import NOT_CALLED, Pattern, nm_violation

from helpers import assert_refused, cli, interrupt_at, resume, write_imagefolder

USERNET = '''
import torch.nn as nn


def small(num_classes, in_channels=3, width=1.0):
    c = max(8, round(16 * width / 8) * 8)
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c),            # depthwise: left dense, with the reason
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * c, 32), nn.ReLU(), nn.Linear(32, num_classes))


def seven_logits(in_channels):        # no num_classes parameter, and 7 outputs whatever the dataset
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(7))


def needs_depth(depth, num_classes):
    return nn.Linear(1, num_classes)


def not_a_model(num_classes):
    return [nn.Linear(1, num_classes)]


def fails(num_classes):
    raise ValueError("depth must be even")
'''

QUICK = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "train.epochs=2",
         "optim.lr=0.05", "schedule.warmup_epochs=0", "train.checkpoint_interval=4", "--no-progress"]   # 16 steps


@pytest.fixture
def usernet(tmp_path, monkeypatch):
    """``usernet.py`` in a folder on sys.path; imported afresh by each test, and forgotten after it."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "usernet.py").write_text(USERNET)
    (folder / "broken_at_import.py").write_text("raise RuntimeError('needs a GPU cluster')\n")
    monkeypatch.syspath_prepend(str(folder))
    for name in ("usernet", "broken_at_import"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder / "usernet.py"


def _train(out, *args):
    return cli.invoke(app, ["train", *map(str, args), "--out", str(out)])


def test_a_user_module_trains_resumes_and_prunes(tmp_path, usernet, monkeypatch):
    args = [*QUICK, "model.name=usernet:small", "--method", "srste", "--pattern", "2:4"]
    ref = _train(tmp_path / "ref", *args)
    assert ref.exit_code == 0, ref.stderr + ref.stdout
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["builder"] == {
        "name": "usernet:small", "source": str(usernet),
        "arguments": {"num_classes": 10, "in_channels": 1, "width": 1.0},     # image_size: not a parameter
        "sha256": hashlib.sha256(usernet.read_bytes()).hexdigest()}
    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["model"]["name"] == "usernet:small"
    assert set(summary["sparse_layers"]) == {"3.weight", "7.weight"}
    assert summary["skipped_layers"] == {"0": "first layer kept dense", "9": "classifier kept dense",
                                         "2": "grouped conv (groups=16) has no dense GEMM operand"}

    # Ctrl-C in epoch 2, then --resume rebuilds the model from config.yaml's model.name alone.
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, 10)
        stopped = _train(out, *args)
    assert stopped.exit_code == 130 and not (out / "model.pt").exists()
    resumed = resume(out)
    assert resumed.exit_code == 0, resumed.stderr + resumed.stdout
    ref_state = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    cut_state = torch.load(out / "model.pt", weights_only=True)
    assert ref_state.keys() == cut_state.keys() and all(torch.equal(ref_state[k], cut_state[k]) for k in ref_state)

    pruned = cli.invoke(app, ["prune", str(out), "-o", str(tmp_path / "p.pt"), "--pattern", "4:8", "--transposable"])
    assert pruned.exit_code == 0, pruned.stderr + pruned.stdout
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    for name in ("3.weight", "7.weight"):
        assert nm_violation(state[name], Pattern(4, 8, True), "nhwc") is None, name
    for name in ("2.weight", "9.weight"):       # depthwise 16x1x3x3 and 10 classes: cannot hold 4:8-T, skipped
        assert torch.equal(state[name], cut_state[name]), name

    ada = cli.invoke(app, ["adaprune", str(out), "--pattern", "2:4", "--calib-samples", "64", "--iters", "20",
                           "--batch", "32", "--out", str(tmp_path / "ada"), "--no-progress"])
    assert ada.exit_code == 0, ada.stderr + ada.stdout
    ada_summary = json.loads((tmp_path / "ada" / "summary.json").read_text())
    assert ada_summary["builder"]["name"] == "usernet:small" and set(ada_summary["sparse_layers"]) == {"3.weight",
                                                                                                      "7.weight"}
    converted = cli.invoke(app, ["convert", str(out), "--to", "compressed", "--out", str(tmp_path / "c.safetensors")])
    assert converted.exit_code == 0, converted.stderr + converted.stdout


def test_torchvision_resnet18_trains_on_a_small_imagefolder_at_a_small_image_size(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    result = _train(tmp_path / "run", "model.name=torchvision:resnet18", "data.dataset=imagefolder",
                    f"data.root={root}", "data.image_size=16", "data.mean=[0.5, 0.5, 0.5]",
                    "data.std=[0.25, 0.25, 0.25]", "data.batch_size=4", "train.epochs=1", "optim.lr=0.01",
                    "--method", "srste", "--pattern", "2:4", "--no-progress")
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["builder"] == {"name": "torchvision:resnet18",
                                  "source": f"torchvision {torchvision.__version__}: torchvision.models.resnet18",
                                  "arguments": {"weights": None, "num_classes": 3}}
    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (data["image_size"], data["mean"], data["std"]) == (16, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    # The FLOPs are those of 16-pixel images: 1 epoch of 12 images through the 16-pixel network.
    macs = macs_per_sample(image_model("torchvision:resnet18", 3, 3, 16), torch.zeros(1, 3, 16, 16))
    assert summary["train_flops"]["dense_total"] == 3 * 12 * sum(macs.values())
    assert len(summary["sparse_layers"]) == 19 and set(summary["skipped_layers"]) == {"conv1", "fc"}


def test_model_init_loads_a_local_weights_file_and_names_the_first_mismatch(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    data = ["data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "data.batch_size=4"]
    torch.manual_seed(5)
    weights = image_model("torchvision:resnet18", 3, 3, 16).state_dict()      # "pretrained", saved locally
    torch.save(weights, tmp_path / "resnet18.pt")
    ok = _train(tmp_path / "run", "model.name=torchvision:resnet18", *data, f"model.init={tmp_path / 'resnet18.pt'}",
                "optim.lr=1e-30", "optim.weight_decay=0", "--method", "dense", "--no-progress")
    assert ok.exit_code == 0, ok.stderr + ok.stdout
    trained = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    # lr 1e-30: every step is below a float32 ulp of the weights, so they stay exactly as loaded
    assert all(torch.equal(trained[k], weights[k]) for k in weights if k.endswith(".weight"))

    weights["fc.weight"] = torch.zeros(1000, 512)
    torch.save(weights, tmp_path / "imagenet-head.pt")
    bad = _train(tmp_path / "bad", "model.name=torchvision:resnet18", *data,
                 f"model.init={tmp_path / 'imagenet-head.pt'}", "--no-progress")
    assert bad.exit_code == 2 and bad.stderr == (
        f"error: model.init: {tmp_path / 'imagenet-head.pt'} does not match model torchvision:resnet18: "
        "fc.weight has shape (1000, 512) in the file, (3, 512) in the model\n")
    assert not (tmp_path / "bad").exists()


def test_a_torchvision_model_takes_grey_images_through_its_rebuilt_first_conv():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.manual_seed(0)
    model = image_model("torchvision:resnet18", 10, 1, 28)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7)       # torchvision's own stem
    assert torch.equal(model.conv1.weight, reference.conv1.weight[:, :1] * math.sqrt(3))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    vit = image_model("torchvision:vit_b_32", 4, 3, 64)                             # sized for 64-pixel images
    assert vit.image_size == 64 and vit(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_layers_whose_forward_never_runs_stay_dense_and_attention_flops_are_counted():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(16, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)     # multiplies by out_proj.weight itself
            self.mlp = nn.Linear(32, 32)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            t = self.embed(x.flatten(2))              # (B, 4 tokens: the channels of 16 pixels each, 32)
            t = t + self.attn(t, t, t, need_weights=False)[0]
            return self.head(self.mlp(t).mean(1))

    model = Attend()
    x = torch.zeros(1, 4, 4, 4)
    called = called_layers(model, x)
    assert called == {"embed", "mlp", "head"}
    plan = plan_layers(model, Pattern(2, 4), "nhwc", called=called)
    assert list(plan.sparse) == ["mlp"] and plan.skipped["attn.out_proj"] == NOT_CALLED
    macs = macs_per_sample(model, x)
    t, d = 4, 32
    assert macs["attn"] == 4 * t * d * d + 2 * t * t * d and "attn.out_proj" not in macs


def _fails(tmp_path, *args):
    """The run stops with one `error:` line and exit code 2, and writes nothing."""
    out = tmp_path / "never"
    result = _train(out, *args, "--no-progress")
    assert_refused(result, "")                      # the callers compare the message itself
    assert not out.exists()
    return result.stderr[len("error: "):].strip()


def test_bad_models_are_one_line_errors_naming_the_fix(tmp_path, usernet):
    base = ["data.dataset=synthetic", "train.epochs=1"]
    assert _fails(tmp_path, *base, "model.name=torchvision:resnet19").startswith(
        "model.name: 'torchvision:resnet19' is not a torchvision classification model; did you mean "
        "torchvision:resnet18")
    assert _fails(tmp_path, *base, "model.name=no_such_pkg.nets:build") == (
        "model.name: no module named 'no_such_pkg' to import no_such_pkg.nets:build from; put the folder that "
        "holds no_such_pkg/nets.py on PYTHONPATH (or run nmtrain in that folder)")
    assert _fails(tmp_path, *base, "model.name=broken_at_import:build") == (
        "model.name: importing broken_at_import failed (RuntimeError: needs a GPU cluster at "
        f"{usernet.parent / 'broken_at_import.py'}:1); fix the module")
    assert _fails(tmp_path, *base, "model.name=usernet:nothing_here").startswith(
        f"model.name: module usernet ({usernet}) has no nothing_here; name a function it defines")
    assert _fails(tmp_path, *base, "model.name=usernet:needs_depth").startswith(
        "model.name: usernet:needs_depth requires depth, which nmtrain cannot pass")
    assert _fails(tmp_path, *base, "model.name=usernet:seven_logits") == (
        "model.name: usernet:seven_logits returns shape (1, 7) for one image, not (1, 10) logits for the "
        "dataset's 10 classes; give the builder a num_classes parameter")
    assert _fails(tmp_path, *base, "model.name=usernet:not_a_model") == (
        "model.name: usernet:not_a_model returned a list, not a torch.nn.Module")
    assert _fails(tmp_path, *base, "model.name=usernet:fails") == (
        f"model.name: usernet:fails(num_classes=10) raised ValueError: depth must be even at {usernet}:27")
    assert _fails(tmp_path, *base, "model.name=usernet:seven_logits", "model.width=2").startswith(
        "model.width: usernet:seven_logits takes no width argument")
    assert _fails(tmp_path, *base, "model.name=resnet18:x:y") == (
        "model.name: 'resnet18:x:y' is neither a registry model, torchvision:NAME nor package.module:function")


def test_bad_data_values_are_one_line_errors(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    folder = ["data.dataset=imagefolder", f"data.root={root}", "model.name=mlp"]
    assert _fails(tmp_path, *folder, "data.image_size=4") == (
        "data.image_size: must be in [8, 1024] pixels (null: the dataset's own size), got 4")
    assert _fails(tmp_path, *folder, "data.std=[0.2, 0.2, 0]") == (
        "data.std: every value must be a finite number above 0 (it divides the pixels), got [0.2, 0.2, 0.0]")
    assert _fails(tmp_path, *folder, "data.mean=[0.5, .nan, 0.5]").startswith(
        "data.mean: every value must be a finite number (one per image channel)")
    assert _fails(tmp_path, *folder, "data.mean=[0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]") == (
        "data.mean, data.std: 2 and 3 values; give one of each per image channel")
    assert _fails(tmp_path, *folder, "data.mean=[0.5]", "data.image_size=16") == (
        "data.mean: 1 value(s) for the 3-channel images of imagefolder; give 3, one per channel")
    assert _fails(tmp_path, "data.dataset=fashion_mnist", "data.image_size=32") == (
        "data.image_size: not an option of dataset 'fashion_mnist' (it takes: mean, std)")


def test_a_builders_own_failure_is_a_model_error_outside_the_cli_too(usernet):
    with pytest.raises(ModelError, match=r"^model.name: usernet:fails\(num_classes=3\) raised ValueError"):
        image_model("usernet:fails", 3, 1, 8)
