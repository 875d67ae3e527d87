"""The training methods nmtrain has, by name: the one list, read without torch.

Each name is a module of ``experiments/methods/`` (``bame`` is ``methods/bame.py``) holding the class
registered under it; the registry imports exactly these modules (``methods/__init__.py``), and help lists
them (``cli/choices.py``) without importing torch. Adding a method is its module plus its name here.
"""

METHODS = ("bame", "bimask", "dense", "fixed", "maskdecay", "pgf", "srste", "sste", "step", "transposable",
           "unstructured")
