"""`sparsity.threads`: parallel numba kernels on torch's thread count, serial in a child forked from a started
pool (where numba's next parallel launch would kill the process)."""

import multiprocessing as mp

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
