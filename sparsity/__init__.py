"""The sparsity engine: pure tensor code (device-agnostic, no I/O, no CLI).

Masks are plain bool tensors of the weight's shape (True = kept). N is the number kept of every M.
"""

from .diversity import Diversity, pattern_diversity, rank, transposable_count, unstructured_diversity
from .errors import SparsityError
from .fold import FoldError, fold_mask
from .layout import LAYOUTS, LayoutError, from_matrix, grouped, require_fits, shape_violation, to_matrix
from .learned import (MAX_CANDIDATES, candidate_count, candidate_masks, choice_of, from_groups, gumbel_noise,
                      hard_mask, masks_from_choice, prior_logits, soft_mask, to_groups)
from .mvue import (is_mvue24, mvue24, mvue24_by_channel, mvue24_keep_probability, mvue24_variance,
                   mvue24_violation)
from .nm import is_valid, kept_share, magnitude, nm_mask, nm_violation, unstructured_mask
from .oneshot import (Hessian, OneShotError, choose_by_score, conv_rows, linear_rows, reconstruction_error, sparsegpt,
                      sq_norms, wanda_mask, wanda_saliency)
from .pattern import Pattern, PatternError, parse_pattern
from .prune import LayerReport, SelectionError, make_mask, prune_state_dict, select
from .selection import NOT_CALLED, LayerInfo, LayerSelection, SelectOptions, select_layers
from .solvers import get_solver, list_solvers, register_solver
from .transposable import pruned_magnitude, tile_scores, transposable_mask

__all__ = [
    "Diversity", "FoldError", "Hessian", "LAYOUTS", "LayerInfo", "LayerReport", "LayerSelection", "LayoutError",
    "MAX_CANDIDATES", "NOT_CALLED", "OneShotError", "Pattern", "PatternError", "SelectOptions", "SelectionError",
    "SparsityError", "candidate_count", "candidate_masks", "choice_of", "choose_by_score", "conv_rows",
    "fold_mask", "from_groups", "from_matrix", "get_solver", "grouped", "gumbel_noise", "hard_mask", "is_mvue24", "is_valid",
    "kept_share", "linear_rows", "list_solvers", "magnitude", "make_mask", "masks_from_choice", "mvue24",
    "mvue24_by_channel",
    "mvue24_keep_probability", "mvue24_variance", "mvue24_violation", "nm_mask", "nm_violation", "parse_pattern",
    "pattern_diversity", "prior_logits", "prune_state_dict", "pruned_magnitude", "rank", "reconstruction_error",
    "register_solver", "require_fits", "select", "select_layers", "shape_violation", "soft_mask", "sparsegpt",
    "sq_norms", "tile_scores", "to_groups", "to_matrix", "transposable_count", "transposable_mask",
    "unstructured_diversity", "unstructured_mask", "wanda_mask", "wanda_saliency",
]
