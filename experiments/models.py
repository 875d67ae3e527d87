"""The model registry for `nmtrain train`: small vision models sized for N:M sparsity, and a GPT.

    model = build_model("resnet32", info, model_spec)   # info: the dataset's DatasetInfo; model_spec: spec.model
    model = image_model("resnet32", num_classes=10, in_channels=3, image_size=32, width=2.0)

A model serves one task, as a dataset does. An image classifier takes ``in_channels`` (1 for
Fashion-MNIST) and ``image_size`` and ends in ``num_classes`` logits; ``width`` scales the channel/hidden
widths of the models defined here, rounded to multiples of 8 (16 for the MLP) so that every layer after
the first still splits into whole N:M groups for M up to 8 (16 for the MLP). A language model maps
tokens (B, T) to logits (B, T, vocab_size) and is sized by model.n_layer, n_head, n_embd (gpt.py).

Register more with ``@register_model("name")`` (``task="language_model"`` for a language model); the
first docstring line is the description `list_models()` shows. Beside registry names, ``model.name``
takes ``torchvision:NAME`` and ``package.module:function`` (experiments/external.py). Unknown names, bad
arguments and a model paired with a dataset of another task raise `ModelError` with one line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .errors import ModelError
from .external import ARGUMENTS, SPEC_DEFAULTS, TASK_WORDS, external_builder
from .gpt import GPT


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Builder
    summary: str
    task: str = "classification"


_MODELS: dict[str, _Entry] = {}


def register_model(name: str, summary: str | None = None,
                   task: str = "classification") -> Callable[[Builder], Builder]:
    """Register a builder under ``name``, called by keyword with the task's arguments (`ARGUMENTS`):
    ``(num_classes, in_channels, image_size, width)`` for image classification, ``(vocab_size,
    block_size, n_layer, n_head, n_embd, dropout, bias)`` for a language model."""
    if task not in ARGUMENTS:
        raise ValueError(f"model {name!r}: task {task!r} is unknown; use one of {', '.join(ARGUMENTS)}")

    def decorator(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        doc = inspect.getdoc(builder) or name
        _MODELS[name] = _Entry(name, builder, summary or doc.splitlines()[0], task)
        return builder
    return decorator


def list_models() -> dict[str, str]:
    """``{name: one-line description}`` of every registered model, in registration order."""
    return {entry.name: entry.summary for entry in _MODELS.values()}


def model_task(name: str) -> str | None:
    """The task ``model.name`` serves: a registry model's own, classification for torchvision; None for
    ``package.module:function``, which is built for the dataset's task (and checked on it)."""
    if name in _MODELS:
        return _MODELS[name].task
    return "classification" if name.startswith("torchvision:") else None


def resolve_builder(name: str, task: str = "classification") -> Builder:
    """The builder ``model.name`` names for a dataset of ``task``: a registry model, ``torchvision:NAME``
    or ``package.module:function``. A model of another task than the dataset's is refused.

    Imports a user's module and checks the builder's signature, without building anything: the runner
    calls it when it validates a spec."""
    if name in _MODELS:
        builder = _MODELS[name].builder
    elif ":" in name:
        builder = external_builder(name, task)
    else:
        raise ModelError(f"model.name: {name!r} is unknown; use one of: {', '.join(_MODELS)}; or torchvision:NAME "
                         "or package.module:function")
    own = model_task(name)
    if own is not None and own != task:
        kind = "a language model" if own == "language_model" else "an image classifier"
        fix = ("a text dataset (shakespeare, text) or model.name gpt" if task == "language_model" else
               "an image dataset (fashion_mnist, cifar10, imagefolder, ...) or an image model")
        raise ModelError(f"model.name: {name} is {kind}; the dataset is {TASK_WORDS[task]}; use {fix}")
    return builder


# The spec's sizes that only the other task's models take, with their defaults: set away from the default
# for a model that takes none of them, they would be ignored, so they are refused.
_OTHER_TASKS_SIZES = {task: {k: v for k, v in SPEC_DEFAULTS.items() if k not in taken}
                      for task, taken in ARGUMENTS.items()}


def check_model_sizes(name: str, task: str, model_spec: Any) -> None:
    """Refuse a size of the other task's models set away from its default: an image model takes no
    n_layer, a language model no width. Needs no data (`build.validate` calls it)."""
    for field, default in _OTHER_TASKS_SIZES[task].items():
        value = getattr(model_spec, field)
        if value != default:
            kind = "a language model" if task == "language_model" else "an image classifier"
            raise ModelError(f"model.{field}: {name} is {kind}, which takes no {field}; leave model.{field} "
                             f"at {default} (got {value!r})")


