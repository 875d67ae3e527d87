"""AdaPrune (Hubara et al., 2021; docs/methods.md#adaprune): its public names, where they have always been.

`nmtrain adaprune` converts a trained model to N:M (or N:M-T) with a one-shot method, AdaPrune by
default; the conversion lives in ``experiments/oneshot/`` (docs/methods.md#one-shot-conversion): the
method registry, the calibration sample, AdaPrune's layer-wise reconstruction (``reconstruct.py``), the
methods, the pipeline and its summary. This module re-exports what callers and tests have always
imported from here, so ``from nmtrain.experiments.adaprune import reconstruct`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

from .oneshot.calibration import calibration_set, capture_inputs, recalibrate_batchnorm, relative_error  # noqa: F401
from .oneshot.pipeline import ConversionResult, ConversionSettings, convert, default_out, load_source  # noqa: F401
from .oneshot.reconstruct import AdaPruneParams, ReconstructParams, add_back_pruned, reconstruct, step_macs  # noqa: F401
from .oneshot.registry import ConversionError

AdaPruneError = ConversionError     # the name this module's error has always had


def adaprune(source: str | Path, settings: ConversionSettings, **kwargs) -> ConversionResult:
    """`convert` (``settings.method`` defaults to ``adaprune``); kept under the command's name."""
    return convert(source, settings, **kwargs)
