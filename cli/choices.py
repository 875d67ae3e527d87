"""The names that help texts list, written out here so that ``--help`` imports no torch.

The registries they mirror (`experiments.methods.list_methods`, `sparsity.list_solvers`) live in
modules that import torch; tests/test_cli_light.py checks that these tuples equal them, in order.
Input is still checked against the registries themselves when a command runs.
"""

METHODS = ("bame", "bimask", "dense", "fixed", "srste", "transposable", "unstructured")
SOLVERS = ("enumerate", "flow", "compiled", "approx", "batched", "exact")
