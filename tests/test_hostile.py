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
