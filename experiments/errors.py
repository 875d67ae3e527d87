"""What the experiments layer tells the user, as types: its base input error and its warning.

Every input error of this package (SpecError, ModelError, MethodError, RunError, CheckpointError,
LayerSelectionError, AdaPruneError, ConvertError) derives from `ExperimentError`, so a caller catches
the layer's input errors with one class and lets bugs through. This module imports nothing, so the CLI
can name these classes without loading torch. An error raised by several modules lives here, so they
need not import each other for it: `ModelError` (the registry in models.py, the builders in external.py).
"""


class ExperimentError(ValueError):
    """A spec, run or file the experiments layer cannot use; the one-line message names the field and the fix."""


class SpecError(ExperimentError):
    """A spec that cannot be used; the one-line message names the field and the fix."""


class ConvertError(ExperimentError):
    """Input `nmtrain convert` cannot use; one-line message, nothing written."""


class ModelError(ExperimentError):
    """A model that cannot be built from the given spec; the one-line message names the field."""


class AccelFallbackWarning(UserWarning):
    """Some layers run masked dense instead of the sparse kernels (issued once per run)."""
