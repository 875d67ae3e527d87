"""Hostile input, by class: every bad input gets one line `error: ...` on stderr naming the field or
file and the fix, exit code 2, no traceback, nothing written and nothing damaged (snapshots of the
directories around each case are compared). Each class is enforced by one mechanism, named in the
section's header comment."""

import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmtrain.cli import torchrun as torchrun_module
from nmtrain.cli import train as cli_train
from nmtrain.cli.main import app
from nmtrain.experiments.spec import (MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES, RULES, Spec, SpecError,
                                      load_spec, read_yaml)
from nmtrain.sparsity import Pattern, PatternError, make_mask, parse_pattern
from nmtrain.sparsity import diversity as div

from helpers import QUICK, assert_refused, cli, quick_train, resume, snapshot, write_imagefolder


SPEC_FILES = {
    "malformed.yaml": ("model: [unclosed\n", "not valid YAML at line"),
    "unknown_key.yaml": ("optim:\n  lrr: 0.1\n", "optim.lrr: unknown key"),
    "wrong_type.yaml": ("train:\n  epochs: many\n", "train.epochs: expected int"),
    "not_a_mapping.yaml": ("- just\n- a list\n", "malformed"),   # needle checked loosely below
}


@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_bad_spec_files(tmp_path, name):
    text, needle = SPEC_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", str(path), "--out", str(out), "--no-progress"])
    assert_refused(result, "" if name == "not_a_mapping.yaml" else needle)
    assert str(path) in result.stderr or needle.split(":")[0] in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=0.1"], "optim.lrr: unknown key"),
    (["bogus.key=1"], "bogus: unknown key"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["optim.lr=０.０５"], "optim.lr: expected float"),          # fullwidth digits: float() reads them, we do not
    (["optim.momentum=٠.٩"], "optim.momentum: expected float"),  # Arabic-Indic
    (["train.epochs=1.5"], "train.epochs: expected int"),
    (["--pattern", "4:4"], "--pattern: N (weights kept) must be smaller than M"),
    (["--pattern", "5:4"], "--pattern: N (weights kept) must be smaller than M"),
    (["--pattern", "0:4"], "--pattern: N (weights kept per group) must be at least 1"),
    (["--pattern", "-1:4"], "--pattern"),
    (["sparsity.pattern=4:4"], "sparsity.pattern: N (weights kept) must be smaller than M"),
    (["sparsity.pattern=0:4"], "sparsity.pattern: N (weights kept per group) must be at least 1"),
    (["--method", "srste", "--pattern", "2:3", "sparsity.include=['3']"], "sparsity.include: layer 3"),
    (["model.name=resnet9000"], "model.name"),
    (["data.dataset=mnist9"], "data.dataset"),
    (["data.dataset=fashion_mnist", "data.root=/nonexistent"], "data.root"),
])
def test_bad_specs(tmp_path, args, needle):
    out = tmp_path / "run"
    assert_refused(quick_train(out, *args), needle)
    assert not out.exists()


@pytest.fixture(scope="module")
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


def test_truncated_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(finished_run)
    assert_refused(resume(finished_run), f"--resume: {ckpt} is not a readable PyTorch file", before,
                   snapshot(finished_run))


def test_garbage_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(1000))
    assert_refused(resume(finished_run), f"--resume: {ckpt} is not a readable PyTorch file")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_code_running_pickle_is_refused(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = finished_run / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)
    good["run"] = _RunsCode()
    torch.save(good, ckpt)
    assert_refused(resume(finished_run), "refused by weights-only loading")
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"                            # a plain pickle file too
    raw.write_bytes(pickle.dumps(_RunsCode()))
    os.replace(raw, ckpt)
    assert_refused(resume(finished_run), str(ckpt))
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_that_is_not_a_training_checkpoint(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    assert_refused(resume(finished_run), "is not an nmtrain training checkpoint (missing model")


def test_resume_without_a_checkpoint_or_a_run(finished_run, tmp_path):
    (finished_run / "checkpoint.pt").unlink()
    assert_refused(resume(finished_run), "there is no checkpoint to resume from")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(cli.invoke(app, ["train", "--resume", str(empty)]), "--resume: ")
    assert list(empty.iterdir()) == []
    assert_refused(cli.invoke(app, ["train", "--resume", str(tmp_path / "absent")]), "--resume: ")


def test_output_directory_holding_another_run(finished_run):
    before = snapshot(finished_run)
    assert_refused(quick_train(finished_run, "--method", "srste"), "already holds a run", before,
                   snapshot(finished_run))
    assert quick_train(finished_run, "train.max_steps=2", "--overwrite").exit_code == 0


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F
    real = F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":       # the training loss, not evaluation's sum
            calls["train"] += 1
            if calls["train"] == 7:                            # step 6 (0-based)
                return loss * float("nan")
        return loss
    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    result = quick_train(out, "train.checkpoint_interval=4")
    assert_refused(result, "training diverged at step 6: loss is nan")
    assert f"{out / 'checkpoint.pt'} (step 4)" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_huge_learning_rate_diverges_without_a_checkpoint_of_bad_weights(tmp_path):
    out = tmp_path / "run"
    result = quick_train(out, "optim.lr=1e30", "train.checkpoint_interval=1")
    assert_refused(result, "training diverged at step")
    assert "lower optim.lr" in result.stderr
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()


def test_weights_gone_non_finite_before_a_mask_recompute_read_as_divergence(tmp_path, monkeypatch):
    # The transposable solvers refuse NaN/Inf weights; when the update made them so, the run must stop
    # with the divergence message, not a solver's error.
    from nmtrain.experiments.methods import transposable
    real = transposable.Transposable._compute

    calls = []

    def poison_then_compute(self, solver):
        calls.append(solver)
        if len(calls) == 2:                   # the first mask, then the recompute before step 3: poison first
            next(iter(self.ctx.layers.values())).weight.data[0, 0] = float("inf")
        return real(self, solver)
    monkeypatch.setattr(transposable.Transposable, "_compute", poison_then_compute)
    out = tmp_path / "run"
    result = quick_train(out, "--method", "transposable", "method.params.mask_interval=3")
    assert_refused(result, "training diverged at step 2: the weights are not finite after the update")
    assert not (out / "model.pt").exists()


# == class 1: output paths =====================================================
# Only a regular file is ever replaced: a directory, FIFO, socket or device at an output path (or
# behind a symlink there), and a file where a directory is wanted, are refused before any work, by
# `io.check_output_file` / `io.check_output_dir`, the same checks `io.atomic_write` applies at write time.

def _make_fifo(path):
    os.mkfifo(path)


def _make_socket(path):
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _make_chardev(path):
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))      # a second /dev/null, in tmp_path


