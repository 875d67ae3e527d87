"""The names that help texts list, without importing torch.

Methods (training's and the one-shot conversion's) come from the torch-free catalogue the method
registries import (`experiments.catalogue`). The solver registry (`sparsity.list_solvers`) lives in
modules that import torch, so its names are written out here; tests/test_cli_light.py checks that these
tuples equal the registries, in order.
Input is still checked against the registries themselves when a command runs.
"""

from ..experiments.catalogue import METHODS, ONESHOT_METHODS  # noqa: F401

SOLVERS = ("flow", "compiled", "enumerate", "approx", "batched", "exact")
