"""The sparsity engine's base error: bad input whose one-line message names the field and the fix.

Every input error of this package (PatternError, LayoutError, SelectionError, DiversityError) derives
from `SparsityError`, so a caller catches the layer's input errors with one class and lets bugs through.
This module imports nothing, so that naming the class costs nothing.
"""


class SparsityError(ValueError):
    """Input the sparsity engine cannot use; the one-line message names the field and the fix."""
