"""Hostile input to `nmtrain train`: one line on stderr naming the field or file, exit code 2, no partial output."""

import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from nmtrain.cli.main import app

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


# == class 4: bounded work (diversity) ==
# Every input whose count would take unbounded time or memory is refused up front with the limit named
# (sparsity/diversity.py: MAX_BLOCK_WEIGHTS, MAX_COUNT_DIGITS, EXACT_MAX_M), or answered fast.

import json                                                          # noqa: E402
import math                                                          # noqa: E402
import subprocess                                                    # noqa: E402
import sys                                                           # noqa: E402
import time                                                          # noqa: E402

from helpers import assert_refused, snapshot                         # noqa: E402

from nmtrain.sparsity import Pattern, PatternError, parse_pattern    # noqa: E402
from nmtrain.sparsity import diversity as div                        # noqa: E402

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
            "diversity": "--pattern: "}.get(command, "") in result.stderr


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
        result = cli.invoke(app, ["train", *QUICK, "--out", str(out), *args])
        assert_refused(result, "N and M have at most 7 digits")
        assert not out.exists() and len(result.stderr) < 300


# == class 6: launcher ==
# `train --nproc N` checks in the parent what the N processes would refuse, before torchrun starts:
# a refusal is one line and exit 2, with subprocess.call never reached and nothing written.

import logging                                                       # noqa: E402

from nmtrain.cli import torchrun as torchrun_module                   # noqa: E402
from nmtrain.cli import train as cli_train                            # noqa: E402


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
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), *args])
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert no_launch == [] and not out.exists()


def test_launcher_refuses_more_processes_than_the_machine_has(tmp_path, no_launch, monkeypatch):
    monkeypatch.setattr(cli_train, "_cores", lambda: 2)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "--nproc", "4"])
    assert_refused(result, "--nproc: at most one process per CPU core on the CPU; this process may use 2 cores, got 4")
    monkeypatch.setattr(cli_train, "_gpus", lambda: 1)
    monkeypatch.setattr("nmtrain.experiments.build.resolve_device", lambda name: torch.device("cuda"))
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "--nproc", "2"])
    assert_refused(result, "--nproc: 2 processes need 2 GPUs (one each); this machine has 1")
    assert no_launch == [] and not out.exists()


def test_launcher_checks_the_run_directory_first(tmp_path, no_launch):
    held = tmp_path / "held"
    held.mkdir()
    (held / "summary.json").write_text("{}")
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["train", *QUICK, "--out", str(held), "--nproc", "2"])
    assert_refused(result, "already holds a run", before, snapshot(tmp_path))
    result = cli.invoke(app, ["train", "--resume", str(tmp_path / "absent"), "--nproc", "2"])
    assert_refused(result, "--resume: ", before, snapshot(tmp_path))
    assert no_launch == []


def test_launcher_reads_the_checkpoint_to_resume_before_launching(finished_run, no_launch):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = snapshot(finished_run)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--nproc", "2", "--no-progress"])
    assert_refused(result, "is not a readable PyTorch file", before, snapshot(finished_run))
    assert no_launch == []


@pytest.mark.parametrize("child_code", [0, 2, 130])
def test_launcher_runs_torchrun_on_good_input_and_passes_its_code_on(tmp_path, monkeypatch, child_code):
    launched = []
    monkeypatch.setattr(cli_train.subprocess, "call", lambda cmd: launched.append(cmd) or child_code)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "--nproc", "2"])
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