def _make_dir(path):
    path.mkdir()


def _make_link_to_fifo(path):
    os.mkfifo(path.with_name("fifo-behind"))
    path.symlink_to(path.with_name("fifo-behind"))


NOT_FILES = {"directory": (_make_dir, "is a directory"), "fifo": (_make_fifo, "is a FIFO"),
             "socket": (_make_socket, "is a socket"), "chardev": (_make_chardev, "is a character device"),
             "symlink-to-fifo": (_make_link_to_fifo, "is a FIFO")}


# Every command's every output file: (command line with {out} for the output path, the field named).
FILE_OUTPUTS = {
    "prune -o": (["prune", "{model}", "-o", "{out}", "--pattern", "2:4"], "--output"),
    "prune --report": (["prune", "{model}", "-o", "{tmp}/ok.pt", "--pattern", "2:4", "--report", "{out}"], "--report"),
    "convert --to compressed": (["convert", "{run}", "--to", "compressed", "--out", "{out}"], "--out"),
    "convert --to dense": (["convert", "{model}", "--to", "dense", "--out", "{out}"], "--out"),
    "convert --to semi-structured": (["convert", "{model}", "--to", "semi-structured", "--pattern", "2:4",
                                      "--out", "{out}"], "--out"),
}
# Every command's output directory; a run file inside it that is not a regular file counts too.
DIR_OUTPUTS = {
    "train --out": (["train", *QUICK, "--out", "{out}"], "--out"),
    "adaprune --out": (["adaprune", "{run}", "--pattern", "2:4", "--iters", "1", "--calib-samples", "8",
                        "--no-progress", "--out", "{out}"], "--out"),
    "compare --out": (["compare", *QUICK, "--methods", "dense", "--patterns", "2:4", "--out", "{out}"], "--out"),
}


def _args(template, trained, tmp_path, out):
    names = {"model": trained / "model.pt", "run": trained, "tmp": tmp_path, "out": out}
    return [a.format(**{k: str(v) for k, v in names.items()}) for a in template]


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("command", sorted(FILE_OUTPUTS))
def test_an_output_file_path_holding_anything_but_a_regular_file_is_refused(trained, tmp_path, command, kind):
    make, needle = NOT_FILES[kind]
    target = tmp_path / "target"
    make(target)
    template, field = FILE_OUTPUTS[command]
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, _args(template, trained, tmp_path, target))
    assert_refused(result, f"{field}: {target}", before, snapshot(tmp_path, trained))
    assert needle in result.stderr and "nmtrain writes only regular files" in result.stderr


@pytest.mark.parametrize("command", sorted(DIR_OUTPUTS))
def test_an_output_directory_path_holding_a_file_or_a_fifo_is_refused(trained, tmp_path, command):
    template, field = DIR_OUTPUTS[command]
    for make, needle in ((lambda p: p.write_text("mine"), "is a regular file, not a directory"),
                         (_make_fifo, "is a FIFO (named pipe), not a directory")):
        target = tmp_path / "target"
        make(target)
        before = snapshot(tmp_path, trained)
        result = cli.invoke(app, _args(template, trained, tmp_path, target))
        assert_refused(result, f"{field}: {target} {needle}", before, snapshot(tmp_path, trained))
        target.unlink()


@pytest.mark.parametrize("run_file", ["config.yaml", "model.pt", "summary.json"])
@pytest.mark.parametrize("command", ["train --out", "adaprune --out"])
def test_a_run_file_path_that_is_a_directory_or_a_fifo_is_refused_even_with_overwrite(trained, tmp_path, command,
                                                                                      run_file):
    template, _ = DIR_OUTPUTS[command]
    out = tmp_path / "run"
    out.mkdir()
    (out / run_file).mkdir()
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, [*_args(template, trained, tmp_path, out), "--overwrite"])
    assert_refused(result, f"--out: {out / run_file} is a directory", before, snapshot(tmp_path, trained))


def test_a_compare_grid_is_checked_whole_before_its_first_cell_trains(trained, tmp_path):
    out = tmp_path / "grid"
    out.mkdir()
    os.mkfifo(out / "compare.json")
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["compare", *QUICK, "--methods", "dense,srste", "--patterns", "2:4", "--out", str(out)])
    assert_refused(result, f"--out: {out / 'compare.json'} is a FIFO", before, snapshot(tmp_path))
    os.unlink(out / "compare.json")
    (out / "srste-2of4").mkdir()
    (out / "srste-2of4" / "checkpoint.pt").write_bytes(b"a run")     # the second cell's directory is taken
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["compare", *QUICK, "--methods", "dense,srste", "--patterns", "2:4", "--out", str(out)])
    assert_refused(result, "srste-2of4 already holds a run", before, snapshot(tmp_path))


def test_an_output_under_a_file_and_a_report_on_the_output_are_refused(trained, tmp_path):
    (tmp_path / "afile").write_text("mine")
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(tmp_path / "afile" / "x.pt"),
                              "--pattern", "2:4"])
    assert_refused(result, f"{tmp_path / 'afile'} is a regular file, not a directory", before,
                   snapshot(tmp_path, trained))
    result = cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(tmp_path / "x.pt"), "--pattern", "2:4",
                              "--report", str(tmp_path / "x.pt")])
    assert_refused(result, "--report: ", before, snapshot(tmp_path, trained))


def test_a_symlink_to_a_regular_file_is_written_through_like_open(trained, tmp_path):
    real = tmp_path / "real.pt"
    real.write_bytes(b"old")
    (tmp_path / "link.pt").symlink_to(real)
    result = cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(tmp_path / "link.pt"), "--pattern", "2:4"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "link.pt").is_symlink() and torch.load(real, weights_only=True)


# == class 2: permissions and the disk =============================================================
# `io.atomic_write` gives a written file the mode open() would and turns a failed write (a full disk,
# a read-only directory) into one line naming the path and the cause; the temp file, and directories the
# write created, go, and a file already at the path is untouched. `RunDir.writing` holds a new run's
# directory: a run that fails before its first checkpoint removes what it wrote.

def test_written_files_get_the_mode_open_would_give(trained, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "x.pt"
        assert cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(out), "--pattern", "2:4"]).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        os.chmod(out, 0o604)                                        # an existing file keeps its mode
        assert cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(out), "--pattern", "1:4"]).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o604
        run = tmp_path / "run"
        assert quick_train(run, "train.max_steps=2").exit_code == 0
        assert {stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()} == {0o640}
    finally:
        os.umask(old)


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs at tmp_path/fs (root and mount(8) needed; skipped otherwise)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(fs)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield fs
    subprocess.run(["umount", "-l", str(fs)], check=False)


