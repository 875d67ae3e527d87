"""The dataset registry and `build_datasets`, the one entry point the training runner calls.

A dataset is registered with ``@register_dataset("name", summary=...)`` on a builder function::

    def builder(root: str | None, *, augment: bool, download: bool, seed: int, **options)
        -> (train_ds, test_ds, DatasetInfo)

Builder-specific options (``image_size`` for imagefolder and CIFAR, ``mean``/``std`` for the real
datasets, ``verify`` for CIFAR, ...) are keyword arguments of the builder; `build_datasets` passes them
through and turns an option the builder does not take into a one-line `DatasetError` rather than a
TypeError.

Every error meant for the user is a `DatasetError` whose message is ONE line that names the spec
field at fault (``data.root``, ``data.dataset``, ...) and how to fix it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from .errors import DataError


class DatasetError(DataError):
    """A dataset that cannot be built from the given spec; the one-line message names the field."""


def positive_int(field: str, value: object) -> int:
    """``value`` when it is a positive int (not a bool); else a DatasetError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{field}: must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``train_size``/``test_size`` are the sizes of the datasets `build_datasets` returned, i.e. after
    ``train_subset``/``test_subset`` were applied.

    ``task`` says what a sample is: ``"classification"`` (an image and its label) or ``"language_model"``
    (two token windows, the second the first shifted by one; data/text.py). A language-model dataset
    fills ``vocab_size``, ``block_size`` (the window length), ``tokenizer`` (its JSON record,
    data/tokenizer.py) and ``corpus`` (what text it read, its sha256 and the split), and sets
    ``num_classes = vocab_size``, ``in_channels = 1``, ``image_size = block_size``, so code that reads
    those still gets the sizes it needs. The defaults leave the image datasets as they were.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int
    # A language-model dataset (task "language_model") sets the five below; then num_classes = vocab_size,
    # in_channels = 1 and image_size = block_size, so code that reads the image fields still runs.
    task: str = "classification"
    vocab_size: int = 0
    block_size: int = 0
    tokenizer: dict | None = None   # JSON-able: {"kind": "char", "chars": ...} or {"kind": "byte"}
    corpus: dict | None = None      # JSON-able: name, sha256, files, characters, token counts, the split rule


Builder = Callable[..., tuple[Dataset, Dataset, DatasetInfo]]


@dataclass(frozen=True)
class _Entry:
    name: str
    builder: Builder
    summary: str
    task: str = "classification"


_DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, summary: str | None = None,
                     task: str = "classification") -> Callable[[Builder], Builder]:
    """Register ``builder`` under ``name``; ``summary`` defaults to the docstring's first line. ``task``
    (classification, language_model) is known from the registry alone, so a spec pairing a model with a
    dataset of another task is refused before any data is read."""
    def decorator(builder: Builder) -> Builder:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        doc = (builder.__doc__ or "").strip().splitlines()
        _DATASETS[name] = _Entry(name, builder, summary or (doc[0] if doc else name), task)
        return builder
    return decorator


def dataset_task(name: str) -> str:
    """The task of dataset ``name`` (its registry entry's; nothing is read); an unknown name is a DatasetError."""
    if name not in _DATASETS:
        raise DatasetError(f"data.dataset: {name!r} is unknown; use one of: {', '.join(_DATASETS)}")
    return _DATASETS[name].task


def list_datasets() -> dict[str, str]:
    """``{name: one-line description}`` of every registered dataset, in registration order."""
    return {entry.name: entry.summary for entry in _DATASETS.values()}


def check_options(name: str, options: dict[str, Any]) -> None:
    """``name`` is a registered dataset whose builder takes every one of ``options``; else a DatasetError.

    Cheap (nothing is read): the runner calls it when it validates a spec, before any data is touched."""
    if name not in _DATASETS:
        raise DatasetError(f"data.dataset: {name!r} is unknown; use one of: {', '.join(_DATASETS)}")
    _check_options(_DATASETS[name], options)


