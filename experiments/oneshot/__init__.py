"""One-shot conversion of a trained model to N:M / N:M-T (`nmtrain adaprune --method ...`;
docs/methods.md#one-shot-conversion).

``registry.py``: the contract of a method and the registry by name; ``calibration.py``: the calibration
sample and what a layer sees of it; ``reconstruct.py``: AdaPrune's layer-wise fit (method ``adaprune``
and ``--finetune``); ``methods.py``: magnitude, AdaPrune, Wanda, SparseGPT; ``pipeline.py``: a whole
conversion, from a run directory to a run directory; ``report.py``: its summary.json. Importing this
package registers the built-in methods; an optional one (``learned``) registers when first asked for.
"""

from . import methods as _methods  # noqa: F401  (registers magnitude, adaprune, wanda, sparsegpt)
from .pipeline import ConversionResult, ConversionSettings, convert, default_out, load_source  # noqa: F401
from .reconstruct import AdaPruneParams, ReconstructParams, add_back_pruned, reconstruct  # noqa: F401
from .registry import (Calibration, ConversionError, Job, NoParams, OneShotMethod, Outcome, available,  # noqa: F401
                       get_oneshot, list_oneshot, register_oneshot)