def _fill(fs, leave=0):
    """Fill ``fs`` up to ``leave`` bytes short of full."""
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with open(fs / "filler", "wb", buffering=0) as fh:
        try:
            fh.write(b"\0" * max(free - leave, 0))
            while not leave:
                fh.write(b"\0" * 1024)
        except OSError:
            pass


def _remount_read_only(fs):
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)


@pytest.mark.parametrize("command", ["prune -o", "convert --to compressed", "convert --to dense"])
def test_a_full_disk_is_one_line_and_the_file_already_there_is_untouched(trained, tmp_path, small_fs, command):
    template, field = FILE_OUTPUTS[command]
    target = small_fs / "target"
    target.write_bytes(b"the previous output")
    _fill(small_fs)
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, _args(template, trained, tmp_path, target))
    assert_refused(result, f"{field}: cannot write {target}: no space left on device", before,
                   snapshot(tmp_path, trained))


@pytest.mark.parametrize("command", ["prune -o", "convert --to dense", "train --out", "adaprune --out"])
def test_a_read_only_directory_is_one_line_before_any_work(trained, tmp_path, small_fs, command):
    template, field = {**FILE_OUTPUTS, **DIR_OUTPUTS}[command]
    _remount_read_only(small_fs)
    target = small_fs / "sub" / "target"
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, _args(template, trained, tmp_path, target))
    assert_refused(result, f"{field}: {target}: cannot write in {small_fs} (read-only file system)", before,
                   snapshot(tmp_path, trained))


@pytest.mark.parametrize("leave", [0, 6 * 1024])
def test_train_on_a_full_disk_leaves_nothing_and_runs_again_once_there_is_room(tmp_path, small_fs, leave):
    # leave=0: config.yaml cannot be written; 6 KiB: config and metrics fit, the first checkpoint does not.
    out = small_fs / "runs" / "a"
    _fill(small_fs, leave)
    before = snapshot(small_fs)
    result = quick_train(out, "train.eval_interval=1", "train.checkpoint_interval=3")
    assert_refused(result, "no space left on device", before, snapshot(small_fs))
    (small_fs / "filler").unlink()
    result = quick_train(out, "train.max_steps=3")
    assert result.exit_code == 0, result.stderr


def test_a_failed_write_removes_its_temp_file_whatever_the_filesystem(trained, tmp_path, monkeypatch):
    # The same path without a real full disk: the rename fails as ENOSPC would.
    import errno
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", no_space)
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, ["prune", str(trained / "model.pt"), "-o", str(tmp_path / "new" / "out.pt"),
                              "--pattern", "2:4"])
    assert_refused(result, f"--output: cannot write {tmp_path / 'new' / 'out.pt'}: no space left on device",
                   before, snapshot(tmp_path, trained))


def test_a_run_killed_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: killed\n")          # what SIGKILL before a checkpoint leaves
    (out / "metrics.jsonl").write_text("{}\n")
    (out / ".checkpoint.pt.123.tmp").write_bytes(b"half")
    result = quick_train(out, "train.max_steps=2")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", "metrics.jsonl", "checkpoint.pt",
                                                            "model.pt", "summary.json"])


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    from nmtrain.experiments import runner as runner_module

    def boom(run):
        raise OSError(5, "Input/output error")      # anything at all, after config.yaml was written
    monkeypatch.setattr(runner_module, "_checkpoint", boom)
    out = tmp_path / "a" / "run"
    result = quick_train(out)
    assert result.exit_code != 0
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("run_file", ["metrics.jsonl", "model.pt", "summary.json"])
def test_resume_checks_the_run_files_it_will_rewrite(finished_run, run_file):
    (finished_run / run_file).unlink()
    os.mkfifo(finished_run / run_file)            # reading or replacing it would hang or break it
    before = snapshot(finished_run)
    result = resume(finished_run)
    assert_refused(result, f"--resume: {finished_run / run_file} is a FIFO", before, snapshot(finished_run))


