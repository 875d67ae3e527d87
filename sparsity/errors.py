"""The sparsity engine's base error: bad input whose one-line message names the field and the fix.

Every input error of this package (PatternError, LayoutError, SelectionError, DiversityError) derives
from `SparsityError`, so a caller catches the layer's input errors with one class and lets bugs through.
This module imports nothing, so that naming the class costs nothing; `clip` and `shown` keep a message
that quotes a hostile input to one readable line.
"""


class SparsityError(ValueError):
    """Input the sparsity engine cannot use; the one-line message names the field and the fix."""


def clip(text: str, limit: int = 40) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters, so that a hostile 5000-character
    input still gives a one-line error a person can read."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def shown(number) -> str:
    """A number as a message prints it; an integer past 30 digits by its size only (CPython refuses to
    turn an int of more than 4300 digits into a string, and a person would not read it)."""
    if isinstance(number, int) and number.bit_length() > 99:      # 2**99 < 10**30
        return f"an integer of about {int(number.bit_length() * 0.30103) + 1} digits"
    return str(number)
