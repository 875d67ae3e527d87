"""Hostile input, by class: every bad input gets one line `error: ...` on stderr naming the field or
file and the fix, exit code 2, no traceback, nothing written and nothing damaged (snapshots of the
directories around each case are compared). Each class is enforced by one mechanism, named in its
module's docstring and section comments. The finished run that many cases read is trained once per session."""

import shutil
from pathlib import Path

import pytest

from helpers import quick_train


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A finished tiny run (its model.pt is the input of prune, convert and adaprune); tests only read it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = quick_train(out, "train.max_steps=4")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def finished_run(trained, tmp_path):
    """A copy of ``trained`` at tmp_path/run, for a test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))
