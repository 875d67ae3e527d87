"""Multi-process training under torchrun: which process this is, the process group, and what the
processes must agree on.

torchrun starts one process per rank and tells each who it is in its environment (``WORLD_SIZE``,
``LOCAL_RANK``); once the process group is up, `torch.distributed` says the same. Every question the
runner, the launcher and the methods ask about processes is answered here, so a single-process run
(no torchrun, no group) sees one process of rank 0 everywhere and none of them tests for it itself.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this run: ``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``): rank r trains on ``cuda:r``."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def initialized() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether this process trains beside others: a process group of more than one."""
    return initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, processes in the group); (0, 1) for a single-process run."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def rank_device(device: torch.device) -> torch.device:
    """The device this process trains on: its own GPU (``cuda:LOCAL_RANK``) in a multi-process CUDA run."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[int]:
    """Join the process group for the block and leave it after; yields this process's rank. On CUDA the
    process is first pinned to its GPU (one per local rank) and the group talks nccl, on the CPU gloo."""
    index = local_rank()
    if device.type == "cuda":
        torch.cuda.set_device(index)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        # The run's objects sit in reference cycles that only the garbage collector frees, the
        # DistributedDataParallel wrapper among them, whose reducer holds this group: left to the interpreter's
        # exit, they die after the group is destroyed, where gloo's threads can abort the process ("terminate
        # called without an active exception", exit 134). Freed here, they go first.
        gc.collect()
        dist.destroy_process_group()


def sum_across(t: torch.Tensor) -> None:
    """Sum ``t`` over the processes, in place (every process gets the total)."""
    dist.all_reduce(t)


def rank_mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the processes of a multi-process run (a new tensor); ``t`` itself otherwise."""
    if active():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per layer (count, sum of kept indices, sum of squared kept indices mod a prime): int64, on CPU."""
    rows = []
    for mask in masks.values():
        idx = torch.nonzero(mask.detach().reshape(-1).cpu()).reshape(-1).to(torch.int64)
        rows.append(torch.stack([idx.numel() * torch.ones((), dtype=torch.int64), idx.sum(),
                                 ((idx * idx) % 2_147_483_647).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)


def check_masks_agree(masks: dict[str, torch.Tensor], device: torch.device, step: int) -> None:
    """All-gather a checksum of every mask and raise RuntimeError naming the first layer where ranks differ."""
    if not active() or not masks:
        return
    local = _mask_checksums(masks).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered[1:], start=1):
        bad = (other != gathered[0]).any(1)
        if bool(bad.any()):
            name = list(masks)[int(bad.nonzero()[0])]
            raise RuntimeError(f"masks diverged across processes at step {step}: layer {name} differs between "
                               f"rank 0 and rank {rank}")
