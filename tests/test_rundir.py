"""experiments/rundir.py owns the run directory: its rules, the checkpoint's keys, and the file names."""

import ast
import re

import pytest
import torch

from nmtrain.experiments.io import CheckpointError, OutputError
from nmtrain.experiments.rundir import RUN_FILES, Checkpoint, Counters, RunDir, RunError, Summary, load_checkpoint

from helpers import ROOT, python_files


def test_empty_or_missing_directory_is_a_target(tmp_path):
    RunDir(tmp_path / "new").check_target(overwrite=False)
    RunDir(tmp_path).check_target(overwrite=False)
    (tmp_path / "notes.txt").write_text("not a run file")
    RunDir(tmp_path).check_target(overwrite=False)


def test_occupied_directory_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoint.pt").write_text("")
    with pytest.raises(RunError, match=r"already holds a run \(metrics.jsonl, checkpoint.pt\); choose another --out or pass "
                                       r"--overwrite"):
        RunDir(tmp_path).check_target(overwrite=False)
    RunDir(tmp_path).check_target(overwrite=True)
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(OutputError, match="is a regular file|not a directory"):
        RunDir(file).check_target(overwrite=False)


def test_overwrite_removes_the_run_files_and_nothing_else(tmp_path):
    for name in RUN_FILES:
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with RunDir(tmp_path).writing():
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ZeroDivisionError):
        with RunDir(out).writing() as rd:
            rd.write_config("name: x\n")
            rd.write_metrics([{}])
            1 / 0
    assert list(tmp_path.iterdir()) == []                     # the directories it created went too
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ZeroDivisionError):
        with RunDir(out).writing() as rd:
            rd.save_checkpoint(_full_checkpoint())
            1 / 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "notes.txt"]    # resumable: kept


def test_a_directory_being_written_is_refused_to_a_second_writer(tmp_path):
    with RunDir(tmp_path).writing() as rd:
        rd.write_config("name: x\n")
        with pytest.raises(RunError, match="is in use by another nmtrain process"):
            RunDir(tmp_path).check_target(overwrite=True)
        with pytest.raises(RunError, match="is in use by another nmtrain process"):
            with RunDir(tmp_path).holding():
                pass
    RunDir(tmp_path).check_target(overwrite=False)   # config.yaml alone: a run killed before its checkpoint


def test_resume_and_overwrite_together_are_refused_and_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(RunError, match="--resume and --overwrite: choose one"):
        RunDir(tmp_path).check_target(overwrite=True, resume=True)
    (tmp_path / "config.yaml").write_text("name: x\n")
    RunDir(tmp_path).check_target(overwrite=False, resume=True)       # an occupied directory is the point
    with pytest.raises(CheckpointError, match="there is no checkpoint to resume from"):
        RunDir(tmp_path).load_checkpoint()


def _full_checkpoint() -> Checkpoint:
    return Checkpoint(model={"w": torch.arange(4.0)}, optimizer={"state": {}, "param_groups": []},
                      scheduler={"last_epoch": 3}, method={"masks": {"fc": torch.ones(2, 2, dtype=torch.bool)}},
                      step=3, epoch=1, run={"best": 50.0, "metrics_lines": 1},
                      rng={"torch": torch.get_rng_state(), "python": [1, 2], "python_gauss": None, "cuda": []})


def test_checkpoint_round_trip_keeps_every_key(tmp_path):
    ckpt = _full_checkpoint()
    rd = RunDir(tmp_path)
    rd.save_checkpoint(ckpt)
    raw = torch.load(rd.checkpoint, weights_only=True)
    assert list(raw) == ["model", "optimizer", "scheduler", "method", "step", "epoch", "run", "rng"]
    back = rd.load_checkpoint()
    assert (back.step, back.epoch, back.run, back.scheduler) == (3, 1, {"best": 50.0, "metrics_lines": 1},
                                                                 {"last_epoch": 3})
    assert back.optimizer == ckpt.optimizer and torch.equal(back.model["w"], ckpt.model["w"])
    assert torch.equal(back.method["masks"]["fc"], ckpt.method["masks"]["fc"])
    assert torch.equal(back.rng["torch"], ckpt.rng["torch"]) and back.rng["python"] == [1, 2]
    assert not list(tmp_path.glob(".*.tmp"))                  # written atomically


