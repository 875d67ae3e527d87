"""A tiny, deterministic, learnable dataset generated in memory: the test suite's dataset.

Every class has its own template image: a random low-resolution pattern upsampled to the image
size, so it is smooth enough for convolutions to pick up and distinct enough for an MLP. A sample
is its class's template plus per-pixel Gaussian noise. Everything comes from one generator seeded by
``seed``: the same seed gives the same templates, samples and labels. Train and test share the
templates and differ in noise. Images are standardised with the train split's mean and std.

``augment`` is accepted and ignored: there is nothing for crops and flips to teach here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory import TensorImageDataset
from .registry import DatasetError, DatasetInfo, positive_int, register_dataset


def _balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


@register_dataset("synthetic")
def synthetic(root: str | None, *, augment: bool, download: bool, seed: int, num_classes: int = 10,
              in_channels: int = 1, image_size: int = 28, train_size: int = 512, test_size: int = 256,
              noise: float = 4.0):
    """Generated class templates + noise (default 1x28x28, 10 classes, 512/256 samples); no files, seeded."""
    del root, augment, download
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size), ("train_size", train_size), ("test_size", test_size)):
        positive_int(f"data.{name}", value)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or noise < 0:
        raise DatasetError(f"data.noise: must be a non-negative number, got {noise!r}")

    generator = torch.Generator().manual_seed(seed)
    coarse = max(2, image_size // 4)
    templates = torch.randn(num_classes, in_channels, coarse, coarse, generator=generator)
    templates = F.interpolate(templates, size=(image_size, image_size), mode="bilinear", align_corners=False)
    templates = templates / templates.std()  # unit signal power, so `noise` reads as noise/signal

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = _balanced_labels(n, num_classes, generator)
        images = templates[labels] + noise * torch.randn(n, in_channels, image_size, image_size, generator=generator)
        return images, labels

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    mean, std = train_images.mean().item(), train_images.std().item()
    classes = [f"class_{i}" for i in range(num_classes)]
    train = TensorImageDataset(train_images, train_labels, mean, std, classes=classes)
    test = TensorImageDataset(test_images, test_labels, mean, std, classes=classes)
    info = DatasetInfo("synthetic", num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       train_size=train_size, test_size=test_size)
    return train, test, info
