"""`nmtrain train --nproc 2`: two CPU processes (gloo, torchrun on loopback) against one process.

The same spec with the same global batch must give the same masks (exported model.pt sparsity
patterns) and, up to float summation order, the same losses. The train subset (500 of 512) makes
the epoch's last batch 52 samples, split 26/26, so the uneven-batch path is exercised as well.
"""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.cli.train import torchrun_command
from nmtrain.data.loaders import EpochSampler, build_loaders, set_epoch
from nmtrain.data.registry import DatasetError

runner = CliRunner()
SPEC = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "data.train_subset=500",
        "model.name=mlp", "train.epochs=3", "optim.lr=0.05", "schedule.warmup_epochs=0"]
METHOD_PARAMS = {"srste": [], "bimask": ["method.params.iter=5"],
                 "bame": ["method.params.interval=3", "method.params.fraction=0.5"]}
LOSS_TOL = 1e-4          # absolute, on the last train loss and the final test loss


def _masks(out):
    state = torch.load(out / "model.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    return {k: state[k] != 0 for k in summary["sparse_layers"]}, summary


@pytest.mark.slow
@pytest.mark.parametrize("method", ["srste", "bimask", "bame"])
def test_two_processes_match_one(tmp_path, method):
    args = [*SPEC, *METHOD_PARAMS[method]]
    one = tmp_path / "one"
    result = runner.invoke(app, ["train", *args, "--method", method, "--pattern", "2:4", "--out", str(one),
                                 "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    two = tmp_path / "two"
    cmd = torchrun_command(2, args, method, "2:4", two, False, None, False)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert proc.stdout.count("run directory:") == 1          # rank 0 alone prints

    masks1, s1 = _masks(one)
    masks2, s2 = _masks(two)
    assert s2["processes"] == 2 and s2["steps"] == s1["steps"] == 24
    assert masks1.keys() == masks2.keys() and masks1
    for name in masks1:
        assert torch.equal(masks1[name], masks2[name]), f"{name}: masks differ"
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    assert abs(m1[-1]["loss"] - m2[-1]["loss"]) < LOSS_TOL
    assert abs(s1["final_test_loss"] - s2["final_test_loss"]) < LOSS_TOL
    ck = torch.load(two / "checkpoint.pt", weights_only=True)
    if "updates" in ck["method"]:          # a method that adapts its masks (BAME) did so under DDP
        assert ck["method"]["updates"] > 0


def test_the_run_objects_in_reference_cycles_are_freed_before_the_group_is_destroyed(monkeypatch):
    """A run's DistributedDataParallel wrapper (its reducer holds the group) sits in reference cycles; found
    alive at destroy_process_group in a 2-process run, it died at the interpreter's exit, where gloo's threads
    can abort the process (exit 134). `process_group` frees such objects before it destroys the group."""
    import gc
    from torch import distributed as dist
    from nmtrain.experiments.distributed import process_group

    events = []

    class InACycle:
        def __init__(self):
            self.me = self

        def __del__(self):
            events.append("freed")

    monkeypatch.setattr(dist, "init_process_group", lambda backend: events.append("init"))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: events.append("destroyed"))
    automatic = gc.isenabled()
    gc.disable()                                # only the explicit collection may free it
    try:
        with process_group(torch.device("cpu")):
            InACycle()
    finally:
        if automatic:
            gc.enable()
    assert events == ["init", "freed", "destroyed"]


def test_distributed_sampler_shares_the_single_process_order():
    size, batch, seed = 500, 64, 3
    one = EpochSampler(size, seed)
    ranks = [EpochSampler(size, seed, rank=r, world=2, batch_size=batch) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(2, 64)
    full = list(one)
    shares = [list(s) for s in ranks]
    rebuilt = []
    for lo in range(0, len(full), batch):
        n = min(batch, len(full) - lo)
        for r in range(2):
            rebuilt += shares[r][lo // 2:lo // 2 + n // 2]
    assert rebuilt == full and len(shares[0]) == len(shares[1]) == 218


def test_distributed_loader_checks_the_global_batch_and_resumes_by_global_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(100.0))
    with pytest.raises(DatasetError, match="not divisible"):
        build_loaders(ds, ds, batch_size=63, seed=0, rank=0, world=2)
    train, _ = build_loaders(ds, ds, batch_size=20, seed=0, rank=1, world=2)
    assert train.batch_size == 10 and len(train) == 5
    set_epoch(train, 1, 2)
    order = EpochSampler(100, 0).order(1)
    first = next(iter(train))[0].long().tolist()
    assert first == order[50:60]


def test_torchrun_command_drops_nproc():
    cmd = torchrun_command(4, ["spec.yaml", "optim.lr=0.1"], "srste", None, None, True, None, False)
    assert cmd[1:5] == ["-m", "nmtrain.cli.torchrun", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "nmtrain.cli.main", "train", "spec.yaml", "optim.lr=0.1", "--method", "srste",
                       "--overwrite", "--no-progress"]
    assert not any("nproc" in c for c in cmd[5:])


@pytest.mark.slow
def test_a_one_process_run_interrupted_mid_epoch_resumes_on_two_processes(tmp_path, monkeypatch):
    import signal

    from nmtrain.experiments import runner as runner_module

    args = [*SPEC, "method.params.interval=2", "train.checkpoint_interval=5", "--method", "bame",
            "--pattern", "2:4", "--no-progress"]
    full = tmp_path / "full"
    assert runner.invoke(app, ["train", *args, "--out", str(full)]).exit_code == 0
    part = tmp_path / "part"
    calls = {"n": 0}
    original = runner_module.FlopCounter.add_step

    def add_step(self, *a, **k):   # a real SIGINT while step 10 runs: checkpointed at step 11, mid epoch 2
        if calls["n"] == 10:
            signal.raise_signal(signal.SIGINT)
        calls["n"] += 1
        return original(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(runner_module.FlopCounter, "add_step", add_step)
        result = runner.invoke(app, ["train", *args, "--out", str(part)])
    assert result.exit_code == 130
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 11
    proc = subprocess.run(torchrun_command(2, [], None, None, None, False, part, False),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    masks1, s1 = _masks(full)
    masks2, s2 = _masks(part)
    for name in masks1:
        assert torch.equal(masks1[name], masks2[name]), f"{name}: masks differ"
    assert s2["steps"] == 24 and abs(s1["final_test_loss"] - s2["final_test_loss"]) < LOSS_TOL
