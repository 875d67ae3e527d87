"""Which layers of a model are sparse: the one rule that training, AdaPrune and `prune` share.

A caller describes its layers (`LayerInfo`: name and weight shape, plus conv groups and whether the
layer's forward runs, where it can know them) in model order; `select_layers` walks a table of
constraints and returns the selected names and, for every other layer, the first constraint it broke.
The table is read top to bottom, so the reason reported is the most basic one (a layer the user
excluded is "excluded", even if its shape would not fit either).

Training describes modules (`experiments/layers.py`); `prune` describes a bare state_dict, which has
no conv groups and no forward, so those two constraints cannot fire there (a depthwise conv still
fails the shape constraint, as its C_in is 1). Error messages stay with the callers, which know the
names of their options (``sparsity.include`` in a spec, ``--include`` on the command line).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .layout import shape_violation
from .pattern import Pattern

NOT_CALLED = "its forward never runs (the parent reads .weight itself, as nn.MultiheadAttention does)"
LOOKUP = "embedding: a table lookup, no GEMM to make N:M sparse"


@dataclass(frozen=True)
class LayerInfo:
    name: str                       # what include/exclude globs match: a module name or a tensor name
    shape: tuple[int, ...]          # the weight's shape: (out, in) or (out, in/groups, kh, kw)
    groups: Optional[int] = None    # conv groups; None when unknown (a state_dict has no modules)
    called: Optional[bool] = None   # whether the layer's own forward runs; None when unknown
    # A table lookup (a token embedding): a model's first layer for the first/last rule, never sparse (no
    # GEMM). Its place makes the first GEMM after it (a GPT's first qkv) sparse like the rest of its kind.
    lookup: bool = False


@dataclass(frozen=True)
class SelectOptions:
    pattern: Pattern
    layout: str = "nhwc"
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    keep_first_dense: bool = True   # the first layer in model order stays dense (docs/methods.md#layer-selection)
    keep_last_dense: bool = True    # so does the last, the classifier
    include_field: str = "sparsity.include"    # how the caller's user spells the options, for skip reasons
    exclude_field: str = "sparsity.exclude"


@dataclass
class LayerSelection:
    selected: list[str]                                       # in model order
    skipped: dict[str, str] = field(default_factory=dict)     # name -> reason left dense
    # Layers an include glob named that cannot be sparse: name -> (constraint, reason). The caller
    # turns the first into its own error: nmtrain never pads or silently drops a layer asked for by name.
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


# The constraint table: (constraint, check, refuse_if_included). ``check(layer, index, count, options)``
# returns the reason the layer stays dense, or None when the constraint holds. A refuse_if_included
# constraint broken by a layer an include glob named is an error instead of a skip.
Check = Callable[[LayerInfo, int, int, SelectOptions], Optional[str]]
CONSTRAINTS: list[tuple[str, Check, bool]] = [
    ("include", lambda l, i, n, o: None if not o.include or _matches(l.name, o.include)
        else f"not matched by {o.include_field}", False),
    ("exclude", lambda l, i, n, o: f"excluded by {o.exclude_field}" if _matches(l.name, o.exclude) else None,
        False),
    ("called", lambda l, i, n, o: NOT_CALLED if l.called is False else None, True),
    ("lookup", lambda l, i, n, o: LOOKUP if l.lookup else None, True),
    ("first", lambda l, i, n, o: "first layer kept dense" if o.keep_first_dense and i == 0 else None, False),
    ("last", lambda l, i, n, o: "classifier kept dense" if o.keep_last_dense and i == n - 1 else None, False),
    ("groups", lambda l, i, n, o: f"grouped conv (groups={l.groups}) has no dense GEMM operand"
        if l.groups not in (None, 1) else None, False),
    ("shape", lambda l, i, n, o: shape_violation(l.shape, o.pattern, o.layout), True),
]


def select_layers(layers: Sequence[LayerInfo], options: SelectOptions) -> LayerSelection:
    """Apply the constraint table to ``layers`` (in model order): the selected names, the skipped ones
    with their reason, and the include-named layers that cannot be sparse (``refused``)."""
    result = LayerSelection(selected=[])
    for i, layer in enumerate(layers):
        for constraint, check, refuse_if_included in CONSTRAINTS:
            reason = check(layer, i, len(layers), options)
            if reason is None:
                continue
            if refuse_if_included and options.include:
                result.refused[layer.name] = (constraint, reason)
            else:
                result.skipped[layer.name] = reason
            break
        else:
            result.selected.append(layer.name)
    return result