def test_a_checkpoint_written_by_the_old_code_loads(tmp_path):
    # What the runner saved before rundir.py existed: a plain dict with these literal keys.
    old = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "method": {}, "step": 7, "epoch": 1,
           "run": {"best": 12.5}, "rng": {"torch": torch.get_rng_state(), "python": [0], "python_gauss": None,
                                          "cuda": []}}
    torch.save(old, tmp_path / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt.step == 7 and ckpt.epoch == 1 and ckpt.run == {"best": 12.5} and torch.equal(ckpt.model["w"],
                                                                                            torch.ones(2))
    del old["run"], old["epoch"]          # the oldest checkpoints carry no counters
    torch.save(old, tmp_path / "checkpoint.pt")
    assert RunDir(tmp_path).load_checkpoint().run == {}
    del old["rng"]
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"not an nmtrain training checkpoint \(missing rng\)"):
        RunDir(tmp_path).load_checkpoint()


def test_summary_and_finished(tmp_path):
    rd = RunDir(tmp_path)
    assert not rd.is_finished()
    rd.write_config("name: x\n")
    rd.write_summary({"final_accuracy": 1.0})
    assert rd.is_finished() and rd.read_summary() == {"final_accuracy": 1.0}
    assert rd.summary.read_text().endswith("}\n")


_RUN_FILE = re.compile(r"(config\.yaml|metrics\.jsonl|checkpoint\.pt|model\.pt|summary\.json)")


def _code_strings(tree: ast.AST):
    """String literals that are code: not docstrings, not a CLI option's ``help=`` text (both documentation)."""
    docs, helps = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            helps.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs | helps:
            yield node


def test_no_module_but_rundir_names_a_run_file():
    offenders = []
    for path in python_files("experiments", "cli", "benchmarks"):
        if path.name == "rundir.py":
            continue
        for node in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            if _RUN_FILE.search(node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "run file names belong to experiments/rundir.py:\n" + "\n".join(offenders)


def test_no_module_imports_the_runners_helpers():
    for path in python_files("experiments", "cli"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("runner"):
                names = {a.name for a in node.names}
                assert names <= {"train", "Interrupted", "RunResult", "summary_table"}, (path, names)


def test_counters_are_saved_under_the_keys_the_runner_always_wrote(tmp_path):
    counters = Counters(best=50.0, running_loss=1.5, running_n=3, wall=2.0, metrics_lines=1,
                        flops={"forward": 4}, last_masks={"fc": torch.ones(2, dtype=torch.bool)})
    saved = counters.to_dict()
    assert list(saved) == ["best", "running_loss", "running_n", "wall", "metrics_lines", "flops", "last_masks"]
    rd = RunDir(tmp_path)
    rd.save_checkpoint(Checkpoint(model={}, optimizer={}, scheduler={}, method={}, step=3, run=saved))
    back = rd.load_checkpoint().counters()
    assert (back.best, back.running_loss, back.running_n, back.wall, back.metrics_lines, back.flops) == \
        (50.0, 1.5, 3, 2.0, 1, {"forward": 4})
    assert torch.equal(back.last_masks["fc"], counters.last_masks["fc"])


def test_counters_an_old_checkpoint_lacks_read_as_the_defaults():
    assert Counters.from_dict({}) == Counters()
    assert Counters.from_dict({"best": 12.5}) == Counters(best=12.5)
    assert Counters().metrics_lines is None and Counters().last_masks is None   # the runner starts them afresh
    for bad in ({"best": "high"}, {"running_n": None}, {"flops": [1]}, {"last_masks": 3}, ["best"]):
        with pytest.raises((ValueError, TypeError, AttributeError)):
            Counters.from_dict(bad)


def test_a_summary_has_its_keys_in_order_then_the_methods_then_processes():
    summary = Summary(name="r", method="bimask", method_params={}, pattern="2:4", density=0.5, model="mlp",
                      dataset="synthetic", seed=0, device="cpu", builder={},
                      results={"final_accuracy": 1.0, "best_accuracy": 2.0, "final_test_loss": 0.5}, eval_split="test", epochs=1.0, steps=4, wall_seconds=0.1,
                      sparse_layers={}, skipped_layers={}, train_flops={}, accel={},
                      method_fields={"backward_survival": 0.5})
    keys = ["name", "method", "method_params", "pattern", "density", "model", "dataset", "seed", "device", "builder",
            "final_accuracy", "best_accuracy", "final_test_loss", "eval_split", "epochs", "steps", "wall_seconds",
            "sparse_layers", "skipped_layers", "train_flops", "accel"]
    assert list(summary.to_dict()) == keys + ["backward_survival"]
    summary.processes = 2
    assert list(summary.to_dict()) == keys + ["backward_survival", "processes"]
