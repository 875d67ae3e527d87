"""The training methods nmtrain has, by name: the one list, read without torch.

Each name is a module of ``experiments/methods/`` (``bame`` is ``methods/bame.py``) holding the class
registered under it; the registry imports exactly these modules (``methods/__init__.py``), and help lists
them (``cli/choices.py``) without importing torch. Adding a method is its module plus its name here.
"""

METHODS = ("bame", "bimask", "dense", "fixed", "maskdecay", "pgf", "srste", "sste", "step", "transposable",
           "unstructured")

# The one-shot conversion methods of `nmtrain adaprune --method` (experiments/oneshot/registry.py), in the
# order help and tables list them, and the module under experiments/ that registers each (imported on first
# use; one that is absent from an installation is refused in one line).
ONESHOT_METHODS = ("magnitude", "adaprune", "wanda", "sparsegpt", "learned")
ONESHOT_MODULES = {"magnitude": "oneshot.methods", "adaprune": "oneshot.methods", "wanda": "oneshot.methods",
                   "sparsegpt": "oneshot.methods", "learned": "oneshot.learned"}
