"""Fashion-MNIST, the default dataset, read straight from its four gzip IDX files.

The files come from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
or any folder holding the same four files; nothing is ever downloaded. The whole set is kept in
memory as uint8 (60000 + 10000 images of 1 x 28 x 28, 10 classes).
"""

from __future__ import annotations

import os

from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .memory import TensorImageDataset
from .registry import DatasetError, DatasetInfo, normalisation, register_dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-pixel statistics of the training set, on the [0, 1] scale.
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
FIX = "install Debian's dataset-fashion-mnist or set data.root"


def load_split(root: str, split: str) -> tuple:
    """The uint8 images (N x 1 x 28 x 28) and int64 labels (N,) of ``split`` ("train" or "test")."""
    image_file, label_file = (os.path.join(root, name) for name in FILES[split])
    images = read_idx(image_file, IMAGES_MAGIC)
    labels = read_idx(label_file, LABELS_MAGIC)
    if tuple(images.shape[1:]) != (28, 28):
        raise DatasetError(f"data.root: {image_file} holds {'x'.join(map(str, images.shape[1:]))} images, "
                           "Fashion-MNIST's are 28x28")
    if len(images) != len(labels):
        raise DatasetError(f"data.root: {image_file} holds {len(images)} images but {label_file} "
                           f"holds {len(labels)} labels; one of the files is from another dataset")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DatasetError(f"data.root: {label_file} has label {int(labels.max())}, Fashion-MNIST's are 0..9")
    return images.unsqueeze(1), labels.long()


@register_dataset("fashion_mnist")
def fashion_mnist(root: str | None, *, augment: bool, download: bool, seed: int,
                  mean: list[float] | None = None, std: list[float] | None = None):
    """Fashion-MNIST from local gzip IDX files (default /usr/share/datasets/fashion-mnist); 1x28x28, 10 classes."""
    del download, seed  # never downloaded; the split is fixed
    mean, std = normalisation("fashion_mnist", 1, mean, std, MEAN, STD)
    root = os.path.expanduser(root or DEFAULT_ROOT)
    if not os.path.isdir(root):
        raise DatasetError(f"data.root: {root} does not exist; {FIX}")
    for name in FILES["train"] + FILES["test"]:
        if not os.path.isfile(os.path.join(root, name)):
            raise DatasetError(f"data.root: {root} has no Fashion-MNIST files ({name} missing); {FIX}")

    splits = {}
    for split in ("train", "test"):
        images, labels = load_split(root, split)
        splits[split] = TensorImageDataset(images, labels, mean, std, scale=1 / 255,
                                           crop_padding=2 if augment and split == "train" else 0,
                                           classes=CLASSES)
    info = DatasetInfo("fashion_mnist", num_classes=10, in_channels=1, image_size=28,
                       train_size=len(splits["train"]), test_size=len(splits["test"]))
    return splits["train"], splits["test"], info
