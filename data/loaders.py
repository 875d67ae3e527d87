"""DataLoaders with a reproducible data order.

The train loader shuffles with an :class:`EpochSampler`: epoch ``e`` is the permutation drawn from a
``torch.Generator`` seeded with ``seed + e``, so the order of every epoch depends on the seed and the
epoch number alone, not on how much of the global RNG the model or augmentation has consumed. That
makes the order of any epoch reproducible on its own, which is what resuming a run mid-epoch needs:
``set_epoch(loader, epoch, skip_batches)`` replays epoch ``epoch`` without its first batches.
DataLoader workers are seeded from the loader's generator, reseeded per epoch the same way. The test
loader never shuffles.

Multi-process (``world > 1``): ``batch_size`` is the *global* batch. Every rank draws the same
permutation of the epoch, cuts it into global batches, and takes its contiguous share of each
(``batch_size / world`` samples; the epoch's last, shorter batch is split as evenly as possible), so
the ranks together see exactly the batches one process would, in the same order.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .registry import DatasetError, positive_int

CHUNK = 1 << 16     # indices turned into Python ints at a time


class EpochSampler(Sampler[int]):
    """A shuffle whose epoch ``e`` order is ``randperm(n)`` under ``manual_seed(seed + e)``.

    Each full pass moves on to the next epoch by itself; ``set_epoch(e, start)`` picks the epoch
    and drops the first ``start`` indices of its order (for a resumed run).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, batch_size: int | None = None):
        if world > 1 and batch_size is None:
            raise ValueError("a multi-process EpochSampler needs the global batch_size")
        self.size, self.seed = size, seed
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.size:
            raise ValueError(f"start {start} outside 0..{self.size}")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> list[int]:
        return self._permutation(epoch).tolist()

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=gen)

    def _share(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of every global batch of ``indices``: the same slice of every full
        batch, then its slice of the last, shorter one."""
        if self.world == 1:
            return indices
        b = self.batch_size
        full = len(indices) // b * b
        return torch.cat([indices[:full].view(-1, b)[:, self._slice(b)].reshape(-1),
                          indices[full:][self._slice(len(indices) - full)]])

    def _slice(self, n: int) -> slice:
        """This rank's part of a batch of ``n``: ``n // world`` each, the first ``n % world`` ranks one more."""
        q, extra = divmod(n, self.world)
        a = self.rank * q + min(self.rank, extra)
        return slice(a, a + q + (self.rank < extra))

    def __len__(self) -> int:
        count = self.size - self.start
        if self.world == 1:
            return count
        full, last = divmod(count, self.batch_size)
        part = self._slice(self.batch_size)
        return full * (part.stop - part.start) + len(range(last)[self._slice(last)])

    def __iter__(self) -> Iterator[int]:
        # The epoch's order stays a tensor and becomes Python ints a chunk at a time: a text corpus has
        # millions of windows, and a run often stops long before an epoch ends (a list of 4.5M ints is 160 MB).
        indices = self._share(self._permutation(self.epoch)[self.start:])
        self.epoch, self.start = self.epoch + 1, 0
        return (i for chunk in indices.split(CHUNK) for i in chunk.tolist())


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make the next pass over a train loader from :func:`build_loaders` be epoch ``epoch``, from batch
    ``skip_batches`` on (the batches before it are not loaded at all)."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError("set_epoch needs a train loader made by build_loaders")
    sampler.set_epoch(epoch, skip_batches * (sampler.batch_size or loader.batch_size))
    loader.generator.manual_seed(sampler.seed + epoch)   # the workers' base seed of that epoch


def check_global_batch(batch_size: int, world: int) -> None:
    """The global batch ``data.batch_size`` splits evenly over ``world`` processes. Needs no data and no
    process group: `nmtrain train --nproc N` checks it before it launches anything."""
    positive_int("data.batch_size", batch_size)
    if world > 1 and batch_size % world:
        raise DatasetError(f"data.batch_size: the global batch {batch_size} is not divisible by the "
                           f"{world} processes; use a multiple of {world}")


def build_loaders(train_ds: Dataset, test_ds: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                  eval_batch_size: int | None = None, drop_last: bool = False,
                  pin_memory: bool | None = None, rank: int = 0, world: int = 1) -> tuple[DataLoader, DataLoader]:
    """(train loader: shuffled, seeded per epoch; test loader: in order, ``eval_batch_size`` or ``batch_size``).

    With ``world > 1`` the train loader yields rank ``rank``'s share of each global batch of ``batch_size``;
    the test loader is the full test set on every rank."""
    check_global_batch(batch_size, world)
    local_batch = batch_size
    if world > 1:
        if drop_last:
            raise DatasetError("drop_last is not supported with several processes")
        last = len(train_ds) % batch_size
        if 0 < last < world:
            raise DatasetError(f"data.batch_size: the last batch of an epoch ({last} of {len(train_ds)} samples) "
                               f"cannot be split across {world} processes; change data.batch_size or "
                               "data.train_subset")
        local_batch = batch_size // world
    eval_batch_size = positive_int("data.eval_batch_size",
                                   eval_batch_size if eval_batch_size is not None else batch_size)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DatasetError(f"data.num_workers: must be a non-negative integer, got {num_workers!r}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    sampler = (EpochSampler(len(train_ds), seed) if world == 1
               else EpochSampler(len(train_ds), seed, rank=rank, world=world, batch_size=batch_size))
    train = DataLoader(train_ds, batch_size=local_batch, sampler=sampler,
                       drop_last=drop_last, generator=torch.Generator().manual_seed(seed), **common)
    test = DataLoader(test_ds, batch_size=eval_batch_size, shuffle=False, **common)
    return train, test
