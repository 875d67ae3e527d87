"""Methods declare what they are (``caps``), and ``attach`` routes a model through a method and back.

Nothing outside ``experiments/methods/`` may decide by a method's name: the last test scans the code.
"""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nmtrain.experiments.methods import GEMMS, Capabilities, attach, get_method, list_methods, register_method
from nmtrain.sparsity import Pattern, nm_violation

from helpers import ROOT, python_files


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))


def _attach(name, model, pattern=Pattern(2, 4), **params):
    cls = get_method(name)
    if cls.caps.needs_transposable or (cls.caps.accepts_transposable and "backward_data" in cls.caps.sparse_gemms):
        pattern = Pattern(pattern.n, pattern.m, transposable=True)
    return attach(cls, {"0": model[0], "2": model[2]}, pattern, params, total_steps=10, steps_per_epoch=10)


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_method_declares_its_capabilities(name):
    cls = get_method(name)
    caps = vars(cls)["caps"]                    # its own, not Method's default
    assert isinstance(caps, Capabilities)
    assert isinstance(caps.sparse, bool) and isinstance(caps.needs_column_groups, bool)
    assert isinstance(caps.needs_transposable, bool) and isinstance(caps.accepts_transposable, bool)
    assert isinstance(caps.sparse_gemms, tuple) and set(caps.sparse_gemms) <= set(GEMMS)
    assert all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, int) for v in p)
               for p in caps.accel_patterns)
    assert not caps.needs_transposable or caps.accepts_transposable
    assert caps.sparse == bool(caps.sparse_gemms)          # a method that masks makes some GEMM sparse


def test_a_method_without_capabilities_cannot_register():
    from nmtrain.experiments.methods import Method
    with pytest.raises(TypeError, match="must declare its capabilities"):
        @register_method("caps-less-test-method")
        class _NoCaps(Method):
            pass
    assert "caps-less-test-method" not in list_methods()


def test_capabilities_refuse_unknown_gemms_and_a_dense_method_with_sparse_features():
    with pytest.raises(ValueError, match="unknown GEMM"):
        Capabilities(sparse_gemms=("forwards",))
    with pytest.raises(ValueError, match="sparse=False"):
        Capabilities(sparse=False, sparse_gemms=("forward",))


# Parameters that bring a declared sparse GEMM within these 10 steps: pgf's MDGF forward is dense while
# the pruned weights' mask value is above 0, which with the default per-step decay takes ~10^4 steps.
SPARSE_WITHIN_10_STEPS = {"pgf": {"fine_tune": 0.5}}


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_declared_sparse_gemms_agree_with_the_densities(name):
    """A GEMM not declared sparse is dense at every step; a declared one is below 1 at some step."""
    model = _model()
    with _attach(name, model, **SPARSE_WITHIN_10_STEPS.get(name, {})) as method:
        seen = {gemm: 1.0 for gemm in GEMMS}
        x = torch.randn(4, 16)
        for step in range(10):
            method.before_step(step)
            model(x).pow(2).sum().backward()
            method.after_backward(step)
            for layer in method.ctx.layers:
                for gemm, density in zip(GEMMS, method.densities(layer, step)):
                    seen[gemm] = min(seen[gemm], density)
            method.after_step(step)
    assert {gemm for gemm, d in seen.items() if d < 1.0} == set(method.caps.sparse_gemms)


def test_dense_declares_no_sparse_gemm_and_has_no_masks():
    model = _model()
    with _attach("dense", model) as method:
        assert method.caps.sparse is False and method.caps.sparse_gemms == ()
        assert method.ctx.layers == {} and method.masks() == {}
        assert "forward" not in vars(model[0])          # nothing routed: the model runs as built


@pytest.mark.parametrize("name", sorted(n for n, c in list_methods().items() if c.caps.needs_transposable))
def test_a_transposable_sparse_backward_data_method_masks_nm_along_columns(name):
    assert "backward_data" in get_method(name).caps.sparse_gemms
    model = _model()
    with _attach(name, model) as method:
        method.before_step(0)
        for layer, mask in method.masks().items():
            # N:M along C_out too: the backward-data GEMM dY W~ takes an N:M operand
            assert nm_violation(mask.t().contiguous(), Pattern(2, 4), exact=True) is None, layer


def test_accel_is_a_capability():
    for name, cls in list_methods().items():
        assert cls.caps.accel(Pattern(2, 4)) == ((2, 4) in cls.caps.accel_patterns)
        assert not cls.caps.accel(Pattern(4, 8))
    assert get_method("transposable").caps.accel(Pattern(2, 4, True))


def _routed(model) -> bool:
    return any("forward" in vars(mod) for mod in model.modules())


def test_attach_routes_the_forward_and_detaches_on_exit():
    model = _model()
    x = torch.randn(3, 16)
    before = model(x)
    with _attach("srste", model) as method:
        assert _routed(model) and set(method.ctx.layers) == {"0", "2"}
        assert not torch.allclose(model(x), before)       # the layers run through W~ = E * W
    assert not _routed(model)
    assert torch.equal(model(x), before)                  # the layers' own forward again


def test_attach_detaches_when_the_block_raises():
    model = _model()
    x = torch.randn(3, 16)
    before = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with _attach("transposable", model):
            assert _routed(model)
            raise RuntimeError("boom")
    assert not _routed(model)
    assert torch.equal(model(x), before)


def test_attach_takes_a_name_or_a_class_and_params_as_a_dict():
    model = _model()
    with attach("srste", {"0": model[0]}, Pattern(2, 4), {"decay": 1e-3}) as a:
        assert a.params.decay == 1e-3 and a.name == "srste"
    with attach(get_method("srste"), {"0": model[0]}, Pattern(2, 4)) as b:
        assert b.params.decay == 2e-4


# A method-name comparison: a method (`method`, `method_cls.name`, `name`, `row["method"]`) compared with a
# registered name (`method != "dense"`, `"srste" == cls.name`). Other labels that happen to be spelt like a
# method (a benchmark's GEMM mode "dense", convert's `--to dense`, the schedule `sch.name == "step"`) are
# not methods and do not match.
_NAMES = "|".join(sorted(list_methods()))
_METHOD = r"""(\bmethod\w*|(?<!sch\.)(?<!schedule\.)\bname|\[["']method["']\])"""
_COMPARISON = re.compile(rf"""{_METHOD}\s*(==|!=)\s*["']({_NAMES})["']"""
                         rf"""|["']({_NAMES})["']\s*(==|!=)\s*[\w.]*{_METHOD}""")


def test_no_code_outside_methods_compares_a_method_name():
    offenders = []
    for path in python_files("api", "cli", "experiments", "benchmarks", "data", "sparsity", "tests", "docs"):
        if "methods" in path.relative_to(ROOT).parts[:2] or path.name == Path(__file__).name:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _COMPARISON.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "ask the method's caps, not its name:\n" + "\n".join(offenders)
