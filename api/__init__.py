"""nmtrain's public Python API: N:M sparse training in your own loop, one-shot N:M, and the mask engine.

    import nmtrain
    handle = nmtrain.sparsify(model, method="srste", pattern="2:4", optimizer=opt)
    ...                                  # your loop, unchanged: the method's work runs in opt.step()
    handle.remove()                      # masks folded in; handle.export("model.safetensors") to ship it

    nmtrain.prune(model, pattern="4:8", transposable=True)              # one-shot, in place
    nmtrain.oneshot(model, calib_batches, method="sparsegpt", pattern="2:4")
    nmtrain.masks.transposable_mask(weight, 2, 4)                       # the engine's mask functions
    model.load_state_dict(nmtrain.load_compressed("model.safetensors"))  # an export, read back dense

Every public name is listed in ``__all__`` and documented in docs/api.md; everything else in the
package (``nmtrain.experiments``, ``nmtrain.sparsity``, ...) is private and may change. The names load
on first use, so ``import nmtrain`` (and ``nmtrain --help``) costs no torch import.

Bad arguments raise one exception type per layer, with the one-line message ``nmtrain``'s CLI prints:
`ExperimentError` from training and conversion (`sparsify`, `prune`, `oneshot`, a handle),
`SparsityError` from the engine (`masks`, and a pattern or layout it cannot use). Both are ValueErrors.
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute); the module is imported when the name is first used
_EXPORTS = {
    "sparsify": ("nmtrain.experiments.sparsify", "sparsify"),
    "Sparsified": ("nmtrain.experiments.sparsify", "Sparsified"),
    "prune": ("nmtrain.experiments.oneshot.inplace", "prune"),
    "oneshot": ("nmtrain.experiments.oneshot.inplace", "oneshot"),
    "OneShotResult": ("nmtrain.experiments.oneshot.inplace", "OneShotResult"),
    "load_compressed": ("nmtrain.experiments.convert", "load_compressed"),
    "keep_freed_memory": ("nmtrain.experiments.memory", "keep_freed_memory"),
    "AdamW": ("nmtrain.experiments.optim", "AdamW"),
    "flush_denormals": ("nmtrain.experiments.denormals", "flush_denormals"),
    "ExperimentError": ("nmtrain.experiments.errors", "ExperimentError"),
    "SparsityError": ("nmtrain.sparsity.errors", "SparsityError"),
    "METHODS": ("nmtrain.experiments.catalogue", "METHODS"),
    "ONESHOT_METHODS": ("nmtrain.experiments.catalogue", "ONESHOT_METHODS"),
}

__all__ = ["sparsify", "Sparsified", "prune", "oneshot", "OneShotResult", "load_compressed", "masks", "ExperimentError",
           "SparsityError", "METHODS", "ONESHOT_METHODS", "keep_freed_memory", "AdamW", "flush_denormals",
           "__version__"]


def __getattr__(name: str):
    if name == "masks":
        return importlib.import_module("nmtrain.masks")
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("nmtrain")
        except PackageNotFoundError:
            return "unknown"
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value         # later lookups skip this function
        return value
    raise AttributeError(f"module 'nmtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
