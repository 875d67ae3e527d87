"""Hostile input, class 6: the ``--nproc`` launcher refuses bad input before it launches, and passes
the first failed process's exit code on."""

import logging
import subprocess
import sys

import pytest
import torch

from nmtrain.cli import torchrun as torchrun_module
from nmtrain.cli import train as cli_train
from nmtrain.cli.main import app

from helpers import QUICK, assert_refused, cli, quick_train, resume, snapshot


# == class 6: launcher ==
# `train --nproc N` checks in the parent what the N processes would refuse, before torchrun starts:
# a refusal is one line and exit 2, with subprocess.call never reached and nothing written.

@pytest.fixture
def no_launch(monkeypatch):
    launched = []

    def call(cmd, *args, **kwargs):
        launched.append(cmd)
        return 0
    monkeypatch.setattr(cli_train.subprocess, "call", call)
    return launched


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "0"], "--nproc: give 1 to 64 processes, got 0"),
    (["--nproc", "-1"], "--nproc: give 1 to 64 processes, got -1"),
    (["--nproc", "100000"], "--nproc: give 1 to 64 processes, got 100000"),
    (["--nproc", "2", "data.batch_size=63"], "data.batch_size: the global batch 63 is not divisible by the 2 processes"),
    (["--nproc", "3", "data.batch_size=64"], "data.batch_size: the global batch 64 is not divisible by the 3 processes"),
    (["--nproc", "2", "--pattern", "２:４"], "--pattern: pattern '２:４'"),
    (["--nproc", "2", "optim.lrr=1"], "optim.lrr: unknown key"),
    (["--nproc", "2", "--method", "nosuch"], "nosuch"),
    (["--nproc", "2", "--overwrite", "--resume", "."], "--resume and --overwrite: choose one"),
])
def test_launcher_refuses_before_launching(tmp_path, no_launch, args, needle):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = quick_train(out, *args)
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert no_launch == [] and not out.exists()


def test_launcher_refuses_more_processes_than_the_machine_has_gpus(tmp_path, no_launch, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(cli_train, "_gpus", lambda: 1)
    monkeypatch.setattr("nmtrain.experiments.build.resolve_device", lambda name: torch.device("cuda"))
    result = quick_train(out, "--nproc", "2")
    assert_refused(result, "--nproc: 2 processes need 2 GPUs (one each); this machine has 1")
    assert no_launch == [] and not out.exists()


def test_launcher_checks_the_run_directory_first(tmp_path, no_launch):
    held = tmp_path / "held"
    held.mkdir()
    (held / "summary.json").write_text("{}")
    before = snapshot(tmp_path)
    result = quick_train(held, "--nproc", "2")
    assert_refused(result, "already holds a run", before, snapshot(tmp_path))
    result = cli.invoke(app, ["train", "--resume", str(tmp_path / "absent"), "--nproc", "2"])
    assert_refused(result, "--resume: ", before, snapshot(tmp_path))
    assert no_launch == []


def test_launcher_reads_the_checkpoint_to_resume_before_launching(finished_run, no_launch):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = snapshot(finished_run)
    result = resume(finished_run, "--nproc", "2")
    assert_refused(result, "is not a readable PyTorch file", before, snapshot(finished_run))
    assert no_launch == []


@pytest.mark.parametrize("child_code", [0, 2, 130])
def test_launcher_runs_torchrun_on_good_input_and_passes_its_code_on(tmp_path, monkeypatch, child_code):
    launched = []
    monkeypatch.setattr(cli_train.subprocess, "call", lambda cmd: launched.append(cmd) or child_code)
    out = tmp_path / "run"
    result = quick_train(out, "--nproc", "2")
    assert result.exit_code == child_code and len(launched) == 1
    assert launched[0][1:5] == ["-m", "nmtrain.cli.torchrun", "--standalone", "--nproc_per_node=2"]
    assert not out.exists()                                     # the parent itself writes nothing


@pytest.mark.parametrize("exitcode,code,says", [(2, 2, False), (130, 130, False), (1, 1, True), (-9, 137, True)])
def test_the_torchrun_entry_point_exits_with_the_first_failure(monkeypatch, capsys, exitcode, code, says):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def run(args):
        raise ChildFailedError("nmtrain.cli.main", {1: ProcessFailure(1, 4242, exitcode, "")})
    monkeypatch.setattr("torch.distributed.run.run", run)
    try:
        assert torchrun_module.main(["--standalone", "--nproc_per_node=2", "-m", "nmtrain.cli.main", "train"]) == code
    finally:
        logging.disable(logging.NOTSET)          # main quietens its own process's logging; not the test run's
    err = capsys.readouterr().err
    assert ("Traceback" not in err) and (err.startswith("error: process 1 ") == says)
    assert err.count("\n") == (1 if says else 0)


@pytest.mark.slow
def test_a_refusal_inside_the_processes_is_their_line_and_exit_2(tmp_path):
    # The one check left to the processes (it needs the data): 129 samples leave a last batch of 1.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nmtrain.cli.main", "train", *QUICK, "data.train_subset=129", "--out", str(out),
           "--nproc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("error: data.batch_size: the last batch") for line in lines), proc.stderr
    assert not out.exists()
