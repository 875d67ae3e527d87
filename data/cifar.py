"""CIFAR-10 and CIFAR-100 through torchvision, from a local directory.

``root`` is the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), the layout the
official python tarballs extract to; the default is ``~/.cache/nmtrain/datasets``. Nothing is
downloaded unless ``download=True``; then torchvision fetches and extracts the tarball into ``root``.
Images are 32 px (``image_size`` resizes them, after the training crop) and normalised with the
training set's statistics (or ``mean``/``std``).

Integrity check (design choice): torchvision's CIFAR classes verify the md5 of every batch file, so
tiny files written by tests cannot pass them. Rather than patching torchvision, the datasets here are
thin subclasses (`CheckedCIFAR10`, `CheckedCIFAR100`) that take a documented ``verify`` keyword:
``verify=True`` (the default, and what real runs use) keeps torchvision's md5 checks; ``verify=False``
only requires the files to exist and parse, which is what the tests use. `build_datasets` passes it
through: ``build_datasets("cifar10", root, verify=False)``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from .errors import first_line
from .registry import DatasetError, DatasetInfo, normalisation, positive_int, register_dataset

DEFAULT_ROOT = "~/.cache/nmtrain/datasets"


class _Verifiable:
    """Mixin for torchvision's CIFAR classes: ``verify=False`` swaps md5 checks for existence checks."""

    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]
    base_folder: str
    root: str

    def __init__(self, root: str, train: bool = True, transform: Any = None, download: bool = False,
                 verify: bool = True) -> None:
        self.verify = verify  # read by the checks below, which torchvision's __init__ calls
        super().__init__(root, train=train, transform=transform, download=download)  # type: ignore[call-arg]

    def _check_integrity(self) -> bool:
        if self.verify:
            return super()._check_integrity()  # type: ignore[misc]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        if self.verify:
            return super()._load_meta()  # type: ignore[misc]
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CheckedCIFAR10(_Verifiable, CIFAR10):
    """torchvision's CIFAR10 with a ``verify`` keyword (see the module docstring)."""


class CheckedCIFAR100(_Verifiable, CIFAR100):
    """torchvision's CIFAR100 with a ``verify`` keyword (see the module docstring)."""


# name -> (class, pretty name, classes, per-channel mean, per-channel std of the training set)
_VARIANTS = {
    "cifar10": (CheckedCIFAR10, "CIFAR-10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (CheckedCIFAR100, "CIFAR-100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _files(cls: type) -> list[str]:
    return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _missing(cls: type, root: str) -> str | None:
    for name in _files(cls):
        if not os.path.isfile(os.path.join(root, cls.base_folder, name)):
            return f"{cls.base_folder}/{name}"
    return None


def _load(name: str, root: str | None, augment: bool, download: bool, verify: bool, image_size: int,
          mean: list[float] | None, std: list[float] | None):
    cls, pretty, num_classes, default_mean, default_std = _VARIANTS[name]
    positive_int("data.image_size", image_size)
    mean, std = normalisation(name, 3, mean, std, default_mean, default_std)
    root = os.path.expanduser(root or DEFAULT_ROOT)
    missing = _missing(cls, root)
    if missing and download:
        try:
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # URLError, timeouts, md5 mismatch, a full disk: all mean "no data"
            raise DatasetError(f"data.download: fetching {pretty} into {root} failed ({first_line(exc)}); "
                               f"download {cls.url} by hand and extract it into data.root") from None
        missing = _missing(cls, root)
    if missing:
        where = f"{root} does not exist" if not os.path.isdir(root) else \
            f"{root} has no {pretty} files ({missing} missing)"
        raise DatasetError(f"data.root: {where}; set data.root to the folder holding {cls.base_folder}/ "
                           "or set data.download: true")

    # Augment at the stored 32 px (the papers' crop), then resize to data.image_size if it differs.
    resize = [transforms.Resize(image_size, antialias=True)] if image_size != 32 else []
    normalize = resize + [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    splits = {}
    for split, transform in (("train", augmentation + normalize), ("test", normalize)):
        try:
            ds = cls(root, train=split == "train", transform=transforms.Compose(transform), verify=verify)
        except RuntimeError:  # torchvision's "not found or corrupted": name the file that fails md5
            bad = next((f for f, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
                        if not check_integrity(os.path.join(root, cls.base_folder, f), md5)), cls.base_folder)
            raise DatasetError(f"data.root: {os.path.join(root, cls.base_folder, bad)} fails its md5 check "
                               f"(corrupt or partial copy); delete {cls.base_folder}/ and fetch {pretty} again") from None
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DatasetError(f"data.root: {os.path.join(root, cls.base_folder)} holds {pretty} files that "
                               f"cannot be read ({type(exc).__name__}: {first_line(exc)}); fetch them again") from None
        if ds.targets and not 0 <= min(ds.targets) <= max(ds.targets) < num_classes:
            raise DatasetError(f"data.root: {os.path.join(root, cls.base_folder)} has labels outside "
                               f"0..{num_classes - 1}; it is not {pretty}")
        splits[split] = ds
    info = DatasetInfo(name, num_classes=num_classes, in_channels=3, image_size=image_size,
                       train_size=len(splits["train"]), test_size=len(splits["test"]))
    return splits["train"], splits["test"], info


@register_dataset("cifar10")
def cifar10(root: str | None, *, augment: bool, download: bool, seed: int, verify: bool = True,
            image_size: int = 32, mean: list[float] | None = None, std: list[float] | None = None):
    """CIFAR-10 via torchvision from root/cifar-10-batches-py (download only with data.download); 3x32x32, 10 classes."""
    del seed
    return _load("cifar10", root, augment, download, verify, image_size, mean, std)


@register_dataset("cifar100")
def cifar100(root: str | None, *, augment: bool, download: bool, seed: int, verify: bool = True,
             image_size: int = 32, mean: list[float] | None = None, std: list[float] | None = None):
    """CIFAR-100 via torchvision from root/cifar-100-python (download only with data.download); 3x32x32, 100 classes."""
    del seed
    return _load("cifar100", root, augment, download, verify, image_size, mean, std)