def normalisation(dataset: str, channels: int, mean: list[float] | None, std: list[float] | None,
                  default_mean: tuple[float, ...], default_std: tuple[float, ...]) -> tuple[tuple, tuple]:
    """The per-channel (mean, std) a dataset normalises with: ``data.mean`` / ``data.std`` where given (one
    value per channel; the spec already checked they are finite and std > 0), else its own statistics."""
    for field, given in (("data.mean", mean), ("data.std", std)):
        if given is not None and len(given) != channels:
            raise DatasetError(f"{field}: {len(given)} value(s) for the {channels}-channel images of {dataset}; "
                               f"give {channels}, one per channel")
    return (tuple(mean) if mean is not None else default_mean, tuple(std) if std is not None else default_std)


def _check_options(entry: _Entry, options: dict[str, Any]) -> None:
    params = inspect.signature(entry.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    common = {"root", "augment", "download", "seed"}
    accepted = [p for p in params if p not in common]
    for key in options:
        if key not in params or key in common:
            takes = ", ".join(accepted) if accepted else "no extra options"
            raise DatasetError(f"data.{key}: not an option of dataset {entry.name!r} (it takes: {takes})")


def seeded_subset(ds: Dataset, size: int | None, seed: int, field: str) -> Dataset:
    """``size`` samples of ``ds`` chosen by ``seed`` (kept in their original order); all when None."""
    if size is None:
        return ds
    total = len(ds)  # type: ignore[arg-type]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DatasetError(f"{field}: must be a positive integer or null, got {size!r}")
    if size > total:
        raise DatasetError(f"{field}: {size} is more than the {total} samples available; "
                           f"use at most {total} or null for all")
    if size == total:
        return ds
    generator = torch.Generator().manual_seed(seed)
    # Sorted so that a subset reads the underlying storage in order; the loader shuffles anyway.
    indices = torch.randperm(total, generator=generator)[:size].sort().values.tolist()
    return Subset(ds, indices)


HOLDOUT_SEED = 20_211_206     # one fixed split for every run: runs with different seeds evaluate the same samples


def build_datasets(name: str, root: str | None = None, augment: bool = False,
                   train_subset: int | None = None, test_subset: int | None = None,
                   download: bool = False, seed: int = 0, holdout: int | None = None,
                   **options: Any) -> tuple[Dataset, Dataset, DatasetInfo]:
    """The (train, test) datasets of ``name`` and their `DatasetInfo`.

    Samples are ``(float image tensor C x H x W, normalised; int label)``. ``augment`` applies the
    dataset's training augmentation to the train split only. ``train_subset``/``test_subset`` keep
    that many samples, chosen deterministically from ``seed`` (independently per split).
    ``holdout`` takes that many samples out of the train split (after ``train_subset``; one fixed
    split whatever the seed, without augmentation) and returns them in place of the test split: what
    defaults are chosen on, so that the test split stays unseen. ``options`` go to the dataset's builder (see `list_datasets` and each builder's docstring).
    """
    check_options(name, options)
    entry = _DATASETS[name]
    if holdout is not None and entry.task != "classification":     # known before any data is read
        raise DatasetError("data.holdout: a language-model dataset evaluates on its validation split (the last "
                           "10% of the text); its training windows overlap, so none can be held out; use null")
    train, test, info = entry.builder(root, augment=augment, download=download, seed=seed, **options)
    # Different streams per split, so the two subsets are not the same index pattern.
    train = seeded_subset(train, train_subset, seed, "data.train_subset")
    if holdout is not None:
        if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < len(train):
            raise DatasetError(f"data.holdout: must be an integer in [1, {len(train) - 1}] (training samples "
                               f"held out for evaluation) or null, got {holdout!r}")
        plain = train
        if augment:     # the held-out samples are evaluated as test samples are: without augmentation
            plain, _, _ = entry.builder(root, augment=False, download=download, seed=seed, **options)
            plain = seeded_subset(plain, train_subset, seed, "data.train_subset")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        held, kept = sorted(order[:holdout].tolist()), sorted(order[holdout:].tolist())
        return Subset(train, kept), Subset(plain, held), replace(info, train_size=len(kept), test_size=len(held))
    test = seeded_subset(test, test_subset, seed + 1, "data.test_subset")
    return train, test, replace(info, train_size=len(train), test_size=len(test))  # type: ignore[arg-type]
