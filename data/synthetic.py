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
from .text import TokenWindows


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


MAX_SYNTHETIC_TOKENS = 10_000_000


@register_dataset("synthetic_text", task="language_model")
def synthetic_text(root: str | None, *, augment: bool, download: bool, seed: int, vocab_size: int = 16,
                   block_size: int = 8, train_tokens: int = 2048, val_tokens: int = 512, tokenizer: str = "char"):
    """A generated token stream (vocab 16, context 8, 2048/512 tokens): a seeded Markov chain; no files."""
    # Each token is followed by one of two tokens the seed picks, at random: about ln 2 nats per token
    # are left to a model that learned the table, ln(vocab_size) to one that learned nothing. `tokenizer`
    # is accepted (data.tokenizer is passed to every text dataset) and has nothing to do: these are ids.
    del root, augment, download, tokenizer
    for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("train_tokens", train_tokens),
                        ("val_tokens", val_tokens)):
        positive_int(f"data.{name}", value)
    if train_tokens + val_tokens > MAX_SYNTHETIC_TOKENS:
        raise DatasetError(f"data.train_tokens: at most {MAX_SYNTHETIC_TOKENS} tokens in all, "
                           f"got {train_tokens + val_tokens}")
    if min(train_tokens, val_tokens) <= block_size:
        raise DatasetError(f"data.block_size: {block_size} leaves no window in {min(train_tokens, val_tokens)} "
                           "tokens; use a smaller block_size or more tokens")
    generator = torch.Generator().manual_seed(seed)
    follow = torch.randint(0, vocab_size, (vocab_size, 2), generator=generator)
    coins = torch.randint(0, 2, (train_tokens + val_tokens,), generator=generator).tolist()
    stream = [int(torch.randint(0, vocab_size, (1,), generator=generator))]
    for coin in coins[1:]:
        stream.append(int(follow[stream[-1], coin]))
    tokens = torch.tensor(stream, dtype=torch.long)
    train = TokenWindows(tokens[:train_tokens], block_size, 1)
    val = TokenWindows(tokens[train_tokens:], block_size, block_size)
    info = DatasetInfo("synthetic_text", num_classes=vocab_size, in_channels=1, image_size=block_size,
                       train_size=len(train), test_size=len(val), task="language_model", vocab_size=vocab_size,
                       block_size=block_size,
                       corpus={"name": "synthetic_text", "seed": seed, "train_tokens": train_tokens,
                               "val_tokens": val_tokens, "split": "first train_tokens train, the rest validate"})
    return train, val, info
