"""`dense`: the baseline. No masks; every GEMM is dense."""

from . import Method, register_method


@register_method("dense")
class Dense(Method):
    summary = "no sparsity (baseline)"
    sparse = False
