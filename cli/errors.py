"""Bad input ends in one line on stderr that names the field and the fix, and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from ..data import DatasetError
from ..experiments.adaprune import AdaPruneError
from ..experiments.convert import ConvertError
from ..experiments.io import CheckpointError
from ..experiments.layers import LayerSelectionError
from ..experiments.methods import MethodError
from ..experiments.models import ModelError
from ..experiments.runner import RunError
from ..experiments.spec import SpecError
from ..sparsity import LayoutError, PatternError, SelectionError
from ..sparsity.diversity import DiversityError

# These error types carry a one-line message naming the field or constraint and the fix.
USER_ERRORS = (AdaPruneError, CheckpointError, ConvertError, DatasetError, DiversityError, LayerSelectionError,
               LayoutError, MethodError, ModelError, PatternError, RunError, SelectionError, SpecError)

F = TypeVar("F", bound=Callable)


class UsageError(ValueError):
    """A bad option value; the message names the option."""


def fail(message: str) -> "typer.Exit":
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn the engine's and the CLI's input errors into ``error: ...`` and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, *USER_ERRORS) as exc:
            raise fail(str(exc)) from None
    return wrapper  # type: ignore[return-value]
