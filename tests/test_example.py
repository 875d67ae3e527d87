"""docs/examples/own_loop.py, the README's "In your own training loop" example, runs as a user runs it:
a small CNN of its own on Fashion-MNIST with SR-STE 2:4 through `nmtrain.sparsify`, exported and removed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT
from nmtrain.experiments.compressed import read_compressed
from nmtrain.sparsity import nm_violation, parse_pattern

EXAMPLE = ROOT / "docs" / "examples" / "own_loop.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH kept: `import nmtrain` resolves as it does here. One thread, as every test here runs: on a
    # busy 2-core machine, two OpenMP threads contending with another process made it 2-4 times as slow.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_own_loop_example_trains_exports_and_removes(tmp_path):
    if not all((FMNIST / f).is_file() for f in FILES):
        pytest.skip(f"Fashion-MNIST is not in {FMNIST} (Debian's dataset-fashion-mnist)")
    out = tmp_path / "out"
    result = _run("--data", str(FMNIST), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # One epoch of SR-STE 2:4, seed 0, gives 0.8792 on this machine with one thread (0.8799 with two).
    acc = float(re.search(r"test accuracy (\d\.\d+) \(2:4, masks folded in: (\d\.\d+)\)", result.stdout).group(1))
    assert acc > 0.84, result.stdout
    assert "sparse layers: conv2, fc1;" in result.stdout

    # The export reads back with nmtrain's own reader: both sparse weights declared and stored 2:4.
    loaded = read_compressed(out / "model-2of4.safetensors")
    assert loaded.kind == "compressed"
    assert set(loaded.layers) == {"conv2.weight", "fc1.weight"}
    two_four = parse_pattern("2:4")
    for name in loaded.layers:
        assert str(loaded.layers[name].pattern) == "2:4"
        assert nm_violation(loaded.state[name], two_four, exact=True) is None
    # the dense layers come back whole, the sparse ones at exactly half their entries
    assert int((loaded.state["conv1.weight"] != 0).sum()) == loaded.state["conv1.weight"].numel()
    assert int((loaded.state["fc1.weight"] != 0).sum()) == loaded.state["fc1.weight"].numel() // 2
    assert loaded.state["fc2.weight"].shape == torch.Size([10, 128])


def test_own_loop_example_refuses_a_missing_data_folder_in_one_line(tmp_path):
    result = _run("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert "--data:" in result.stderr and "train-images-idx3-ubyte.gz" in result.stderr
    assert not (tmp_path / "out").exists()
