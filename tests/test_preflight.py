"""One pre-flight (`build.validate`): everything a spec can be refused for is refused before any data is
read or directory made, also under --nproc before torchrun starts; its typed result is carried, not redone."""

import dataclasses

import pytest

from nmtrain.cli import train as cli_train
from nmtrain.experiments import build as build_module
from nmtrain.experiments import runner as runner_module
from nmtrain.experiments.build import Preflight, validate
from nmtrain.experiments.compare import grid, run_grid
from nmtrain.experiments.errors import ExperimentError
from nmtrain.experiments.spec import Spec, load_spec
from nmtrain.sparsity import Pattern

from helpers import QUICK, assert_refused, quick_train, snapshot

REFUSED = [
    (["optim.name=sgdd"], "error: optim.name: 'sgdd' is unknown; use sgd or adamw\n"),
    (["schedule.name=cosin"], "error: schedule.name: 'cosin' is unknown; use cosine, step or constant\n"),
    (["--method", "bimask", "method.params.search=bogus"],
     "error: method.params.search: must be one of random, local, got 'bogus'\n"),
    (["--method", "bame", "method.params.t_i=0.5", "method.params.t_f=0.25"],
     "error: method.params.t_f: must not be before t_i=0.5, got 0.25\n"),
    (["--method", "bame", "method.params.regrow=random"],
     "error: method.params.regrow: must be one of zero, stale, got 'random'\n"),
    (["--method", "unstructured", "method.params.scope=model"],
     "error: method.params.scope: 'model' is unknown; use layer or global\n"),
    (["--method", "unstructured", "method.params.start=0.6", "method.params.end=0.5"],
     "error: method.params.start/end: need 0 <= start <= end <= 1 (fractions of training)\n"),
]


@pytest.fixture
def no_data(monkeypatch):
    """Reading a dataset fails the test: a refusal must come first."""
    def read(*args, **kwargs):
        raise AssertionError("a dataset was read before the spec was refused")
    monkeypatch.setattr(build_module, "build_datasets", read)


@pytest.fixture
def no_launch(monkeypatch):
    launched = []
    monkeypatch.setattr(cli_train.subprocess, "call", lambda cmd, *a, **k: launched.append(cmd) or 0)
    return launched


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]], ids=["one process", "nproc 2"])
@pytest.mark.parametrize("args,message", REFUSED)
def test_refused_before_any_data_is_read_or_directory_made(tmp_path, no_data, no_launch, args, message, nproc):
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = quick_train(out, *args, *nproc)
    assert_refused(result, message, before, snapshot(tmp_path))
    assert result.stderr == message
    assert no_launch == [] and not out.exists()


def test_a_spec_edited_in_code_is_refused_by_train_before_any_data(tmp_path, no_data):
    spec = load_spec(None, [*QUICK[:-1], f"out={tmp_path / 'run'}"])
    spec.optim.name = "sgdd"
    with pytest.raises(ExperimentError, match="^optim.name: 'sgdd' is unknown; use sgd or adamw$"):
        runner_module.train(spec, progress=False)
    spec.optim.name, spec.method.name, spec.method.params = "sgd", "bimask", {"search": "bogus"}
    with pytest.raises(ExperimentError, match="^method.params.search: must be one of random, local"):
        runner_module.train(spec, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method,pattern,layers", [
    ("srste", Pattern(2, 4), Pattern(2, 4)),
    ("bimask", Pattern(2, 4), Pattern(2, 4, transposable=True)),           # column groups: C_out % M
    ("transposable", Pattern(2, 4, transposable=True), Pattern(2, 4, transposable=True)),
])
def test_the_preflight_is_typed_frozen_and_derives_the_patterns(method, pattern, layers):
    spec = Spec()
    spec.method.name = method
    found = validate(spec, world=2)
    assert isinstance(found, Preflight) and found.world == 2 and found.method.name == method
    assert found.asked == Pattern(2, 4) and found.pattern == pattern and found.layer_pattern == layers
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.world = 1


def test_a_grid_validates_each_cell_once_and_the_runner_carries_it(tmp_path, monkeypatch):
    spec = load_spec(None, [*QUICK[:-1], "train.max_steps=2", f"out={tmp_path}"])
    cells = grid(spec, ["dense", "srste"], ["2:4"])
    assert all(isinstance(c.preflight, Preflight) for c in cells)

    def again(*args, **kwargs):
        raise AssertionError("a cell was validated again")
    monkeypatch.setattr(runner_module, "validate", again)
    monkeypatch.setattr("nmtrain.experiments.compare.validate", again)
    rows = run_grid(cells, tmp_path, progress=False)
    assert [r["method"] for r in rows] == ["dense", "srste"]
    assert [r["method"] for r in run_grid(cells, tmp_path, progress=False, reuse=True)] == ["dense", "srste"]