def model_arguments(name: str, info: Any, model_spec: Any) -> dict:
    """The keyword arguments a builder gets for ``info`` (a DatasetInfo) and ``model_spec`` (spec.model)."""
    task = getattr(info, "task", "classification")
    check_model_sizes(name, task, model_spec)
    if task == "language_model":
        return {"vocab_size": info.vocab_size, "block_size": info.block_size, "n_layer": model_spec.n_layer,
                "n_head": model_spec.n_head, "n_embd": model_spec.n_embd, "dropout": float(model_spec.dropout),
                "bias": bool(model_spec.bias)}
    return {"num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size,
            "width": model_spec.width}


def build_model(name: str, info: Any, model_spec: Any) -> nn.Module:
    """A freshly initialised ``name`` for the dataset ``info`` describes, sized by ``model_spec``: the one
    entry point for both tasks (training, AdaPrune, the layer plan and `nmtrain sample` build here)."""
    task = getattr(info, "task", "classification")
    arguments = model_arguments(name, info, model_spec)
    if task != "language_model":
        return image_model(name, **arguments)
    for field in ("vocab_size", "block_size"):
        value = arguments[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"model.name: {name} needs a positive {field}, got {value!r}")
    return resolve_builder(name, task)(**arguments)


def image_model(name: str, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> nn.Module:
    """A freshly initialised image classifier ``name`` for ``in_channels`` x ``image_size`` x ``image_size``."""
    builder = resolve_builder(name)
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"model.{field}: must be a positive integer, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ModelError(f"model.width: must be a positive number, got {width!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=float(width))


def builder_record(name: str, info: Any, model_spec: Any) -> dict:
    """summary.json's ``builder``: model.name, where its code comes from and the arguments it was built with."""
    task = getattr(info, "task", "classification")
    arguments = model_arguments(name, info, model_spec)
    if task != "language_model":
        arguments["width"] = float(arguments["width"])
    builder = resolve_builder(name, task)
    if hasattr(builder, "record"):
        return builder.record(**arguments)
    return {"name": name, "source": "nmtrain registry (experiments/models.py)", "arguments": arguments}


def scaled(channels: int, width: float, multiple: int = 8) -> int:
    """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def _init_weights(model: nn.Module) -> nn.Module:
    # He init for convolutions (as He et al. and torchvision); BN starts as the identity.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


# --- MLP ------------------------------------------------------------------------------------------

@register_model("mlp")
def mlp(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """Flatten -> 2 hidden ReLU layers of 256*width (multiple of 16) -> classes."""
    hidden = scaled(256, width, multiple=16)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


# --- LeNet-5 --------------------------------------------------------------------------------------

class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, widened to fit N:M groups.

    The classic 6 and 16 conv channels become 8 and 16, and the 120-84 classifier becomes 120-88:
    6 input channels to conv2 and 84 input features to the last layer are not multiples of M=8, so
    those layers could not hold 1:8/2:8/4:8 patterns (nor transposable 8x8 tiles). conv1 pads by 2
    on inputs smaller than 32 pixels, so 28x28 Fashion-MNIST sees the same 5x5 final map as 32x32
    CIFAR; other sizes get the flattened size that follows from them.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, f1, f2 = (scaled(c, width) for c in (8, 16, 120, 88))
        padding = 2 if image_size < 32 else 0
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ModelError(f"model.name: lenet5 needs images of at least 12 pixels a side, "
                             f"got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=padding), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, f1), nn.ReLU(inplace=True),
            nn.Linear(f1, f2), nn.ReLU(inplace=True),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """LeNet-5 with conv channels 8-16 and FC 120-88 (multiples of 8 for N:M), ReLU + max pool."""
    return _init_weights(LeNet5(num_classes, in_channels, image_size, width))


# --- CIFAR ResNets (He et al. 2016, section 4.2) --------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut.

    Where the shape changes (stride 2, more channels) the shortcut is He et al.'s option A:
    subsample by 2 and zero-pad the new channels. It has no weights, so the parameter counts are
    the paper's (0.27M for ResNet-20) and every prunable layer is a 3x3 conv.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem, 3 stages of n BasicBlocks, global average pool."""

    def __init__(self, depth: int, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"model.name: a CIFAR ResNet has depth 6n+2, not {depth}")
        blocks = (depth - 2) // 6
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register_cifar_resnet(depth: int, params: str) -> None:
    def builder(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
        return _init_weights(CifarResNet(depth, num_classes, in_channels, width))
    register_model(f"resnet{depth}", f"CIFAR ResNet-{depth} (He et al.): 16-32-64 channels x width, "
                                     f"option-A shortcuts; {params} params at width 1")(builder)


for _depth, _params in ((20, "0.27M"), (32, "0.46M"), (56, "0.85M")):
    _register_cifar_resnet(_depth, _params)


# --- VGG-19 ---------------------------------------------------------------------------------------

VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                512, 512, 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG with BatchNorm for small images: 3x3 conv-BN-ReLU stacks, global pool, one Linear.

    A max pool is skipped once the feature map is down to 1 pixel, so 28x28 inputs (4 pools
    possible) work as well as 32x32 ones (5 pools); the final adaptive average pool then reduces
    whatever is left to 1x1, as in the common CIFAR VGG whose classifier is Linear(512, classes).
    """

    def __init__(self, config, num_classes: int, in_channels: int, image_size: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for item in config:
            if item == "M":
                if side > 1:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out = scaled(item, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg19")
def vgg19(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """CIFAR VGG-19 with BatchNorm, global pool and Linear(512*width, classes)."""
    return _init_weights(CifarVGG(VGG19_CONFIG, num_classes, in_channels, image_size, width))


# --- torchvision ResNets --------------------------------------------------------------------------

def _torchvision_resnet(name: str, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    if width != 1.0:
        raise ModelError(f"model.width: {name} is torchvision's fixed-width model and takes only width 1.0, "
                         f"got {width}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if image_size <= 64:
        # The 7x7/2 stem and max pool would shrink 32x32 inputs to 8x8 before the first block; the
        # usual CIFAR adaptation keeps full resolution: a 3x3 stride-1 stem and no max pool.
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """torchvision ResNet-18 (random init); 3x3 stride-1 stem without max pool when image_size <= 64."""
    return _torchvision_resnet("resnet18", num_classes, in_channels, image_size, width)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """torchvision ResNet-50 (random init); 3x3 stride-1 stem without max pool when image_size <= 64."""
    return _torchvision_resnet("resnet50", num_classes, in_channels, image_size, width)


# --- Vision Transformer (Dosovitskiy et al. 2021) ---------------------------------------------------
# Almost all of a ViT's GEMMs are Linear layers on (batch x tokens) rows: the shape the 2:4 sparse
# kernels of `accel: semi_structured` accelerate (experiments/accel.py), which convolutions are not.


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, scaled dot-product attention, an output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    @staticmethod
    def matmul_macs(output: torch.Tensor) -> int:
        """MACs of the two dense activation products (Q K^T and A V) per sample: experiments/flops.py
        counts them so a ViT's training FLOPs are not flattered by leaving them out."""
        _, t, d = output.shape
        return 2 * t * t * d


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x)), MLP d -> 4d -> GELU -> d."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patches flattened and embedded by a Linear layer, learned position embeddings, ``depth`` blocks,
    a final LayerNorm and a linear head on the mean of the tokens (no class token)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, dim: int, depth: int,
                 patch: int, heads: int | None = None) -> None:
        super().__init__()
        if image_size % patch:
            raise ModelError(f"model.name: vit cuts {image_size}-pixel images into {patch}x{patch} patches, "
                             f"which needs image_size divisible by {patch}")
        self.patch = patch
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads or max(dim // 64, 1)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)   # (B, tokens, C*p*p)
        x = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(x).mean(1))


@register_model("vit")
def vit(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """ViT: 6 blocks of dim 128*width (multiple of 64), 4x MLP, patches of 4 px (16 px from 64 px up)."""
    patch = 4 if image_size < 64 else 16
    return VisionTransformer(num_classes, in_channels, image_size, scaled(128, width, multiple=64), 6, patch)


@register_model("vit_tiny")
def vit_tiny(num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """ViT-Tiny for CPU grids: 4 blocks of dim 64*width (multiple of 64), 4x MLP, 16 patches of 7 px
    (28 px images) or 8 px (32 px); 16 px patches from 64 px up."""
    patch = {28: 7, 32: 8}.get(image_size, 16 if image_size >= 64 else 4)
    return VisionTransformer(num_classes, in_channels, image_size, scaled(64, width, multiple=64), 4, patch)


# --- GPT (a nanoGPT-style decoder; experiments/gpt.py) -------------------------------------------------

@register_model("gpt", task="language_model")
def gpt(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float,
        bias: bool) -> nn.Module:
    """GPT: n_layer pre-norm blocks of n_embd (fused qkv, 4x GELU MLP), learned positions, tied head."""
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
