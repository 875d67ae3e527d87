"""Hostile input to `nmtrain train`: one line on stderr naming the field or file, exit code 2, no partial output."""

import os
import pickle
import stat

import pytest
import torch
from typer.testing import CliRunner

from nmtrain.cli.main import app

from helpers import assert_refused, snapshot

cli = CliRunner()
QUICK = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=mlp",
         "train.epochs=2", "optim.lr=0.05", "schedule.warmup_epochs=0", "--no-progress"]


def _one_line_exit_2(result, needle):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


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
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    if name != "not_a_mapping.yaml":
        assert needle in result.stderr
    assert str(path) in result.stderr or needle.split(":")[0] in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=0.1"], "optim.lrr: unknown key"),
    (["bogus.key=1"], "bogus: unknown key"),
    (["optim.lr=fast"], "optim.lr: expected float"),
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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), *args])
    _one_line_exit_2(result, needle)
    assert not out.exists()


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.max_steps=4"])
    assert result.exit_code == 0, result.stderr
    return out


def test_truncated_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = _snapshot(finished_run)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, f"--resume: {ckpt} is not a readable PyTorch file")
    assert _snapshot(finished_run) == before


def test_garbage_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(1000))
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, f"--resume: {ckpt} is not a readable PyTorch file")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_code_running_pickle_is_refused(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = finished_run / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)
    good["run"] = _RunsCode()
    torch.save(good, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "refused by weights-only loading")
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"                            # a plain pickle file too
    raw.write_bytes(pickle.dumps(_RunsCode()))
    os.replace(raw, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and str(ckpt) in result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_that_is_not_a_training_checkpoint(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "is not an nmtrain training checkpoint (missing model")


def test_resume_without_a_checkpoint_or_a_run(finished_run, tmp_path):
    (finished_run / "checkpoint.pt").unlink()
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "there is no checkpoint to resume from")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(cli.invoke(app, ["train", "--resume", str(empty)]), "--resume: ")
    assert list(empty.iterdir()) == []
    _one_line_exit_2(cli.invoke(app, ["train", "--resume", str(tmp_path / "absent")]), "--resume: ")


def test_output_directory_holding_another_run(finished_run):
    before = _snapshot(finished_run)
    result = cli.invoke(app, ["train", *QUICK, "--out", str(finished_run), "--method", "srste"])
    _one_line_exit_2(result, "already holds a run")
    assert _snapshot(finished_run) == before
    assert cli.invoke(app, ["train", *QUICK, "--out", str(finished_run), "train.max_steps=2",
                            "--overwrite"]).exit_code == 0


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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.checkpoint_interval=4"])
    _one_line_exit_2(result, "training diverged at step 6: loss is nan")
    assert f"{out / 'checkpoint.pt'} (step 4)" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_huge_learning_rate_diverges_without_a_checkpoint_of_bad_weights(tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "optim.lr=1e30", "train.checkpoint_interval=1"])
    _one_line_exit_2(result, "training diverged at step")
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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "--method", "transposable",
                              "method.params.mask_interval=3"])
    _one_line_exit_2(result, "training diverged at step 2: the weights are not finite after the update")
    assert not (out / "model.pt").exists()


# == class 1: output paths ==========================================================================
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (its model.pt is the input of prune, convert and adaprune)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.max_steps=4"])
    assert result.exit_code == 0, result.stderr
    return out


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
        assert cli.invoke(app, ["train", *QUICK, "--out", str(run), "train.max_steps=2"]).exit_code == 0
        assert {stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()} == {0o640}
    finally:
        os.umask(old)


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs at tmp_path/fs (root and mount(8) needed; skipped otherwise)."""
    import shutil
    import subprocess
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
    import subprocess
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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.eval_interval=1",
                              "train.checkpoint_interval=3"])
    assert_refused(result, "no space left on device", before, snapshot(small_fs))
    (small_fs / "filler").unlink()
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.max_steps=3"])
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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.max_steps=2"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", "metrics.jsonl", "checkpoint.pt",
                                                            "model.pt", "summary.json"])


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    from nmtrain.experiments import runner as runner_module

    def boom(run):
        raise OSError(5, "Input/output error")      # anything at all, after config.yaml was written
    monkeypatch.setattr(runner_module, "_checkpoint", boom)
    out = tmp_path / "a" / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out)])
    assert result.exit_code != 0
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("run_file", ["metrics.jsonl", "model.pt", "summary.json"])
def test_resume_checks_the_run_files_it_will_rewrite(finished_run, run_file):
    (finished_run / run_file).unlink()
    os.mkfifo(finished_run / run_file)            # reading or replacing it would hang or break it
    before = snapshot(finished_run)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    assert_refused(result, f"--resume: {finished_run / run_file} is a FIFO", before, snapshot(finished_run))


def test_an_input_that_is_not_a_file_is_named_for_what_it_is(trained, tmp_path):
    os.mkfifo(tmp_path / "in.pt")
    result = cli.invoke(app, ["prune", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pt"), "--pattern", "2:4"])
    assert_refused(result, f"{tmp_path / 'in.pt'} is a FIFO (named pipe), not a file")