def test_an_input_that_is_not_a_file_is_named_for_what_it_is(trained, tmp_path):
    os.mkfifo(tmp_path / "in.pt")
    result = cli.invoke(app, ["prune", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pt"), "--pattern", "2:4"])
    assert_refused(result, f"{tmp_path / 'in.pt'} is a FIFO (named pipe), not a file")


# == class 3: tampered compressed files (convert) ==
#
# `nmtrain convert FILE --to dense` reads a compressed N:M safetensors file whose header says how large
# each dense tensor is. Each case below builds a real compressed file from a tiny model, tampers with
# it, and expects one line naming the file and the violated constraint, exit 2, and nothing written.

LAYER = "fc.weight"                                         # 16 x 32 at 2:4: values and indices 16 x 16


@pytest.fixture(scope="module")
def compressed_bytes(tmp_path_factory):
    torch.manual_seed(0)
    fc, conv = torch.randn(16, 32), torch.randn(8, 8, 3, 3)
    state = {LAYER: fc * make_mask(fc, parse_pattern("2:4")), "fc.bias": torch.randn(16),
             "conv.weight": conv * make_mask(conv, parse_pattern("2:4"))}
    folder = tmp_path_factory.mktemp("compressed")
    torch.save(state, folder / "m.pt")
    result = cli.invoke(app, ["convert", str(folder / "m.pt"), "--to", "compressed", "--pattern", "2:4",
                              "--out", str(folder / "c.safetensors")])
    assert result.exit_code == 0, result.stderr
    return (folder / "c.safetensors").read_bytes()


def _split(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def meta(edit):
    """Rewrite the nmtrain metadata JSON in the safetensors header (8-byte length + JSON), data kept."""
    def tamper(path):
        header, body = _split(path.read_bytes())
        data = json.loads(header["__metadata__"]["nmtrain"])
        edit(data)
        header["__metadata__"]["nmtrain"] = json.dumps(data)
        path.write_bytes(_join(header, body))
    return tamper


def meta_text(text):
    """Replace the nmtrain metadata with raw text (not necessarily JSON)."""
    def tamper(path):
        header, body = _split(path.read_bytes())
        header["__metadata__"]["nmtrain"] = text
        path.write_bytes(_join(header, body))
    return tamper


def tensors(edit):
    """Re-save with safetensors' own writer after ``edit`` changed the stored tensors; metadata kept."""
    def tamper(path):
        with safe_open(str(path), framework="pt") as fh:
            metadata, stored = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        edit(stored)
        save_file(stored, str(path), metadata=metadata)
    return tamper


def raw(edit):
    """Change the file's bytes."""
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def handmade(entries, nmtrain=None):
    """Replace the file by one written byte by byte: ``entries`` name -> (dtype code, shape, data bytes)."""
    def tamper(path):
        header, body = {}, b""
        for name, (code, shape, data) in entries.items():
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        if nmtrain is not None:
            header["__metadata__"] = {"nmtrain": json.dumps(nmtrain)}
        path.write_bytes(_join(header, body))
    return tamper


# A few hundred bytes that ask for 80 GB: one 1 x 2 layer whose metadata says 100000 x 200000
TINY_80GB = handmade({"w::values": ("F32", [1, 2], bytes(8)), "w::indices": ("U8", [1, 2], bytes([0, 1]))},
                     {"format": "nmtrain-nm-compressed", "version": 1, "order": ["w"],
                      "layers": {"w": {"pattern": "2:4", "layout": "nhwc", "shape": [100000, 200000],
                                       "dtype": "float32"}}})


def layer(**fields):
    return meta(lambda m: m["layers"][LAYER].update(fields))


def stored(part, change):
    """Re-save with ``LAYER::part`` replaced by ``change(it)``."""
    name = f"{LAYER}::{part}"
    return tensors(lambda t: t.update({name: change(t[name])}))


def positions(first_group):
    return tensors(lambda t: t[LAYER + "::indices"][0, :2].copy_(torch.tensor(first_group)))


# case -> (tamper, the constraint the error must name)
TAMPERS = {
    # sizes the header implies, against what is stored and against caps
    "inflated shape, 80 GB":          (layer(shape=[160000, 131072]), "elements <= 2^33"),
    "tiny file asking for 80 GB":     (TINY_80GB, "elements <= 2^33"),
    "inflated shape, 17 GB":          (layer(shape=[65536, 65536]), "elements = values * M/N"),
    "shape not what values imply":    (layer(shape=[8, 64]), "values shape"),
    "indices shape":                  (stored("indices", lambda i: i.reshape(32, 8)), "indices shape"),
    "shape cannot hold 2:4":          (layer(shape=[16, 30]), "shape holds the pattern"),
    "3-D shape":                      (layer(shape=[16, 32, 1]), "shape holds the pattern"),
    "zero in shape":                  (layer(shape=[0, 32]), "shape is positive ints"),
    "nine dimensions":                (layer(shape=[1] * 9), "shape is positive ints"),
    "metadata dtype mismatch":        (layer(dtype="float16"), "values dtype = dtype"),
    "stored values dtype mismatch":   (stored("values", lambda v: v.half()), "values dtype = dtype"),
    "indices not uint8":              (stored("indices", lambda i: i.long()), "indices dtype uint8"),
    "unknown dtype":                  (layer(dtype="save"), "dtype is floating point"),
    # the canonical form the writer produces
    "duplicate position in a group":  (positions([1, 1]), "positions ascending in group"),
    "positions out of order":         (positions([3, 1]), "positions ascending in group"),
    "position >= M":                  (positions([0, 7]), "positions < M"),
    # pattern and layout
    "N = M":                          (layer(pattern="4:4"), "pattern is N:M, N < M"),
    "M > 256":                        (layer(pattern="2:512"), "M <= 256"),
    "other M, same shape":            (layer(pattern="2:8"), "elements = values * M/N"),
    "unknown layout":                 (layer(layout="nchw"), "known layout"),
    # format, version, names
    "unknown version":                (meta(lambda m: m.update(version=2)), "known version"),
    "unknown format":                 (meta(lambda m: m.update(format="other-format")), "known format"),
    "missing tensor":                 (tensors(lambda t: t.pop(LAYER + "::indices")), "every named tensor stored"),
    "unreferenced tensor":            (tensors(lambda t: t.update(extra=torch.zeros(2))), "every stored tensor named"),
    "extra key-order entry":          (meta(lambda m: m["order"].append("ghost.weight")), "every named tensor stored"),
    "name with a newline":            (meta(lambda m: m["order"].append("evil\nname")), "every named tensor stored"),
    "duplicate key-order entry":      (meta(lambda m: m["order"].append("fc.bias")), "key order without duplicates"),
    "layer not in key order":         (meta(lambda m: m["order"].remove(LAYER)), "every layer in the key order"),
    "reserved '::' in a name":        (meta(lambda m: m["order"].append(LAYER + "::values")), "no name holds '::'"),
    # JSON that is malformed or of the wrong types
    "version as a string":            (meta(lambda m: m.update(version="1")), "known version"),
    "version as true":                (meta(lambda m: m.update(version=True)), "known version"),
    "shape as strings":               (layer(shape=["16", "32"]), "shape is positive ints"),
    "pattern as a number":            (layer(pattern=2), "pattern is N:M, N < M"),
    "order as a string":              (meta(lambda m: m.update(order=LAYER)), "order is a list of names"),
    "layers as a list":               (meta(lambda m: m.update(layers=[])), "layers is an object"),
    "layer entry as a string":        (meta(lambda m: m["layers"].update({LAYER: "2:4"})),
                                       "entry has pattern, layout, shape, dtype"),
    "layer entry without dtype":      (meta(lambda m: m["layers"][LAYER].pop("dtype")),
                                       "entry has pattern, layout, shape, dtype"),
    "metadata not JSON":              (meta_text("{"), "metadata is a JSON object"),
    "metadata a JSON list":           (meta_text("[]"), "metadata is a JSON object"),
    "metadata nested past the stack": (meta_text("[" * 200000), "metadata is a JSON object"),
    "metadata of 17 MiB":             (meta_text(json.dumps({"note": "x" * (17 << 20)})), "metadata <= 16 MiB"),
    # the safetensors container
    "huge header length":             (raw(lambda d: (1 << 62).to_bytes(8, "little") + d[8:]),
                                       "header length <= 64 MiB"),
    "random bytes":                   (raw(lambda d: random.Random(0).randbytes(len(d))), "header length <= 64 MiB"),
    "empty file":                     (raw(lambda d: b""), "8-byte header length"),
    "truncated in the header":        (raw(lambda d: d[:100]), "header inside the file"),
    "truncated in the data":          (raw(lambda d: d[:-7]), "readable safetensors"),
    "dtype torch cannot read":        (handmade({"a": ("F6_E2M3", [4], bytes(3))}), "dtypes torch reads"),
    "header JSON damaged":            (raw(lambda d: d[:8] + b"!" + d[9:]), "readable safetensors"),
}


@pytest.mark.parametrize("case", TAMPERS)
def test_tampered_compressed_file_is_refused(tmp_path, compressed_bytes, case):
    tamper, constraint = TAMPERS[case]
    path = tmp_path / "c.safetensors"
    path.write_bytes(compressed_bytes)
    tamper(path)
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["convert", str(path), "--to", "dense"])      # default output: tmp_path/c.pt
    assert_refused(result, f"[constraint: {constraint}]", before, snapshot(tmp_path))
    assert result.stderr.startswith(f"error: SOURCE: {path}")


def test_the_untampered_file_converts(tmp_path, compressed_bytes):
    path = tmp_path / "c.safetensors"
    path.write_bytes(compressed_bytes)
    result = cli.invoke(app, ["convert", str(path), "--to", "dense"])
    assert result.exit_code == 0, result.stderr
    assert set(torch.load(tmp_path / "c.pt", weights_only=True)) == {LAYER, "fc.bias", "conv.weight"}


# == class 3: tampered run files ==
# The JSON files of a run directory are read back by one reader (io.read_json_file): a regular file, at
# most MAX_JSON_BYTES, UTF-8, the JSON shape nmtrain writes; anything else is one line naming the file.

TAMPERED_JSON = {"random bytes": os.urandom(200), "not json": b"garbage{\n", "a list": b"[1, 2]\n",
                 "deep": b"[" * 100000 + b"]" * 100000, "latin-1": "caf\xe9".encode("latin-1")}


@pytest.mark.parametrize("tamper", sorted(TAMPERED_JSON))
def test_a_tampered_summary_is_one_line_for_convert(finished_run, tmp_path, tamper):
    (finished_run / "summary.json").write_bytes(TAMPERED_JSON[tamper])
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["convert", str(finished_run), "--to", "compressed"])
    assert_refused(result, f"SOURCE: {finished_run / 'summary.json'} ", before, snapshot(tmp_path))


@pytest.mark.parametrize("tamper", sorted(TAMPERED_JSON))
def test_a_tampered_metrics_file_is_one_line_for_resume(finished_run, tamper):
    (finished_run / "metrics.jsonl").write_bytes(TAMPERED_JSON[tamper])
    before = snapshot(finished_run)
    result = resume(finished_run)
    assert_refused(result, f"--resume: {finished_run / 'metrics.jsonl'} ", before, snapshot(finished_run))


def test_an_oversized_run_file_is_refused_unread(finished_run, monkeypatch):
    from nmtrain.experiments import io as io_module
    monkeypatch.setattr(io_module, "MAX_JSON_BYTES", 16)
    result = resume(finished_run)
    assert_refused(result, "more than nmtrain writes there")


def test_a_gzip_bomb_in_a_dataset_file_is_refused_at_its_cap(tmp_path, monkeypatch):
    import gzip
    from nmtrain.data import idx
    from nmtrain.data.registry import DatasetError
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1 << 16)          # the real cap is 1 GiB: same code, less time
    with gzip.open(tmp_path / "bomb.gz", "wb") as fh:
        fh.write(b"\0" * (1 << 20))
    with pytest.raises(DatasetError, match="expands to more than"):
        idx.read_idx(tmp_path / "bomb.gz")


