"""Hostile input, class 1: output paths. Only a regular file is ever replaced, and a run directory
holding another run is not written over without ``--overwrite``."""

import os
import stat

import pytest
import torch

from nmtrain.cli.main import app

from helpers import QUICK, assert_refused, cli, quick_train, snapshot
from hostile_cases import DIR_OUTPUTS, FILE_OUTPUTS, output_args


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




@pytest.mark.parametrize("kind", sorted(NOT_FILES))
@pytest.mark.parametrize("command", sorted(FILE_OUTPUTS))
def test_an_output_file_path_holding_anything_but_a_regular_file_is_refused(trained, tmp_path, command, kind):
    make, needle = NOT_FILES[kind]
    target = tmp_path / "target"
    make(target)
    template, field = FILE_OUTPUTS[command]
    before = snapshot(tmp_path, trained)
    result = cli.invoke(app, output_args(template, trained, tmp_path, target))
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
        result = cli.invoke(app, output_args(template, trained, tmp_path, target))
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
    result = cli.invoke(app, [*output_args(template, trained, tmp_path, out), "--overwrite"])
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


# A directory holding another run is written over only with --overwrite (`RunDir.check_target`).

def test_output_directory_holding_another_run(finished_run):
    before = snapshot(finished_run)
    assert_refused(quick_train(finished_run, "--method", "srste"), "already holds a run", before,
                   snapshot(finished_run))
    assert quick_train(finished_run, "train.max_steps=2", "--overwrite").exit_code == 0
