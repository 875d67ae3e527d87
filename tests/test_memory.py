"""`keep_freed_memory` (experiments/memory.py): glibc's malloc keeps what a step frees in the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nmtrain.experiments import memory

# In a fresh process (malloc's thresholds as glibc starts them), a 16 MiB block allocated and freed: where it came
# from (its own mapping, or the heap) and how much of the heap is still held once it is freed. mallinfo2: glibc 2.33+.
PROBE = """
import ctypes, sys
import torch
from nmtrain.experiments.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
before = libc.mallinfo2()
block = torch.ones(4 << 20)
during = libc.mallinfo2()
del block
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    first, second = out.strip().splitlines()
    mapped, held = (int(v) for v in second.split())
    return first, mapped, held


@pytest.mark.skipif(not memory._glibc(), reason="glibc's malloc only")
def test_a_freed_block_stays_in_the_heap_for_the_next_step():
    result, mapped, held = _probe("keep")
    assert result == "True"
    assert mapped == 0                          # from the heap, not a mapping of its own (unmapped when freed)
    assert held >= 15 << 20                     # and still held once freed: the heap was not trimmed
    _, mapped_by_default, _ = _probe("default")
    assert mapped_by_default >= 16 << 20        # glibc's own start: a block this large gets its own mapping


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    def not_glibc(name):
        raise ValueError("unrecognized configuration name")

    def no_libc(*args):
        raise AssertionError("no C library may be touched")

    monkeypatch.setattr(memory.os, "confstr", not_glibc)
    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory() is False


@pytest.mark.skipif(not memory._glibc(), reason="glibc's malloc only")
def test_keep_freed_memory_can_be_set_again():
    assert memory.keep_freed_memory() is True and memory.keep_freed_memory() is True


def test_nmtrain_train_keeps_freed_memory_for_its_process(tmp_path, monkeypatch):
    from nmtrain.experiments import runner

    from helpers import quick_train

    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append(True) or True)
    result = quick_train(tmp_path / "run", "--method", "dense")
    assert result.exit_code == 0, result.output
    assert calls == [True]