IMAGE_TAMPERS = {"random bytes": lambda png: os.urandom(300), "truncated": lambda png: png[: len(png) // 2],
                 "empty": lambda png: b""}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("tamper", sorted(IMAGE_TAMPERS))
def test_an_unreadable_image_in_an_imagefolder_is_one_line_naming_it(tmp_path, tamper, workers):
    # Read through one loader (data/imagefolder.py `load_image`); from a DataLoader worker, the CLI takes
    # the original line out of the worker's re-raised traceback (cli/errors.py `one_line`).
    root = write_imagefolder(tmp_path / "images", per_class=2, side=16)
    bad = root / "train" / "bee" / "1.png"
    bad.write_bytes(IMAGE_TAMPERS[tamper](bad.read_bytes()))
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["train", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                              "data.batch_size=2", f"data.num_workers={workers}", "model.name=lenet5",
                              "train.epochs=1", "--out", str(out), "--no-progress"])
    assert_refused(result, f"data.root: {bad} cannot be read as an image", before, snapshot(tmp_path))


# == class 4: bounded work (YAML) ==
# Every YAML nmtrain reads goes through one reader (experiments/spec.py `load_yaml`): a regular UTF-8 text
# file of bounded size, no key twice, and a bounded number of values and levels with aliases expanded.

COMPARE = ["compare", "data.dataset=synthetic", "data.batch_size=64", "model.name=mlp", "--methods", "dense,srste",
           "--patterns", "2:4", "--no-progress"]


def _laughs(levels=9, indent="    "):
    """A "billion laughs": level k lists level k-1 nine times, so the last level expands to 9**levels values."""
    lines = [f"{indent}a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"{indent}a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


def _refused(tmp_path, needle, *args, command="train"):
    """``nmtrain COMMAND`` (the quick synthetic run) with ``args`` is refused, and nothing under tmp_path changes."""
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    base = ["train", *QUICK] if command == "train" else COMPARE
    result = cli.invoke(app, [*base, "--out", str(out), *args])
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert not out.exists()


def _refused_spec(tmp_path, path, needle, command="train"):
    """``nmtrain COMMAND SPEC`` is refused, and nothing under tmp_path changes."""
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = cli.invoke(app, [command, str(path), "--out", str(out), "--no-progress"])
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_alias_bomb_under_sweep_params_is_refused_before_anything_is_written(tmp_path, command):
    spec = tmp_path / "bomb.yaml"
    spec.write_text("sweep:\n  methods: [dense]\n  patterns: ['2:4']\n  params:\n" + _laughs())
    _refused_spec(tmp_path, spec, f"SPEC: {spec}: more than {MAX_YAML_VALUES:,} values once its aliases", command)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_alias_bomb_in_an_override_is_refused(tmp_path, command):
    flow = "{" + _laughs(indent="").replace("\n", ", ").rstrip(", ") + "}"
    _refused(tmp_path, "values once its aliases (*name) are expanded", f"sweep.params={flow}", command=command)


@pytest.mark.parametrize("text", [
    "[" * (MAX_YAML_DEPTH + 5) + "]" * (MAX_YAML_DEPTH + 5),        # nested as written
    "{a: &a [*a]}",                                                 # an alias inside itself: endless
    "{" + ", ".join(f"a{k}: &a{k} [*a{k - 1}]" for k in range(1, 60)).replace("[*a0]", "[1]") + "}",  # by aliases
], ids=["written", "self-alias", "alias-chain"])
def test_nesting_is_bounded_also_through_aliases(tmp_path, text):
    _refused(tmp_path, f"nested more than {MAX_YAML_DEPTH} levels deep", f"sweep.params={text}")


def test_small_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("optim: &o {lr: 0.05, momentum: 0.8}\n"
                    "sweep:\n  params:\n    srste: &p {decay: 0.001}\n    'srste:b': *p\n"
                    "    'srste:c':\n      <<: *p\n      decay: 0.002\n")
    spec = load_spec(path)
    assert spec.optim.lr == 0.05 and spec.sweep.params["srste:b"] == {"decay": 0.001}
    assert spec.sweep.params["srste:c"] == {"decay": 0.002}      # a merged key may be overridden


@pytest.mark.parametrize("text,needle", [
    ("seed: 1\nname: x\nseed: 2\n", "key 'seed' appears twice (lines 1 and 3)"),
    ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "key 'optim.lr' appears twice (lines 2 and 4)"),
    ("sweep:\n  params:\n    srste: {decay: 0.1}\n    bimask: {}\n    srste: {}\n",
     "key 'sweep.params.srste' appears twice (lines 3 and 5)"),
])
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, needle):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(f"SPEC: {path}: {needle}")):
        read_yaml(path)
    _refused_spec(tmp_path, path, needle)


