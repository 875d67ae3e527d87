"""The data package's base error: bad input whose one-line message names the field and the fix.

Every input error of this package (DatasetError) derives from `DataError`, so a caller catches the
layer's input errors with one class and lets bugs through. This module imports nothing; `first_line`
keeps a message that quotes another library's exception to one line.
"""


class DataError(ValueError):
    """A dataset or loader that cannot be built from the given input; one-line message naming the field."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
