"""The data package's base error: bad input whose one-line message names the field and the fix.

Every input error of this package (DatasetError) derives from `DataError`, so a caller catches the
layer's input errors with one class and lets bugs through. This module imports nothing.
"""


class DataError(ValueError):
    """A dataset or loader that cannot be built from the given input; one-line message naming the field."""
