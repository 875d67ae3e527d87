"""The `nmtrain` command line: one typer app, one module per subcommand."""

from __future__ import annotations

import os
import sys
import warnings

import typer

from ..experiments.errors import AccelFallbackWarning
from .compare import compare
from .diversity import diversity
from .adaprune import adaprune
from .convert import convert
from .help import Command, Group
from .prune import prune
from .sample import sample
from .train import train

app = typer.Typer(
    name="nmtrain",
    cls=Group,
    help="Experiment runner for N:M fine-grained sparse training. N is always the number of weights KEPT "
         "in every group of M (2:4 keeps half: density 0.50).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _command in (prune, diversity, train, compare, adaprune, convert, sample):
    app.command(cls=Command)(_command)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    # nmtrain's own warnings are messages for the user: one line, no source location.
    if issubclass(category, AccelFallbackWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main() -> None:
    warnings.showwarning = _show_warning
    # model.name package.module:function imports your module: as with `python -m`, the current directory
    # is importable, but last, so that a file there never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    app()


if __name__ == "__main__":
    main()
