"""Helpers shared by test modules (pytest puts this folder on sys.path: `from helpers import ...`)."""

import hashlib
import os
import signal
import stat
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments import runner as runner_module
from nmtrain.experiments.methods import train_step

ROOT = Path(__file__).resolve().parents[1]      # the repository

# -- running the CLI in-process ------------------------------------------------------------------

cli = CliRunner()
# A tiny run on synthetic data: an MLP, 2 epochs of 8 steps.
QUICK = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=mlp",
         "train.epochs=2", "optim.lr=0.05", "schedule.warmup_epochs=0", "--no-progress"]


def run_cli(*args):
    """``nmtrain ARGS...`` in-process (paths and numbers as strings); the click Result."""
    return cli.invoke(app, [str(a) for a in args])


def quick_train(out, *args):
    """``nmtrain train`` of the QUICK run into ``out``, with ``args`` added."""
    return run_cli("train", *QUICK, "--out", out, *args)


def resume(out, *args):
    """``nmtrain train --resume out``, with ``args`` added."""
    return run_cli("train", "--resume", out, "--no-progress", *args)


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


# -- building inputs -----------------------------------------------------------------------------

def write_imagefolder(root, classes=("ant", "bee", "cat"), per_class=4, side=40):
    """A tiny ImageNet-layout tree of PNGs: each class its own mean colour plus noise, so it is learnable."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                base = np.zeros(3) + 60
                base[k % 3] = 200
                pixels = np.clip(base + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def method_step(method, model, opt, x, y, step, scheduler=None):
    """Training step ``step`` on (x, y) as the runner drives it (`train_step`): the method's hooks in
    their contract order around cross-entropy, backward and the optimizer step. Returns the loss."""
    return train_step(method, step, opt, lambda: nn.functional.cross_entropy(model(x), y), scheduler)


def python_files(*folders):
    """The repository's .py files under ``folders``, folder by folder, each folder's sorted."""
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


# -- the hostile-input contract: one line `error: ...`, exit 2, nothing written, nothing damaged ------

def snapshot(*roots):
    """Every path under ``roots`` (the roots included) with its kind, mode and content hash: two equal
    snapshots mean nothing was written, replaced, chmod-ed or left behind (a temp file shows up too)."""
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
