"""How nmtrain's help reads: flags shown as flags, and prose that the terminal wraps, not the source.

Typer's rich help shows a value type beside every option, so a boolean flag would read
``--overwrite <bool>`` as if it took a value; and it keeps the single line breaks of a docstring,
so a paragraph wrapped at 100 columns in the source comes out wrapped twice, in ragged lines. The
app and every command are built with the two classes below instead of typer's defaults.
"""

from __future__ import annotations

import inspect

from typer.core import TyperCommand, TyperGroup, TyperOption


def reflow(text: str | None) -> str | None:
    """The paragraphs of ``text`` (separated by blank lines), each joined into one line for rich to wrap."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _flags_as_flags(params: list) -> list:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""      # a flag takes no value: show only its name(s), no `<bool>`
    return params


class Command(TyperCommand):
    def __init__(self, *args, help: str | None = None, **kwargs):
        super().__init__(*args, help=reflow(help), **kwargs)

    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))


class Group(TyperGroup):
    def __init__(self, *args, help: str | None = None, **kwargs):
        super().__init__(*args, help=reflow(help), **kwargs)

    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))
