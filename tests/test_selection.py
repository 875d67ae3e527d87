"""One layer rule (`sparsity.select_layers`) and one mask fold (`sparsity.fold_mask`), shared by
training, AdaPrune and `prune` (issue #13, item 5)."""

import re

import pytest
import torch

from nmtrain.experiments.layers import called_layers, plan_layers
from nmtrain.experiments.models import image_model
from nmtrain.sparsity import (NOT_CALLED, FoldError, LayerInfo, Pattern, SelectOptions, fold_mask, select,
                              select_layers)
from nmtrain.sparsity.selection import CONSTRAINTS

from helpers import ROOT, python_files

# One row per constraint: the layers (the middle one is tested, so first/last do not fire unless asked),
# the options, and a word of the reason that names the constraint.
_MID = [LayerInfo("stem", (8, 8)), None, LayerInfo("head", (8, 8))]
_CASES = {
    "include": (LayerInfo("x", (8, 8)), dict(include=("stem", "head")), "sparsity.include"),
    "exclude": (LayerInfo("x", (8, 8)), dict(exclude=("x",)), "sparsity.exclude"),
    "called": (LayerInfo("x", (8, 8), called=False), {}, "forward never runs"),
    "lookup": (LayerInfo("x", (8, 8), lookup=True), {}, "table lookup"),
    "first": (LayerInfo("x", (8, 8)), {}, "first layer"),
    "last": (LayerInfo("x", (8, 8)), {}, "classifier"),
    "groups": (LayerInfo("x", (8, 4, 3, 3), groups=2), {}, "grouped conv"),
    "shape": (LayerInfo("x", (8, 6)), {}, "not a multiple of M=4"),
}


@pytest.mark.parametrize("constraint", [name for name, _check, _refuse in CONSTRAINTS])
def test_each_constraint_is_hit_and_its_reason_names_it(constraint):
    layer, extra, word = _CASES[constraint]
    if constraint == "first":
        layers = [layer, *_MID[::2]]
    elif constraint == "last":
        layers = [*_MID[::2], layer]
    else:
        layers = [_MID[0], layer, _MID[2]]
    sel = select_layers(layers, SelectOptions(Pattern(2, 4), **extra))
    assert "x" not in sel.selected and word in sel.skipped["x"]
    others = SelectOptions(Pattern(2, 4), keep_first_dense=False, keep_last_dense=False)
    if constraint not in ("first", "last", "include", "exclude"):
        assert "x" in select_layers(layers, others).skipped          # fires without first/last too
    else:
        assert "x" in select_layers(layers, others).selected         # ... and only by its own option


def test_the_table_is_read_top_down_and_include_refuses_misfits():
    layers = [LayerInfo("a", (8, 6)), LayerInfo("b", (8, 8), called=False), LayerInfo("c", (8, 8)),
              LayerInfo("d", (8, 8))]
    sel = select_layers(layers, SelectOptions(Pattern(2, 4), exclude=("a",)))
    assert sel.skipped == {"a": "excluded by sparsity.exclude", "b": NOT_CALLED, "d": "classifier kept dense"}
    assert sel.selected == ["c"] and sel.refused == {}
    named = select_layers(layers, SelectOptions(Pattern(2, 4), include=("a", "b", "c"), keep_first_dense=False))
    assert named.refused == {"a": ("shape", "in_features=6 is not a multiple of M=4"), "b": ("called", NOT_CALLED)}
    assert named.selected == ["c"] and named.skipped == {"d": "not matched by sparsity.include"}


def test_prune_names_its_own_options():
    state = {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8), "c.weight": torch.randn(8, 8)}
    sel = select(state, Pattern(2, 4), exclude=["b.*"], keep_first_dense=False)
    assert sel.selected == ["a.weight"] and sel.skipped == {"b.weight": "excluded by --exclude",
                                                            "c.weight": "classifier kept dense"}


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8, True)])
def test_training_and_prune_choose_the_same_layers(model, pattern):
    in_channels = 1 if model == "lenet5" else 3
    size = 28 if model == "lenet5" else 32
    net = image_model(model, num_classes=10, in_channels=in_channels, image_size=size)
    called = called_layers(net, torch.zeros(1, in_channels, size, size))
    plan = plan_layers(net, pattern, "nhwc", called=called)
    sel = select(net.state_dict(), pattern, "nhwc")
    assert sel.selected == [f"{name}.weight" for name in plan.sparse]
    assert sel.skipped == {f"{name}.weight": reason for name, reason in plan.skipped.items()}


def test_fold_zeroes_pruned_entries_as_plus_zero_and_keeps_the_rest_bit_exact():
    w = torch.tensor([[1.5, -0.0, float("nan"), -2.0], [float("inf"), -3.0, 0.25, float("nan")]])
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    out = fold_mask(w, mask)
    assert torch.equal(out[~mask], torch.zeros(3)) and not torch.signbit(out[~mask]).any()
    assert torch.equal(out[mask].nan_to_num(), w[mask].nan_to_num()) and torch.isnan(out[1, 3])
    assert out.data_ptr() != w.data_ptr()


def test_fold_checks_dtype_and_shape():
    with pytest.raises(FoldError, match="bool"):
        fold_mask(torch.randn(4, 4), torch.ones(4, 4))
    with pytest.raises(FoldError, match=r"\(4, 2\) does not match its weight \(4, 4\)"):
        fold_mask(torch.randn(4, 4), torch.ones(4, 2, dtype=torch.bool))


# The idioms of a hand-written fold: pruned entries zeroed by index, a weight multiplied by its mask in
# place, a where() on a mask. Gradient masking (``.grad.mul_``) is not a fold.
_FOLD_IDIOMS = [r"\[~\w+(\[\w+\])?\]\s*=\s*0", r"(?<!grad)\.mul_\((mask|keep)", r"torch\.where\(masks?\b",
                r"\*\s*(mask|keep)\.to\("]


def test_fold_mask_is_the_only_fold():
    offenders = []
    for path in python_files("sparsity", "experiments", "cli"):
        if path == ROOT / "sparsity" / "fold.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(idiom, line) for idiom in _FOLD_IDIOMS):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []
