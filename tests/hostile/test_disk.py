"""Hostile input, class 2: permissions and the disk (modes, a full or read-only filesystem, killed runs)."""

import os
import shutil
import stat
import subprocess

import pytest

from nmtrain.cli.main import app

from helpers import assert_refused, cli, quick_train, resume, snapshot
from hostile_cases import DIR_OUTPUTS, FILE_OUTPUTS, output_args


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
    result = cli.invoke(app, output_args(template, trained, tmp_path, target))
    assert_refused(result, f"{field}: cannot write {target}: no space left on device", before,
                   snapshot(tmp_path, trained))


@pytest.mark.parametrize("command", ["prune -o", "convert --to dense", "train --out", "adaprune --out"])
def test_a_read_only_directory_is_one_line_before_any_work(trained, tmp_path, small_fs, command):
    template, field = {**FILE_OUTPUTS, **DIR_OUTPUTS}[command]
    _remount_read_only(small_fs)
    target = small_fs / "sub" / "target"
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, output_args(template, trained, tmp_path, target))
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
