"""Helpers shared by test modules (pytest puts this folder on sys.path: `from helpers import ...`)."""

import signal

from nmtrain.experiments import runner as runner_module


def interrupt_at(monkeypatch, at_step):
    """A real SIGINT while step ``at_step`` (0-based) runs: the runner finishes it, checkpoints, exits 130."""
    calls = {"n": 0}
    original = runner_module.FlopCounter.add_step

    def add_step(self, *args, **kwargs):
        if calls["n"] == at_step:
            signal.raise_signal(signal.SIGINT)
        calls["n"] += 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(runner_module.FlopCounter, "add_step", add_step)
