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


# -- the hostile-input contract: one line `error: ...`, exit 2, nothing written, nothing damaged ------

def snapshot(*roots):
    """Every path under ``roots`` (the roots included) with its kind, mode and content hash: two equal
    snapshots mean nothing was written, replaced, chmod-ed or left behind (a temp file shows up too)."""
    import hashlib
    import os
    import stat
    from pathlib import Path

    seen = {}
    for root in map(Path, roots):
        if not os.path.lexists(root):
            seen[str(root)] = None
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() and not root.is_symlink() else [root]:
            st = os.lstat(path)
            digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if stat.S_ISREG(st.st_mode) else None)
            seen[str(path)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, digest)
    return seen


def assert_refused(result, needle, before=None, after=None):
    """The contract for bad input: one line on stderr starting ``error: `` and containing ``needle``,
    exit code 2, no traceback; and, given snapshots, nothing changed between ``before`` and ``after``."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert needle in result.stderr, result.stderr
    if before is not None:
        assert after == before
