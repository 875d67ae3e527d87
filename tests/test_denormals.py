"""`flush_denormals` (experiments/denormals.py) and `train.flush_denormals`: the CPU's denormal numbers taken as
zero on every thread that computes, checked on each, and the modes put back after; refused where they cannot be.

Each test leaves every thread keeping denormals, as the suite runs (`_keep_after`)."""

from __future__ import annotations

import json
import platform

import pytest
import torch
import yaml

import nmtrain
from helpers import assert_refused, quick_train, snapshot
from nmtrain.experiments import denormals, runner
from nmtrain.sparsity import threads

x86 = pytest.mark.skipif(not denormals.supported(), reason="the flush-to-zero modes are set on x86-64 CPUs only")
TINY = 1.4e-45      # the smallest float32 denormal


@pytest.fixture(autouse=True)
def _keep_after():
    yield
    if denormals.supported():
        torch.set_num_threads(2)        # reach both threads of the pool, as the tests started it
        denormals.set_flush_denormals(False)


def _denormal(entries: int) -> torch.Tensor:
    """``entries`` copies of the smallest denormal, made by their bits (no arithmetic the modes would touch)."""
    return torch.ones(entries, dtype=torch.int32).view(torch.float32)


def _flushes_on_this_thread() -> bool:
    """A product below torch's parallel grain (so computed on the calling thread alone) over denormals is zero."""
    return bool((_denormal(64) * 1.0 == 0).all())


@x86
def test_torchs_own_call_misses_the_pool_and_flush_denormals_reaches_every_thread():
    """The case the module exists for: after the pool has started, torch.set_flush_denormal sets the calling
    thread alone (a product across both threads is half flushed); `flush_denormals` sets this thread, the pool's
    and split_map's second thread, and afterwards each computes as the calling thread did before."""
    torch.set_num_threads(2)
    _denormal(1 << 18) * 1.0                        # the pool's threads start, keeping denormals
    assert denormals.torch_flushes() is False and not _flushes_on_this_thread()
    assert torch.set_flush_denormal(True)
    try:
        assert denormals.torch_flushes() is None and _flushes_on_this_thread()     # some threads, not all
    finally:
        torch.set_flush_denormal(False)
    with nmtrain.flush_denormals():
        assert denormals.torch_flushes() is True and denormals.flushing_here()
        assert _flushes_on_this_thread() and threads.on_other_thread(_flushes_on_this_thread)
        assert float((_denormal(1 << 18) + _denormal(1 << 18)).max()) == 0.0        # FTZ and DAZ both
    assert denormals.torch_flushes() is False and not denormals.flushing_here()
    assert not threads.on_other_thread(_flushes_on_this_thread)
    assert float(_denormal(4).add(_denormal(4)).max()) == pytest.approx(2 * TINY, rel=0.01)


@x86
def test_flush_denormals_off_inside_a_flushing_process_and_on_again_after():
    torch.set_num_threads(2)
    denormals.set_flush_denormals(True)
    with denormals.flush_denormals(False):
        assert denormals.torch_flushes() is False and not threads.on_other_thread(_flushes_on_this_thread)
    assert denormals.torch_flushes() is True and threads.on_other_thread(_flushes_on_this_thread)


@x86
def test_a_thread_that_does_not_take_the_modes_is_an_error_not_a_half_flushed_run(monkeypatch):
    monkeypatch.setattr(denormals, "torch_flushes", lambda: None)   # torch's product flushed on some threads only
    with pytest.raises(nmtrain.ExperimentError, match="could not be set on every thread"):
        denormals.set_flush_denormals(True)


def test_a_machine_without_the_modes_is_refused_before_any_work(tmp_path, monkeypatch):
    """Not x86-64: the API raises, and `nmtrain train` refuses the spec in one line, exit 2, writing nothing."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert not denormals.supported() and "aarch64" in denormals.unsupported()
    with pytest.raises(nmtrain.ExperimentError, match="flush_denormals: nmtrain sets the flush-to-zero modes on "
                                                      "x86-64 CPUs only, not on aarch64"):
        with nmtrain.flush_denormals():
            pass
    before = snapshot(tmp_path)
    result = quick_train(tmp_path / "run", "train.flush_denormals=true")
    assert_refused(result, "train.flush_denormals: nmtrain sets the flush-to-zero modes on x86-64 CPUs only",
                   before, snapshot(tmp_path))


@x86
def test_train_flush_denormals_trains_with_every_thread_flushing_and_puts_the_modes_back(tmp_path, monkeypatch):
    """The run's loop sees every thread flushing (and the default run none); after the run, none is; the
    resolved spec in the run directory says so."""
    torch.set_num_threads(2)
    seen = []
    original = runner._loop

    def loop(run, console, progress):
        seen.append((denormals.torch_flushes(), threads.on_other_thread(_flushes_on_this_thread)))
        return original(run, console, progress)
    monkeypatch.setattr(runner, "_loop", loop)
    flushed = quick_train(tmp_path / "flush", "train.flush_denormals=true", "--method", "srste")
    assert flushed.exit_code == 0, flushed.output
    assert denormals.torch_flushes() is False
    kept = quick_train(tmp_path / "keep", "--method", "srste")
    assert kept.exit_code == 0, kept.output
    assert seen == [(True, True), (False, False)]
    config = yaml.safe_load((tmp_path / "flush" / "config.yaml").read_text())
    assert config["train"]["flush_denormals"] is True
    # no denormal meets this run's arithmetic: it is the same run, bit for bit, either way
    weights = _weights(tmp_path / "flush")
    assert len(weights) >= 4 and weights == _weights(tmp_path / "keep")


def _weights(run) -> dict[str, list]:
    state = torch.load(run / "model.pt", weights_only=True)
    return {key: value.tolist() for key, value in state.items() if torch.is_tensor(value)}
