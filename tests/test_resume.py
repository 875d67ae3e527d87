"""Resuming a run: Ctrl-C and SIGKILL mid-epoch, then `--resume`, end bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from nmtrain.cli.main import app
from nmtrain.experiments import runner as runner_module
from nmtrain.experiments.io import OutputError
from nmtrain.experiments.methods import get_method, list_methods

from helpers import cli, interrupt_at, resume

QUICK = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=mlp",
         "train.epochs=3", "optim.lr=0.05", "schedule.warmup_epochs=0", "train.eval_interval=3",
         "train.checkpoint_interval=5", "--no-progress"]          # 8 steps per epoch, 24 in all


def _run(out, *extra):
    return cli.invoke(app, ["train", *QUICK, "--out", str(out), *map(str, extra)])


def _method_args(method):
    """Method state that changes within 24 steps: Bi-Mask re-searches permutations, BaME swaps and counts,
    maskdecay recomputes its mask (and fine-tunes dense from step 20), STEP (Adam only) fills its AutoSwitch
    window and switches after step 12 (the cap), after the interruption at step 10."""
    extra = {"bimask": ["method.params.iter=4"], "bame": ["method.params.interval=2"],
             "maskdecay": ["method.params.mask_interval=4"],
             "step": ["optim.name=adamw", "optim.lr=0.005", "method.params.window=4", "method.params.t_min=0.5",
                      "method.params.t_max=0.5"]}
    return ["--method", method, "--pattern", "2:4", *extra.get(method, [])]


def _assert_same_run(a, b):
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k                        # bit-identical
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("wall_seconds"), sb.pop("wall_seconds")
    assert sa == sb
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 24
    config = [yaml.safe_load((d / "config.yaml").read_text()) for d in (a, b)]
    assert config[0].pop("out") == str(a) and config[1].pop("out") == str(b) and config[0] == config[1]


@pytest.mark.parametrize("method", sorted(list_methods()))
def test_ctrl_c_mid_epoch_then_resume_is_bit_identical(tmp_path, monkeypatch, method):
    extra = _method_args(method)
    ref = _run(tmp_path / "ref", *extra)
    assert ref.exit_code == 0, ref.stderr

    with monkeypatch.context() as m:
        interrupt_at(m, 10)                  # inside epoch 2 (steps 8..15), between checkpoints 10 and 15
        stopped = _run(tmp_path / "cut", *extra)
    assert stopped.exit_code == 130, stopped.stderr + stopped.stdout
    out = tmp_path / "cut"
    assert stopped.stderr.count("\n") == 1 and f"nmtrain train --resume {out}" in stopped.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 11   # the step it was in, finished
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()

    resumed = resume(out)
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_run(tmp_path / "ref", out)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_fused_optimizer_resumes_bit_identical(tmp_path, monkeypatch, optim):
    """`optim.fused: true`: the fused kernel's state (its step counts are tensors) comes back from the
    checkpoint, and the resumed run ends as the uninterrupted one, bit for bit."""
    extra = ["--method", "srste", f"optim.name={optim}", "optim.fused=true"]
    extra += ["optim.lr=0.005"] if optim == "adamw" else []
    ref = _run(tmp_path / "ref", *extra)
    assert ref.exit_code == 0, ref.stderr
    with monkeypatch.context() as m:
        interrupt_at(m, 10)
        assert _run(tmp_path / "cut", *extra).exit_code == 130
    assert resume(tmp_path / "cut").exit_code == 0
    _assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]["fused"]


SLOW_CHILD = """
import sys, time
from nmtrain.experiments import runner
orig = runner.FlopCounter.add_step
def slow(self, *a, **k):
    time.sleep(0.15)            # a slow step, so the parent can kill mid-run; numerics untouched
    return orig(self, *a, **k)
runner.FlopCounter.add_step = slow
from nmtrain.cli.main import main
sys.argv = ["nmtrain"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("method", ["bame", "bimask"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, method):
    extra = _method_args(method)
    out = tmp_path / "killed"
    torch.set_num_threads(1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "train", *QUICK, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        step = -1
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").exists():
                step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
                if step >= 10:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= killed_at < 24 and killed_at % 8 != 0        # mid-epoch
    assert not (out / "model.pt").exists()

    resumed = resume(out)
    assert resumed.exit_code == 0, resumed.stderr
    ref = _run(tmp_path / "ref", *extra)
    assert ref.exit_code == 0, ref.stderr
    _assert_same_run(tmp_path / "ref", out)


def test_resume_refuses_overrides_that_change_the_spec_and_accepts_ones_that_do_not(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "train.max_steps=4").exit_code == 0
    changed = resume(out, "optim.lr=0.1")
    assert changed.exit_code == 2 and changed.stderr.count("\n") == 1
    assert "--resume: optim.lr=0.1 would change the spec" in changed.stderr
    assert resume(out, "--overwrite").exit_code == 2
    same = resume(out, "optim.lr=0.05")
    assert same.exit_code == 0, same.stderr
    missing = resume(tmp_path / "nothing")
    assert missing.exit_code == 2 and "--resume" in missing.stderr


def test_an_interrupted_checkpoint_write_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _run(out, "train.max_steps=5").exit_code == 0
    good = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)           # the write got half way, then the disk filled up
        raise OSError(28, "No space left on device")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    monkeypatch.setattr(torch, "save", half_save)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OutputError, match=f"--out: cannot write {out / 'checkpoint.pt'}: no space left on device"):
        runner_module._save_checkpoint(out / "checkpoint.pt", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       torch.optim.lr_scheduler.LambdaLR(
                                           torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 1.0),
                                       get_method("dense")(None, None).state_dict(), 99, 0)
    assert (out / "checkpoint.pt").read_bytes() == good and ckpt["step"] == 5
    assert not list(out.glob(".*.tmp"))
