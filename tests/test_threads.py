"""`sparsity.threads`: parallel numba kernels on torch's thread count, serial in a child forked from a started
pool (where numba's next parallel launch would kill the process)."""

import multiprocessing as mp
import threading
import time

import pytest
import torch

from nmtrain.sparsity import fused, mvue24, threads

pytestmark = pytest.mark.skipif(threads.numba is None, reason="numba is not installed")


def _sample() -> torch.Tensor:
    # dYᵀ: 96 rows, 2048 tokens: above fused._PARALLEL_ENTRIES, so that the parent's sample starts the pool
    x = torch.randn(2048, 96, generator=torch.Generator().manual_seed(3)).t()
    return mvue24(x, torch.Generator().manual_seed(4))


def _child(out: str) -> None:
    # forked after the parent's pool started: the same sample, serially, and the process lives to save it
    torch.save({"forked": threads.forked_from_pool(), "sample": _sample()}, out)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_a_child_forked_after_a_parallel_kernel_runs_the_kernels_serially(tmp_path):
    assert 96 * 2048 >= fused._PARALLEL_ENTRIES     # the sample below runs on the pool
    parent = _sample()                  # starts numba's pool in this process, if nothing had yet
    assert not threads.forked_from_pool()
    out = str(tmp_path / "child.pt")
    proc = mp.get_context("fork").Process(target=_child, args=(out,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0           # numba's parallel launch would have terminated it
    child = torch.load(out, weights_only=True)
    assert child["forked"] is True
    assert torch.equal(child["sample"], parent)


def test_the_thread_count_is_torchs_and_torchs_is_put_back():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threads.numba_threads() as workers:
            assert workers == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_small_job_runs_the_parallel_kernels_on_one_thread_and_torchs_count_is_put_back():
    # a job too small for the pool's wake-ups: numba's kernels on this thread alone, torch's count untouched
    before = torch.get_num_threads()
    with threads.numba_threads(parallel=False) as workers:
        assert workers == 1
        assert threads.numba.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.numba_threads() as workers:
        assert workers == min(before, threads.numba.config.NUMBA_NUM_THREADS)
        assert threads.numba.get_num_threads() == workers
    assert torch.get_num_threads() == before


# --- split_map: a loop over layers shared with a second thread -------------------------------------------

@pytest.fixture
def two_threads():
    torch.set_num_threads(2)        # the suite runs on one (conftest), which split_map takes as "stay here"


def _where(log):
    """An ``fn`` for split_map that notes which thread ran each item, and under which grad mode."""
    def fn(item):
        log.append((item, threading.get_ident(), torch.is_grad_enabled()))
        return item * 10
    return fn


def test_split_map_shares_a_large_job_with_one_other_thread_and_keeps_the_order(two_threads):
    log = []
    sizes = [threads.SPLIT_ENTRIES // 4, threads.SPLIT_ENTRIES // 2, 10, threads.SPLIT_ENTRIES // 4, 20]
    with torch.no_grad():
        out = threads.split_map(_where(log), list(range(5)), sizes)
    assert out == [0, 10, 20, 30, 40]
    assert sorted(item for item, _, _ in log) == list(range(5))             # each item once
    ran = {}
    for item, ident, grad in log:
        ran.setdefault(ident, []).append(item)
        assert grad is False                                                 # the caller's grad mode, on both
    assert len(ran) == 2 and threading.get_ident() in ran
    loads = sorted(sum(sizes[i] for i in items) for items in ran.values())
    assert loads[1] - loads[0] <= max(sizes)                                # about half the work each


@pytest.mark.parametrize("case", ["small", "one item", "one torch thread"])
def test_split_map_runs_a_small_job_here(case, monkeypatch, two_threads):
    log = []
    items, sizes = [1, 2], [threads.SPLIT_ENTRIES, threads.SPLIT_ENTRIES]
    if case == "small":
        sizes = [threads.SPLIT_ENTRIES // 2 - 1, threads.SPLIT_ENTRIES // 2]
    elif case == "one item":
        items, sizes = [1], [4 * threads.SPLIT_ENTRIES]
    else:
        monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 1)
    assert threads.split_map(_where(log), items, sizes) == [10 * i for i in items]
    assert {ident for _, ident, _ in log} == {threading.get_ident()}


@pytest.mark.parametrize("raiser", ["caller", "other"])
def test_split_map_raises_either_threads_error_after_both_are_done(raiser, two_threads):
    done, raised_on = [], []

    def fn(item):
        if item == "bad":
            raised_on.append(threading.get_ident())
            raise ValueError("a weight it cannot rank")
        time.sleep(0.05)            # the other thread's items still running when the error is made
        done.append(item)
        return item

    big = threads.SPLIT_ENTRIES
    # the largest item goes to the caller; the next to the other thread
    items, sizes = (["bad", "x", "y"], [big, big // 2, big // 2]) if raiser == "caller" else \
        (["x", "bad", "y"], [big, big, 10])
    with pytest.raises(ValueError, match="cannot rank"):
        threads.split_map(fn, items, sizes)
    assert sorted(done) == ["x", "y"]
    assert (raised_on == [threading.get_ident()]) == (raiser == "caller")


def _split_child(out: str) -> None:
    big = threads.SPLIT_ENTRIES
    assert torch.get_num_threads() >= 2
    torch.save(threads.split_map(lambda i: i + 1, [1, 2, 3], [big, big, big]), out)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_a_child_forked_after_split_map_ran_starts_its_own_thread(tmp_path, two_threads):
    big = threads.SPLIT_ENTRIES
    assert threads.split_map(lambda i: i, [1, 2], [big, big]) == [1, 2]     # this process's thread, started
    out = str(tmp_path / "child.pt")
    proc = mp.get_context("fork").Process(target=_split_child, args=(out,))
    proc.start()
    proc.join(60)               # the parent's thread is not in the child: with it, the child would wait forever
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive and proc.exitcode == 0
    assert torch.load(out, weights_only=True) == [2, 3, 4]