def test_duplicate_keys_in_an_override_value(tmp_path):
    _refused(tmp_path, "key 'decay' appears twice", "--method", "srste", "method.params={decay: 0.1, decay: 0.2}")


def test_duplicate_key_in_a_saved_config_refuses_the_resume(finished_run):
    config = finished_run / "config.yaml"
    config.write_text(config.read_text() + "seed: 7\n")
    before = snapshot(finished_run)
    result = resume(finished_run)
    assert_refused(result, f"--resume: {config}: key 'seed' appears twice", before, snapshot(finished_run))


def _binary(tmp_path, kind):
    path = tmp_path / f"{kind}.yaml"
    if kind == "bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "torch":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "latin1":
        path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    elif kind == "nul":
        path.write_bytes(b"name: x\x00y\n")
    return path


@pytest.mark.parametrize("kind", ["bytes", "torch", "latin1", "nul"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_binary_garbage_as_the_spec(tmp_path, kind, command):
    path = _binary(tmp_path, kind)
    _refused_spec(tmp_path, path, f"SPEC: {path} is not a text YAML file", command)


def test_a_directory_as_the_spec(tmp_path):
    folder = tmp_path / "spec.yaml"
    folder.mkdir()
    _refused_spec(tmp_path, folder, f"SPEC: {folder} is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_as_the_spec_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)          # opening it to read would block until a writer comes
    _refused_spec(tmp_path, fifo, f"SPEC: {fifo} is not a regular file")


def test_an_oversized_spec_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n" + "#" * MAX_YAML_BYTES + "\n")
    _refused_spec(tmp_path, path, f"SPEC: {path}: over {MAX_YAML_BYTES >> 10} KiB")


# == class 4: bounded work (diversity) ==
# Every input whose count would take unbounded time or memory is refused up front with the limit named
# (sparsity/diversity.py: MAX_BLOCK_WEIGHTS, MAX_COUNT_DIGITS, EXACT_MAX_M), or answered fast.

FAST_S = 1.0          # a refusal, or a bounded answer, in well under this


def _timed(args):
    start = time.perf_counter()
    result = cli.invoke(app, args)
    return result, time.perf_counter() - start


BLOCK_LIMIT = "--shape: at most 2**20 weights in a block (R x C ≤ 1048576), got "


@pytest.mark.parametrize("shape", ["100000x100000", "1024x1025", "10" + "0" * 29 + "x8", "9" * 5000 + "x8",
                                   "8x" + "1" * 400])
def test_diversity_refuses_a_huge_block_at_once(tmp_path, shape):
    before = snapshot(tmp_path)
    result, took = _timed(["diversity", "--shape", shape])
    assert_refused(result, BLOCK_LIMIT, before, snapshot(tmp_path))
    assert took < FAST_S and len(result.stderr) < 200          # a 5000-digit side is not echoed in full


@pytest.mark.parametrize("args,needle", [
    (["-p", "2:100000"], "--pattern: 2:100000: C=8 is not a multiple of M=100000"),
    (["-p", "1:2000000"], "--pattern: M (group size) must be at most 2**20 = 1048576"),
    (["-p", "9" * 5000 + ":4"], "N and M have at most 7 digits"),
    (["--density", "nan"], "--density: nan must be strictly between 0 and 1"),
    (["--density", "inf"], "--density: inf must be strictly between 0 and 1"),
    (["--density", "0"], "--density: 0.0 must be strictly between 0 and 1"),
    (["--shape", "0x8"], "--shape '0x8' is not of the form RxC"),
    (["--shape", "12x12", "--density", "0.3"], "--density: 0.3 x 144 weights is not a whole number"),
])
def test_diversity_refuses_fast_what_it_cannot_count(args, needle):
    result, took = _timed(["diversity", *args])
    assert_refused(result, needle)
    assert took < FAST_S


def test_leading_zeros_are_no_digits_of_the_value():
    # int() refuses a string of more than 4300 characters, zeros or not: they are stripped first
    result = cli.invoke(app, ["diversity", "-p", "2:" + "0" * 5000 + "4", "--shape", "0" * 5000 + "8x8", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["pattern"] == "2:4"


@pytest.mark.parametrize("args", [
    ["--shape", "1024x1024"],                                      # every family of the largest block
    ["--shape", "1x1048576"],                                      # 2**19 candidate group sizes
    ["--shape", "100x100", "-p", "50:100-T"],                      # A(100, 50): the estimate, in log-gamma
    ["--shape", "1024x1024", "-p", "512:1024-T", "-p", "unstructured"],
    ["--shape", "32x32", "-p", "16:32-T", "-p", "8:16-T"],        # M above EXACT_MAX_M: estimated, not counted
])
def test_diversity_answers_the_largest_allowed_cases_fast(args):
    result, took = _timed(["diversity", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert took < FAST_S and rows
    for row in rows:
        assert math.isfinite(row["log10"]) and row["log10"] > 0
        if row["count"] is not None:                                # a count is exact and within the cap
            assert row["exact"] and len(row["count"]) <= div.MAX_COUNT_DIGITS
        elif row["exact"]:                                          # over the cap: log10 only
            assert row["log10"] >= div.MAX_COUNT_DIGITS - 1


def test_diversity_counts_up_to_the_digit_cap_and_gives_log10_beyond():
    near = json.loads(cli.invoke(app, ["diversity", "--shape", "1x14280", "-p", "unstructured", "--json"]).stdout)
    assert near[0]["count"] == str(math.comb(14280, 7140)) and len(near[0]["count"]) == 4297
    over = json.loads(cli.invoke(app, ["diversity", "--shape", "1x16384", "-p", "unstructured", "--json"]).stdout)
    assert over[0]["count"] is None and over[0]["exact"]
    assert over[0]["log10"] == pytest.approx(math.log10(math.comb(16384, 8192)), rel=1e-12)
    table = cli.invoke(app, ["diversity", "--shape", "1x16384", "-p", "unstructured"])
    assert table.exit_code == 0 and "4,930 digits, not shown" in table.stdout
    assert "counts of more than 4300 digits are not computed" in table.stdout


@pytest.mark.parametrize("call", [
    lambda: div.rank(10 ** 30, 8, 0.5),
    lambda: div.rank(8, 8, float("nan")),
    lambda: div.pattern_diversity(10 ** 5000, 8, Pattern(2, 4)),
    lambda: div.unstructured_diversity(8, 10 ** 6, 0.5),
    lambda: div.families(1 << 21, 1, 0.5),
    lambda: div.transposable_count(32, 16),
])
def test_the_engine_enforces_the_same_limits(call):
    start = time.perf_counter()
    with pytest.raises(div.DiversityError) as caught:
        call()
    assert time.perf_counter() - start < FAST_S
    assert caught.value.field in ("shape", "density", "pattern") and "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200


def test_the_engine_answers_the_worst_allowed_cases_fast():
    start = time.perf_counter()
    assert div.transposable_log10_approx(1024, 512) > 0             # C(2**20, 2**19) in log-gamma
    assert len(div.families(1, 1 << 20, 0.5)) == 20                # M = 2, 4, ..., 2**20
    assert div.unstructured_diversity(1024, 1024, 0.5).count is None
    assert time.perf_counter() - start < FAST_S
    div.transposable_count.cache_clear()
    start = time.perf_counter()
    div.transposable_count(div.EXACT_MAX_M, div.EXACT_MAX_M // 2)   # the slowest exact count allowed
    assert time.perf_counter() - start < 3.0                        # 0.65-0.9 s measured on a busy 2-core machine


def test_the_enumerate_solver_refuses_a_large_tile_without_counting_it():
    from nmtrain.sparsity.solvers.enumerate import enumerate_solver

    start = time.perf_counter()
    with pytest.raises(ValueError, match="8:16-T has more than 5,000 tile masks"):
        enumerate_solver(torch.rand(1, 16, 16), 8)                  # A(16, 8) alone takes seconds
    assert time.perf_counter() - start < FAST_S


# == class 5: spec values ==
# Every number of a spec and of a method's parameters is checked against one table (spec.RULES) when the
# YAML data becomes a dataclass, before anything is built or written.

BAD_VALUES = [
    ("optim.lr=nan", "optim.lr: must be a finite number above 0"),
    ("optim.lr=.nan", "optim.lr: must be a finite number above 0"),
    ("optim.lr=inf", "optim.lr: "),
    ("optim.lr=.inf", "optim.lr: "),
    ("optim.lr=-.inf", "optim.lr: "),
    ("optim.lr=-0.1", "optim.lr: "),
    ("optim.lr=0", "optim.lr: must be a finite number above 0"),
    ("optim.momentum=1.0", "optim.momentum: must be a finite number in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum: "),
    ("optim.weight_decay=-1e-4", "optim.weight_decay: must be a finite number at least 0"),
    ("optim.weight_decay=.inf", "optim.weight_decay: "),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs: "),
    ("schedule.gamma=nan", "schedule.gamma: "),
    ("schedule.gamma=0", "schedule.gamma: "),
    ("schedule.milestones=[1, .inf]", "schedule.milestones: every value must be"),
    ("schedule.milestones=[-1]", "schedule.milestones: "),
    ("train.epochs=0", "train.epochs: must be at least 1"),
    ("train.max_steps=0", "train.max_steps: must be at least 1"),
    ("train.eval_interval=-1", "train.eval_interval: must be at least 0"),
    ("train.checkpoint_interval=-2", "train.checkpoint_interval: "),
    ("train.log_interval=0", "train.log_interval: "),
    ("data.batch_size=0", "data.batch_size: "),
    ("data.eval_batch_size=-1", "data.eval_batch_size: "),
    ("data.num_workers=-1", "data.num_workers: "),
    ("data.train_subset=0", "data.train_subset: "),
    ("data.test_subset=-5", "data.test_subset: "),
    ("data.holdout=0", "data.holdout: "),
    ("model.width=0", "model.width: "),
    ("model.width=nan", "model.width: "),
    ("seed=-1", "seed: must be in [0, 2**63)"),
    (f"seed={2 ** 64}", "seed: must be in [0, 2**63)"),
    (f"seed={2 ** 63}", "seed: "),
    ("sweep.seeds=[0, -1]", "sweep.seeds: every value must be in [0, 2**63)"),
    (f"sweep.seeds=[{2 ** 64}]", "sweep.seeds: "),
]

BAD_METHOD_PARAMS = [
    (["--method", "srste", "method.params.decay=nan"], "method.params.decay: "),
    (["--method", "srste", "method.params.decay=-1"], "method.params.decay: "),
    (["--method", "bimask", "method.params.iter=0"], "method.params.iter: must be at least 1"),
    (["--method", "bimask", "method.params.greedy_num=0"], "method.params.greedy_num: "),
    (["--method", "bimask", "method.params.seed=-1"], "method.params.seed: "),
    (["--method", "bame", "method.params.interval=0"], "method.params.interval: "),
    (["--method", "bame", "method.params.fraction=.inf"], "method.params.fraction: "),
    (["--method", "bame", "method.params.osc_decay=nan"], "method.params.osc_decay: "),
    (["--method", "bame", "method.params.freeze_threshold=0"], "method.params.freeze_threshold: "),
    (["--method", "transposable", "method.params.mask_interval=0"], "method.params.mask_interval: "),
    (["--method", "transposable", "method.params.decay=inf"], "method.params.decay: "),
    (["--method", "unstructured", "method.params.start=-0.1"], "method.params.start: "),
    (["--method", "unstructured", "method.params.interval=0"], "method.params.interval: "),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES)
def test_bad_values_are_refused_before_the_run_directory_exists(tmp_path, override, needle):
    _refused(tmp_path, needle, override)


@pytest.mark.parametrize("args,needle", BAD_METHOD_PARAMS)
def test_bad_method_parameters_are_refused_before_the_run_directory_exists(tmp_path, args, needle):
    _refused(tmp_path, needle, *args)


@pytest.mark.parametrize("args,needle", [
    (["optim.lr=nan"], "optim.lr: "),
    ([f"seed={2 ** 64}"], "seed: "),
    (["train.max_steps=0"], "train.max_steps: "),
    (["optim.momentum=1.0"], "optim.momentum: "),
    (["sweep.seeds=[-1]"], "sweep.seeds: "),
    (["sweep.params={srste: {decay: .nan}}"], "method.params.decay: "),
    (["--seeds", "0,-1"], "--seeds: must be in [0, 2**63)"),
    (["--seeds", str(2 ** 64)], "--seeds: "),
])
def test_bad_values_refused_by_compare(tmp_path, args, needle):
    _refused(tmp_path, needle, *args, command="compare")


def test_the_message_gives_the_rule_and_the_fix():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["optim.lr=nan"])
    assert str(err.value) == "optim.lr: must be a finite number above 0 (the step size), got nan; e.g. optim.lr=0.1"


def test_seeds_at_the_bounds_are_accepted():
    assert load_spec(None, [f"seed={2 ** 63 - 1}", "sweep.seeds=[0, 1]"]).seed == 2 ** 63 - 1


def test_a_spec_edited_in_code_is_checked_by_validate():
    from nmtrain.experiments.build import validate
    spec = Spec()
    spec.optim.lr = float("nan")
    with pytest.raises(SpecError, match="optim.lr: "):
        validate(spec)


def _numeric_fields(cls, where):
    """Dotted paths of every int or float field (or list or Optional of them) of a dataclass tree."""
    import dataclasses
    import typing
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        path = name if where == "" else f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            paths += _numeric_fields(tp, path)
            continue
        args = set(typing.get_args(tp)) | {tp}
        args |= {a for arg in list(args) for a in typing.get_args(arg)}
        if args & {int, float}:
            paths.append(path)
    return paths


def _fields_with_a_rule(cls, where):
    """Dotted paths of the fields of ``cls`` that carry their rule (``rules.param(default, rule)``)."""
    import dataclasses
    from nmtrain.experiments.rules import rule_of
    return [f"{where}.{f.name}" for f in dataclasses.fields(cls) if rule_of(f) is not None]


def test_every_numeric_field_has_a_rule():
    from nmtrain.experiments.methods import list_methods
    paths, ruled = _numeric_fields(Spec, ""), set(RULES)
    for cls in list_methods().values():
        paths += _numeric_fields(cls.Params, "method.params")
        ruled |= set(_fields_with_a_rule(cls.Params, "method.params"))
    assert sorted(set(paths) - ruled) == []
    assert sorted(set(RULES) - set(paths)) == []        # no rule for a field that is gone


@pytest.mark.parametrize("density", ["1e-300", "0.9999999999"])
def test_a_density_no_block_can_keep_is_named_as_the_density(density):
    assert_refused(cli.invoke(app, ["diversity", "--density", density]), "--density: ")


# == patterns: ASCII digits ==
# \d and int() take any Unicode decimal digit: '２:４' was 2:4. Numbers a user types are ASCII only.

UNICODE_PATTERNS = ["２:４",                 # fullwidth
                    "٢:٤",                  # Arabic-Indic
                    "۲:۴",                  # extended Arabic-Indic (Persian)
                    "²:⁴",                  # superscripts
                    "2:４",                 # one digit is enough
                    "2:4\u3000"]            # an ideographic space after it


@pytest.mark.parametrize("text", UNICODE_PATTERNS)
def test_parse_pattern_takes_ascii_digits_only(text):
    with pytest.raises(PatternError, match="ASCII digits"):
        parse_pattern(text)


def test_parse_pattern_bounds_the_digits_before_reading_them():
    with pytest.raises(PatternError, match="N and M have at most 7 digits") as caught:
        parse_pattern("1" * 5000 + ":4")        # int() would raise its own ValueError past 4300 digits
    assert len(str(caught.value)) < 200
    assert parse_pattern("0002:0004") == Pattern(2, 4)
    with pytest.raises(PatternError, match="at most 2\\*\\*20") as big:
        Pattern(1, 10 ** 5000)                   # the engine's own constructor, and a readable message
    assert "an integer of about 5001 digits" in str(big.value)


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.randn(8, 8)}, path)
    return path


@pytest.mark.parametrize("text", UNICODE_PATTERNS[:4])
@pytest.mark.parametrize("command", ["prune", "train", "train-override", "diversity", "compare"])
def test_every_command_refuses_unicode_digits_in_a_pattern(tmp_path, small_model, command, text):
    out = tmp_path / "out"
    args = {"prune": ["prune", str(small_model), "-o", str(out), "--pattern", text],
            "train": ["train", *QUICK, "--out", str(out), "--pattern", text],
            "train-override": ["train", *QUICK, "--out", str(out), f"sparsity.pattern={text}"],
            "diversity": ["diversity", "-p", text],
            "compare": ["compare", *QUICK, "--out", str(out), "--methods", "srste", "--patterns", f"2:4,{text}"]}
    before = snapshot(tmp_path)
    result = cli.invoke(app, args[command])
    assert_refused(result, "is not of the form N:M or N:M-T with ASCII digits", before, snapshot(tmp_path))
    assert {"train": "--pattern: ", "train-override": "sparsity.pattern: ",
            "diversity": "--pattern: ", "compare": "--patterns / sweep.patterns: "}.get(command, "") in result.stderr


@pytest.mark.parametrize("shape", ["８x８", "8x８", "٨x٨", "8x8\u3000"])
def test_diversity_shape_takes_ascii_digits_only(shape):
    assert_refused(cli.invoke(app, ["diversity", "--shape", shape]), "positive ASCII sizes")


@pytest.mark.parametrize("seeds", ["０,1", "1,٢", "1" * 19, "1" * 5000])
def test_compare_seeds_take_ascii_digits_only(tmp_path, seeds):
    out = tmp_path / "out"
    result = cli.invoke(app, ["compare", *QUICK, "--out", str(out), "--methods", "srste", "--patterns", "2:4",
                              "--seeds", seeds])
    assert_refused(result, "--seeds: give comma-separated integers of at most 18 ASCII digits")
    assert not out.exists() and len(result.stderr) < 300


def test_huge_pattern_digits_in_train_are_one_line(tmp_path):
    out = tmp_path / "run"
    for args in (["--pattern", "7" * 5000 + ":8"], ["sparsity.pattern=2:" + "4" * 5000]):
        result = quick_train(out, *args)
        assert_refused(result, "N and M have at most 7 digits")
        assert not out.exists() and len(result.stderr) < 300


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
