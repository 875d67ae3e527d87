"""The model registry: every model builds, runs forward and backward, and has the paper's size."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nmtrain.experiments.errors import ModelError
from nmtrain.experiments.models import image_model, list_models, register_model

from helpers import method_step


# (name, in_channels, image_size): each model at its natural input.
NATURAL = [
    ("mlp", 1, 28),
    ("lenet5", 1, 28),
    ("resnet20", 3, 32),
    ("resnet32", 3, 32),
    ("resnet56", 3, 32),
    ("vgg19", 3, 32),
    ("resnet18", 3, 32),
    ("resnet50", 3, 32),
    ("vit", 1, 28),
    ("vit_tiny", 1, 28),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_with_a_one_line_description():
    models = list_models()
    assert [name for name, _, _ in NATURAL] + ["gpt"] == list(models)     # the language model: tests/test_gpt.py
    for name, summary in models.items():
        assert summary and "\n" not in summary, name


@pytest.mark.parametrize("name, in_channels, image_size", NATURAL)
def test_forward_and_backward(name, in_channels, image_size):
    model = image_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet20", "vgg19", "resnet18"])
def test_fashion_mnist_input_works_everywhere(name):
    model = image_model(name, num_classes=10, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_width_doubles_resnet32_channels():
    def conv_channels(model):
        return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]

    base = image_model("resnet32", 10, 3, 32)
    wide = image_model("resnet32", 10, 3, 32, width=2.0)
    assert sorted(set(conv_channels(base))) == [16, 32, 64]
    assert conv_channels(wide) == [2 * c for c in conv_channels(base)]
    assert wide.fc.in_features == 128
    assert wide(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, paper", [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6)])
def test_cifar_resnet_parameter_counts_match_he_et_al(name, paper):
    count = n_params(image_model(name, 10, 3, 32))
    assert abs(count - paper) / paper < 0.05, count


def test_widths_fit_nm_groups():
    mlp = image_model("mlp", 10, 1, 28, width=0.3)
    hidden = [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)][:-1]
    assert all(h % 16 == 0 for h in hidden) and hidden == [80, 80]
    lenet = image_model("lenet5", 10, 1, 28)
    convs = [m for m in lenet.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in lenet.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert all(layer.in_features % 8 == 0 for layer in linears)
    vgg = image_model("vgg19", 10, 3, 32, width=0.5)
    assert vgg.classifier.in_features == 256


def test_torchvision_resnets_adapt_their_stem():
    small = image_model("resnet18", 10, 1, 32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    large = image_model("resnet18", 10, 1, 224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 1
    assert isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("call, expected", [
    (dict(name="foo"), "model.name: 'foo' is unknown; use one of: mlp, lenet5, resnet20, "),
    (dict(name="mlp", width=0), "model.width: must be a positive number, got 0"),
    (dict(name="mlp", num_classes=0), "model.num_classes: must be a positive integer, got 0"),
    (dict(name="resnet50", width=2.0), "model.width: resnet50 is torchvision's fixed-width model"),
    (dict(name="lenet5", image_size=8), "model.name: lenet5 needs images of at least 12 pixels a side"),
])
def test_errors_are_one_line_and_name_the_field(call, expected):
    kwargs = dict(num_classes=10, in_channels=1, image_size=28) | call
    with pytest.raises(ModelError) as exc:
        image_model(**kwargs)
    assert str(exc.value).startswith(expected) and "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_register_model_adds_a_model():
    @register_model("test_linear_probe")
    def probe(num_classes, in_channels, image_size, width):
        """A single linear layer (registered by the tests)."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

    try:
        assert list_models()["test_linear_probe"] == "A single linear layer (registered by the tests)."
        assert image_model("test_linear_probe", 3, 1, 4)(torch.randn(2, 1, 4, 4)).shape == (2, 3)
        with pytest.raises(ValueError):
            register_model("test_linear_probe")(probe)
    finally:
        from nmtrain.experiments import models
        models._MODELS.pop("test_linear_probe")


def test_vit_sizes_patches_and_counts_attention_macs():
    from nmtrain.experiments.flops import macs_per_sample
    model = image_model("vit", 10, 1, 28)
    assert model.patch == 4 and model.pos.shape == (1, 49, 128) and len(model.blocks) == 6
    assert image_model("vit", 10, 3, 224).patch == 16
    assert image_model("vit", 10, 3, 32, width=0.3).head.in_features == 64      # multiple of 64, at least one
    macs = macs_per_sample(model, torch.randn(1, 1, 28, 28))
    t, d = 49, 128
    assert macs["blocks.0.attn.qkv"] == t * d * 3 * d and macs["blocks.0.fc2"] == t * 4 * d * d
    assert macs["blocks.0.attn"] == 2 * t * t * d                              # Q K^T and A V, dense
    assert macs["embed"] == t * 16 * d and macs["head"] == d * 10


def test_vit_rejects_an_image_size_the_patches_do_not_divide():
    with pytest.raises(ModelError, match="model.name: vit cuts 30-pixel images into 4x4 patches"):
        image_model("vit", 10, 1, 30)


def test_vit_trains_with_transposable_masks_on_3d_activations():
    """Every sparse Linear of a ViT sees (batch, tokens, features) inputs: the masked path must too."""
    from nmtrain.experiments.layers import plan_layers
    from nmtrain.experiments.methods import attach
    from nmtrain.sparsity import Pattern, nm_violation
    model = image_model("vit", 10, 1, 28, width=0.5)
    pattern = Pattern(2, 4, True)
    layers = plan_layers(model, pattern, "nhwc").sparse
    assert "embed" not in layers and "head" not in layers and len(layers) == 6 * 4
    with attach("transposable", layers, pattern, total_steps=10, steps_per_epoch=10) as method:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        losses = []
        for step in range(3):
            losses.append(method_step(method, model, opt, x, y, step).item())
    assert losses[-1] < losses[0]
    for name, mask in method.masks().items():
        assert nm_violation(mask, pattern) is None, name


def test_vit_tiny_cuts_16_patches_and_its_block_layers_fit_8x8_tiles():
    model = image_model("vit_tiny", 10, 1, 28)
    assert model.patch == 7 and model.pos.shape == (1, 16, 64) and len(model.blocks) == 4
    assert image_model("vit_tiny", 10, 3, 32).patch == 8
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            assert mod.weight.shape[0] % 8 == 0 and mod.weight.shape[1] % 8 == 0, name
