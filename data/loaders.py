"""DataLoaders with a reproducible data order.

The train loader shuffles with its own ``torch.Generator`` seeded by ``seed``: the order of every
epoch depends on the seed alone, not on how much of the global RNG the model or augmentation has
consumed. DataLoader workers are seeded from that generator too. The test loader never shuffles.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .registry import DatasetError


def _positive(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{field}: must be a positive integer, got {value!r}")
    return value


def build_loaders(train_ds: Dataset, test_ds: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                  eval_batch_size: int | None = None, drop_last: bool = False,
                  pin_memory: bool | None = None) -> tuple[DataLoader, DataLoader]:
    """(train loader: shuffled, seeded; test loader: in order, ``eval_batch_size`` or ``batch_size``)."""
    _positive("data.batch_size", batch_size)
    eval_batch_size = _positive("data.eval_batch_size", eval_batch_size if eval_batch_size is not None else batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DatasetError(f"data.num_workers: must be a non-negative integer, got {num_workers!r}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                       generator=torch.Generator().manual_seed(seed), **common)
    test = DataLoader(test_ds, batch_size=eval_batch_size, shuffle=False, **common)
    return train, test
