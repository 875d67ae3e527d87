"""``nmtrain.masks``: the sparsity engine's mask functions, the public names of them.

Masks are plain bool tensors of the weight's shape (True = kept); N is the number kept of every M, so the
density is N/M. A 4-D convolution weight is read as a GEMM matrix by ``layout`` (``nhwc``: K = kh·kw·C_in,
groups of M run along the input channels; ``nchw``: along the kernel window first). Every function is pure
tensor code (any device, nothing written) and raises `nmtrain.SparsityError`, with a one-line message
naming the argument, on input it cannot use.

Masks:
    nm_mask(weight, n, m, layout="nhwc")            row-wise N:M by magnitude (N largest |w| of every M along K)
    transposable_mask(weight, n, m, solver="exact", layout="nhwc")
                                                    N:M along K and along C_out (N:M-T); ``solver`` is one of
                                                    list_solvers(): exact ones are optimal per M x M tile
    make_mask(weight, pattern, layout="nhwc", solver="exact")
                                                    either of the two, as ``pattern`` says (N:M or N:M-T)
    unstructured_mask(weight, density)              the round(density·numel) largest |w|, anywhere
    fold_mask(weight, mask)                         the weight with pruned entries exactly +0.0
Checks:
    nm_violation(tensor, pattern, layout="nhwc", exact=False) -> str | None
                                                    why a mask (or weights whose zeros are pruned) breaks
                                                    ``pattern``; None when it holds (``exact``: exactly N kept)
    is_valid(tensor, pattern, layout="nhwc", exact=False) -> bool
    kept_share(weight, mask)                        the share of total |W| a mask keeps
Mask diversity (Hubara et al., 2021):
    pattern_diversity(rows, cols, pattern)          the exact number of masks ``pattern`` allows on a block
    unstructured_diversity(rows, cols, density)
    transposable_count(m, n)                        M x M 0/1 matrices with N ones per row and column
    rank(rows, cols, density, patterns=None)        every fitting family, largest diversity first
Patterns and solvers:
    Pattern(n, m, transposable=False), parse_pattern("2:4" or "4:8-T"), list_solvers()
"""

from nmtrain.sparsity import (Diversity, Pattern, SparsityError, fold_mask, is_valid, kept_share, list_solvers,  # noqa: F401
                        make_mask, nm_mask, nm_violation, parse_pattern, pattern_diversity, rank, transposable_count,
                        transposable_mask, unstructured_diversity, unstructured_mask)

__all__ = ["Diversity", "Pattern", "SparsityError", "fold_mask", "is_valid", "kept_share", "list_solvers", "make_mask",
           "nm_mask", "nm_violation", "parse_pattern", "pattern_diversity", "rank", "transposable_count",
           "transposable_mask", "unstructured_diversity", "unstructured_mask"]
