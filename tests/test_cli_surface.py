"""The CLI as a user reads it: help at 80 and 120 columns, one line per compare cell, run directory
names, the compile note of the mask solvers, and the exact digits of mask diversity."""

import math
import time

import pytest
import torch
import typer
from typer.testing import CliRunner

from nmtrain.cli import prune as cli_prune
from nmtrain.cli.help import reflow
from nmtrain.cli.main import app
from nmtrain.experiments.adaprune import default_out
from nmtrain.experiments.compare import grid
from nmtrain.experiments.spec import Spec, from_dict
from nmtrain.sparsity import Pattern, prune_state_dict, solvers

runner = CliRunner()
COMMANDS = ["", "prune", "diversity", "train", "compare", "adaprune", "convert"]
SYNTHETIC = ["data.dataset=synthetic", "model.name=mlp", "train.epochs=1", "data.batch_size=64", "--no-progress"]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_cleanly(command, width):
    result = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) == width           # laid out for this terminal width
    assert "<bool>" not in result.stdout                         # flags are shown as flags
    assert "[[" not in result.stdout and "…" not in result.stdout  # no doubled brackets, nothing cut off
    usage = next(line for line in lines if "Usage:" in line)
    if command in ("train", "compare"):
        assert f"nmtrain {command} [OPTIONS] [SPEC.yaml] [KEY.SUB=VALUE]..." in usage


def test_command_help_is_prose_that_the_terminal_wraps():
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert "\n" not in command.help.replace("\n\n", ""), name    # only paragraph breaks survive
    assert reflow("one\n  two\n\nthree\nfour") == "one two\n\nthree four"


def test_train_and_compare_still_take_overrides_without_a_spec(tmp_path):
    result = runner.invoke(app, ["train", *SYNTHETIC, "optim.lr=0.05", "--out", str(tmp_path / "t")])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "nmtrain train ·" in result.stdout                    # train shows its summary table
    bad = runner.invoke(app, ["train", *SYNTHETIC, "spec.yaml", "--out", str(tmp_path / "u")])
    assert bad.exit_code == 2 and "key.sub=value" in bad.stderr  # a second bare word is no override


def test_compare_prints_one_line_per_finished_cell_and_one_table(tmp_path):
    result = runner.invoke(app, ["compare", *SYNTHETIC, "--methods", "dense,srste", "--patterns", "2:4",
                                 "--seeds", "0,1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr + result.stdout
    cells = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in cells] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert cells[2].startswith("[3/4] srste 2:4 (density 0.50) seed 0: final acc ")
    assert " wall " in cells[2] and cells[2].endswith(str(tmp_path / "srste-2of4" / "seed0"))
    assert result.stdout.count("┏") == 1 and "nmtrain train ·" not in result.stdout


def test_run_directories_name_patterns_one_way(tmp_path):
    assert Pattern(2, 4).slug == "2of4" and Pattern(4, 8, transposable=True).slug == "4of8T"
    assert default_out(tmp_path / "run", Pattern(2, 4)) == tmp_path / "run-adaprune-2of4"
    assert default_out(tmp_path / "model.pt", Pattern(4, 8, True)) == tmp_path / "model-adaprune-4of8T"
    spec = from_dict(Spec, {"data": {"dataset": "synthetic"}, "model": {"name": "mlp"}, "out": str(tmp_path)})
    outs = [c.spec.out for c in grid(spec, ["srste", "transposable"], ["2:4", "4:8-T"], None)]
    assert outs == [str(tmp_path / "srste-2of4"), str(tmp_path / "transposable-2of4"),
                    str(tmp_path / "transposable-4of8T")]


def _slow_first_call(fn, seconds):
    calls = []

    def solve(scores, n):
        if not calls:
            time.sleep(seconds)       # one-time work, as numba compiling on first use
        calls.append(1)
        return fn(scores, n)
    return solve


def test_a_layers_time_excludes_the_solvers_one_time_work(monkeypatch):
    info = solvers.get_solver("approx")
    monkeypatch.setitem(solvers.registry._SOLVERS, "approx", solvers.SolverInfo("approx", _slow_first_call(info.fn, 0.5),
                                                                      info.exact, info.summary))
    state = {"a.weight": torch.randn(16, 16), "b.weight": torch.randn(8, 16)}
    _, reports, _ = prune_state_dict(state, Pattern(2, 4, transposable=True), solver="approx",
                                   keep_first_dense=False, keep_last_dense=False)
    assert len(reports) == 2 and max(r.seconds for r in reports) < 0.3


def test_prune_says_that_the_solvers_compile(tmp_path, monkeypatch):
    real = solvers.warm_up

    def compiling(*args):             # the solver's first use, slowed down to look like a compile
        real(*args)
        time.sleep(0.4)
        return 0.4

    monkeypatch.setattr(cli_prune, "_COMPILING_AFTER_S", 0.1)
    monkeypatch.setattr(solvers, "warm_up", compiling)
    torch.save({"fc.weight": torch.randn(16, 16)}, tmp_path / "m.pt")
    lone = ["--prune-first", "--prune-last"]      # a lone weight is both first and last layer
    result = runner.invoke(app, ["prune", str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.pt"), "-p", "2:4-T", *lone])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert result.stderr.startswith("compiling the mask solvers (first use")
    assert "the mask solvers compiled in 0.4 s (first use; not in the layers' times)" in result.stdout
    quick = runner.invoke(app, ["prune", str(tmp_path / "m.pt"), "-o", str(tmp_path / "p.pt"), "-p", "2:4", *lone])
    assert quick.exit_code == 0 and quick.stderr == "" and "compiled" not in quick.stdout


def test_the_exact_count_column_shows_every_digit():
    result = runner.invoke(app, ["diversity", "--shape", "32x32", "--density", "0.5", "--pattern", "unstructured"])
    assert result.exit_code == 0
    rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    digits = "".join(cells[5].strip() for cells in rows)        # the MD column, folded over several lines
    assert digits == str(math.comb(1024, 512)) and len(digits) == 307
