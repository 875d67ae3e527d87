"""Bad input ends in one line on stderr that names the field and the fix, and exit code 2.

Each layer has one base class for its input errors (`SparsityError`, `DataError`, `ExperimentError`);
the CLI turns those, and its own `UsageError`, into ``error: ...`` and lets everything else through,
so a bug still shows its traceback. The layers' bases are looked up only among modules already
imported: importing the sparsity or data package imports torch, which ``--help`` must not do, and an
exception of a layer's class means that its module is loaded anyway.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

# The base input error of each layer, by the module that defines it.
LAYER_ERRORS = {
    "nmtrain.sparsity.errors": "SparsityError",
    "nmtrain.data.errors": "DataError",
    "nmtrain.experiments.errors": "ExperimentError",
}

F = TypeVar("F", bound=Callable)


class UsageError(ValueError):
    """A bad option value; the message names the option."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (a one-line message for the user) rather than a bug."""
    if isinstance(exc, UsageError):
        return True
    for module, name in LAYER_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def fail(message: str) -> "typer.Exit":
    # One write of the whole line: the processes of `--nproc N` share a stderr, and their lines must not interleave.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code=2)


def one_line(exc: BaseException) -> str:
    """The message of a user error as one line. A DataLoader worker's error reaches this process re-raised
    with the worker's traceback in its message ("Caught DatasetError in DataLoader worker process 0.
    Original Traceback ..."), whose last line is the original ``module.Class: message``."""
    text = str(exc).strip()
    if "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(text.split("\n"))


def user_errors(fn: F) -> F:
    """Turn the engine's and the CLI's input errors into ``error: ...`` and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            raise fail(one_line(exc)) from None
    return wrapper  # type: ignore[return-value]
