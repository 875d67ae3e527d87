"""Image classification folders in the ImageNet layout, via torchvision's ImageFolder.

    root/train/<class>/*.jpg|png|...
    root/val/<class>/...

Classes are the sub-folders of ``train/``; ``val/`` must have the same ones, since ImageFolder numbers
classes by sorted folder name and a missing class would silently shift every label after it.
Transforms follow the standard ImageNet recipe at ``image_size`` (224 by default; the spec's
``data.image_size``): training with augmentation uses RandomResizedCrop + horizontal flip, everything
else Resize(image_size * 256/224) + CenterCrop(image_size). Images are loaded as RGB and normalised
with ImageNet's mean and std, or ``data.mean`` / ``data.std``.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .errors import first_line
from .registry import DatasetError, DatasetInfo, normalisation, positive_int, register_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = "root/train/<class>/*.jpg and root/val/<class>/*.jpg"


def load_image(path: str):
    """An image file as RGB; a file PIL cannot read (corrupt, truncated, not an image, or a "decompression
    bomb" of more pixels than PIL allows) is a one-line DatasetError naming it, wherever a batch is drawn."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as fh:
                return Image.open(fh).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # UnidentifiedImageError and "image file is truncated" are OSErrors; plugins raise SyntaxError
        message = ("not an image format PIL reads" if isinstance(exc, Image.UnidentifiedImageError)
                   else first_line(exc))
        raise DatasetError(f"data.root: {path} cannot be read as an image ({message}); remove or replace it") from None


def _folder(root: str, split: str, transform) -> ImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DatasetError(f"data.root: {root} has no {split}/ folder; the imagefolder dataset needs {LAYOUT}")
    try:
        return ImageFolder(path, transform=transform, loader=load_image)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DatasetError(f"data.root: {path}: {first_line(exc)}; the imagefolder dataset needs {LAYOUT}") from None


@register_dataset("imagefolder")
def imagefolder(root: str | None, *, augment: bool, download: bool, seed: int, image_size: int = 224,
                mean: list[float] | None = None, std: list[float] | None = None):
    """ImageNet-layout folders root/train/<class>/ and root/val/<class>/ via torchvision ImageFolder; RGB."""
    del download, seed
    mean, std = normalisation("imagefolder", 3, mean, std, MEAN, STD)
    if not root:
        raise DatasetError(f"data.root: the imagefolder dataset needs a root folder laid out as {LAYOUT}")
    positive_int("data.image_size", image_size)
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DatasetError(f"data.root: {root} does not exist; the imagefolder dataset needs {LAYOUT}")

    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    resize = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    augmentation = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    train = _folder(root, "train", transforms.Compose((augmentation if augment else resize) + normalize))
    test = _folder(root, "val", transforms.Compose(resize + normalize))
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_val = sorted(set(test.classes) - set(train.classes))
        raise DatasetError(f"data.root: {root}/train and {root}/val have different class folders "
                           f"(only in train: {only_train or 'none'}; only in val: {only_val or 'none'}); "
                           "make them match")
    info = DatasetInfo("imagefolder", num_classes=len(train.classes), in_channels=3, image_size=image_size,
                       train_size=len(train), test_size=len(test))
    return train, test, info
