"""Bad input ends in one line on stderr that names the field and the fix, and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from ..experiments.io import CheckpointError
from ..sparsity import LayoutError, PatternError, SelectionError
from ..sparsity.diversity import DiversityError

# The engine's own error types already carry a one-line message naming the constraint.
USER_ERRORS = (CheckpointError, LayoutError, PatternError, SelectionError, DiversityError)

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
