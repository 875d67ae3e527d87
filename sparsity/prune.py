"""Pruning a set of named weights to a pattern: which ones, with what mask, and how well.

Pure tensor code: takes and returns state_dicts; reading and writing files is the caller's job.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .errors import SparsityError
from .fold import fold_mask
from .nm import kept_share, nm_mask, nm_violation, unstructured_mask
from .pattern import Pattern, as_pattern
from .selection import LayerInfo, LayerSelection, SelectOptions, select_layers
from .solvers import warm_up
from .transposable import transposable_mask


class SelectionError(SparsityError):
    """The include/exclude selection asks for something impossible; the message names the weight."""


def make_mask(weight: torch.Tensor, pattern: Pattern, layout: str = "nhwc", solver: str = "exact",
              **solver_kwargs) -> torch.Tensor:
    """The N:M (or N:M-T, via ``solver``) mask of ``weight`` by magnitude (``pattern``: a Pattern or "2:4")."""
    pattern = as_pattern(pattern)
    if pattern.transposable:
        return transposable_mask(weight, pattern.n, pattern.m, solver=solver, layout=layout, **solver_kwargs)
    return nm_mask(weight, pattern.n, pattern.m, layout=layout)


def _is_candidate(name: str, value: object) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() in (2, 4)
            and name.rsplit(".", 1)[-1] == "weight")


def describe_state(state: Mapping[str, torch.Tensor]) -> list[LayerInfo]:
    """The layers of a bare state_dict, in its order: every floating-point 2-D/4-D ``*.weight``.

    A state_dict has no modules, so conv groups and whether a layer's forward runs are unknown."""
    return [LayerInfo(name, tuple(value.shape)) for name, value in state.items() if _is_candidate(name, value)]


def select(state: Mapping[str, torch.Tensor], pattern: Pattern, layout: str = "nhwc",
           include: Sequence[str] = (), exclude: Sequence[str] = (), keep_first_dense: bool = True,
           keep_last_dense: bool = True) -> LayerSelection:
    """The weights of ``state`` that are pruned, by training's layer rule (`select_layers`): every
    2-D/4-D ``*.weight`` that fits the pattern except the first and the last, filtered by fnmatch globs.

    Candidates (`describe_state`) that do not fit are skipped with the reason, unless an ``include`` glob
    asked for them by name: then the selection is an error (nmtrain never pads a layer silently).
    """
    for glob in include:
        if not any(fnmatch.fnmatchcase(name, glob) for name in state):
            raise SelectionError(f"--include {glob!r} matches no tensor; names look like {next(iter(state), '?')!r}")
    options = SelectOptions(pattern, layout, tuple(include), tuple(exclude), keep_first_dense, keep_last_dense,
                            include_field="--include", exclude_field="--exclude")
    sel = select_layers(describe_state(state), options)
    for name, (_constraint, problem) in sel.refused.items():
        raise SelectionError(f"{name} {tuple(state[name].shape)} cannot hold {pattern.describe()}: {problem}")
    for name in sel.selected:
        bad = int((~torch.isfinite(state[name])).sum())
        if bad:
            # NaN has no magnitude order and Inf breaks every solver's scaling: never guess a mask
            raise SelectionError(f"{name} has {bad} NaN/Inf entries, so its magnitude mask is undefined; "
                                 f"repair the checkpoint or leave the layer out with --exclude {name!r}")
    if not sel.selected:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(sel.skipped.items())[:3]) or "no 2-D or 4-D *.weight tensor"
        raise SelectionError(f"no weight can hold {pattern.describe()} ({reasons})")
    return sel


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    pattern: str
    density: float
    kept_share: float              # share of |W| the N:M mask keeps
    unstructured_share: float      # the same for unstructured magnitude pruning at the same density
    valid: bool
    seconds: float


def prune_state_dict(state: Mapping[str, torch.Tensor], pattern: Pattern, layout: str = "nhwc",
                     solver: str = "exact", include: Sequence[str] = (), exclude: Sequence[str] = (),
                     keep_first_dense: bool = True, keep_last_dense: bool = True,
                     on_layer: Callable[[str, int, int], None] | None = None,
                     selection: LayerSelection | None = None,
                     **solver_kwargs) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, str]]:
    """Prune the weights `select` picks from ``state``; everything else is returned unchanged.

    Returns (new state, one report per pruned layer, skipped name -> reason). ``on_layer(name, i,
    total)`` is called before each layer (for progress bars). ``selection`` is `select`'s result when
    the caller already made it (to fail fast, or to time the warm-up); then the layer rule's arguments
    are not read. A layer's ``seconds`` is its own solve: the solver's one-time work (numba compiling on
    first use) is done before the first layer is timed.
    """
    sel = selection if selection is not None else select(state, pattern, layout, include, exclude,
                                                         keep_first_dense, keep_last_dense)
    if pattern.transposable:
        for dtype, device in {(state[name].dtype, state[name].device) for name in sel.selected}:
            warm_up(solver, pattern.n, pattern.m, dtype, device)
    out = dict(state)
    reports = []
    for i, name in enumerate(sel.selected):
        if on_layer is not None:
            on_layer(name, i, len(sel.selected))
        weight = state[name]
        start = time.perf_counter()
        mask = make_mask(weight, pattern, layout, solver, **solver_kwargs)
        seconds = time.perf_counter() - start
        pruned = fold_mask(weight, mask)  # exact +0.0 at pruned positions
        out[name] = pruned
        reports.append(LayerReport(
            name=name, shape=tuple(weight.shape), pattern=str(pattern), density=pattern.density,
            kept_share=kept_share(weight, mask),
            unstructured_share=kept_share(weight, unstructured_mask(weight, pattern.density)),
            valid=nm_violation(mask, pattern, layout, exact=True) is None
            and nm_violation(pruned, pattern, layout) is None,
            seconds=seconds))
    return out, reports, sel.skipped
