"""`dense`: the baseline. No masks; every GEMM is dense."""

from .base import Capabilities, Method, register_method


@register_method("dense")
class Dense(Method):
    summary = "no sparsity (baseline)"
    caps = Capabilities(sparse=False)      # no pattern, no masks, no sparse GEMM
