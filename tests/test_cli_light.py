"""The CLI answers --help without torch, and catches the layers' input errors by one base class each."""

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys

import pytest

from nmtrain.cli import choices
from nmtrain.cli.errors import LAYER_ERRORS, UsageError, is_user_error

# In a fresh interpreter: --help for the app and for every command it registers, then which heavy
# packages got imported. The command list comes from the app, so a new command is covered too.
_HELP_EVERYWHERE = """
import json, sys
from typer.testing import CliRunner
from nmtrain.cli.main import app
runner = CliRunner()
commands = [c.name or c.callback.__name__ for c in app.registered_commands]
codes = {name: runner.invoke(app, [*([name] if name else []), "--help"]).exit_code for name in ["", *commands]}
print(json.dumps({"codes": codes, "loaded": [m for m in ("torch", "torchvision", "numba") if m in sys.modules]}))
"""


def test_help_imports_neither_torch_nor_torchvision():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _HELP_EVERYWHERE], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["codes"]) == {"", "prune", "diversity", "train", "compare", "adaprune", "convert", "sample"}
    assert all(code == 0 for code in report["codes"].values()), report["codes"]
    assert report["loaded"] == []


def test_help_choices_equal_the_registries():
    from nmtrain.experiments.methods import list_methods
    from nmtrain.sparsity import list_solvers

    assert choices.METHODS == tuple(list_methods())
    assert choices.SOLVERS == tuple(s.name for s in list_solvers())


def test_the_method_catalogue_is_the_registry():
    """The torch-free catalogue names every registered method, in the registry's order, and nothing else."""
    from nmtrain.experiments import catalogue
    from nmtrain.experiments.methods import list_methods

    assert catalogue.METHODS == tuple(list_methods())
    assert all(cls.__module__ == f"nmtrain.experiments.methods.{name}" for name, cls in list_methods().items())


def _value_errors_defined_in(package: str) -> list[type]:
    root = importlib.import_module(package)
    modules = [root] + [importlib.import_module(info.name)
                        for info in pkgutil.walk_packages(root.__path__, prefix=package + ".")]
    return [cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
            if cls.__module__ == module.__name__ and issubclass(cls, ValueError)]


@pytest.mark.parametrize("package,base_module", [("nmtrain.sparsity", "nmtrain.sparsity.errors"),
                                                 ("nmtrain.experiments", "nmtrain.experiments.errors"),
                                                 ("nmtrain.data", "nmtrain.data.errors")])
def test_every_input_error_derives_from_its_layer_base(package, base_module):
    base = getattr(importlib.import_module(base_module), LAYER_ERRORS[base_module])
    errors = _value_errors_defined_in(package)
    assert base in errors and len(errors) > 1
    for cls in errors:
        assert issubclass(cls, base) and issubclass(cls, ValueError), cls
        assert is_user_error(cls("bad field: use another"))


def test_the_thirteen_caught_errors_are_user_errors_and_bugs_are_not():
    from nmtrain.data import DatasetError
    from nmtrain.experiments.adaprune import AdaPruneError
    from nmtrain.experiments.convert import ConvertError
    from nmtrain.experiments.io import CheckpointError
    from nmtrain.experiments.layers import LayerSelectionError
    from nmtrain.experiments.methods import MethodError
    from nmtrain.experiments.errors import ModelError
    from nmtrain.experiments.runner import Interrupted, RunError
    from nmtrain.experiments.spec import SpecError
    from nmtrain.sparsity import LayoutError, PatternError, SelectionError
    from nmtrain.sparsity.diversity import DiversityError

    for cls in (AdaPruneError, CheckpointError, ConvertError, DatasetError, DiversityError, LayerSelectionError,
                LayoutError, MethodError, ModelError, PatternError, RunError, SelectionError, SpecError, UsageError):
        assert is_user_error(cls("x")) and issubclass(cls, ValueError), cls
    for exc in (ValueError("a bug"), KeyError("k"), RuntimeError("r"), Interrupted("out", 3, None)):
        assert not is_user_error(exc)
