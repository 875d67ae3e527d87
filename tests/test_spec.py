"""Specs: typed loading, dotted overrides, unknown keys, and every shipped spec validated."""

import re

import pytest

from nmtrain.experiments.methods import MethodError, build_params, get_method
from nmtrain.experiments.runner import validate
from nmtrain.experiments.spec import SPECS_DIR, Spec, SpecError, dump_spec, from_dict, load_spec, shipped_specs
from nmtrain.experiments.yamlfile import read_yaml
from nmtrain.sparsity import PatternError

ROOT = SPECS_DIR.parents[1]     # the repository: a spec's command runs from here


def test_defaults_and_overrides():
    spec = load_spec(None, ["sparsity.pattern=2:4", "optim.lr=1e-3", "data.train_subset=100",
                            "sparsity.include=['layer*']", "model.init=null", "train.epochs=2"])
    assert spec.sparsity.pattern == "2:4"          # not YAML's base-60 integer 124
    assert spec.optim.lr == pytest.approx(1e-3)
    assert spec.data.train_subset == 100 and spec.sparsity.include == ["layer*"] and spec.train.epochs == 2


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=0.1", "optim.lrr: unknown key; valid keys here: name, lr"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("seed=1.5", "seed: expected int"),
    ("train.epochs=true", "train.epochs: expected int"),
    ("bogus=1", "bogus: unknown key"),
    ("optim=3", "optim: expected a mapping"),
    ("noequals", "key.sub=value"),
    ("seed.x=1", "seed: expected int"),
    ("data.image_size=4", "data.image_size: must be in [8, 1024] pixels"),
    ("data.image_size=4096", "data.image_size: must be in [8, 1024] pixels"),
    ("data.image_size=32.5", "data.image_size: expected int"),
    ("data.mean=[0.5, nan]", "data.mean: every value must be a finite number"),
    ("data.mean=[]", "data.mean: must be a list of finite numbers"),
    ("data.mean=0.5", "data.mean: expected a list of float"),
    ("data.std=[0.2, 0.0, 0.2]", "data.std: every value must be a finite number above 0"),
    ("data.std=[0.2, inf]", "data.std: every value must be a finite number above 0"),
])
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(SpecError) as err:
        load_spec(None, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unquoted_pattern_in_yaml_is_caught(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("sparsity:\n  pattern: 2:4\n")  # YAML 1.1 reads this as 124
    with pytest.raises(SpecError, match="quoted string"):
        load_spec(path)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(path)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_method_params_are_checked_per_method():
    assert build_params(get_method("srste"), {"decay": 1e-4}).decay == 1e-4
    with pytest.raises(MethodError, match="method.params.decay: unknown key"):
        build_params(get_method("dense"), {"decay": 1e-4})
    with pytest.raises(MethodError, match="method.name: 'magic' is unknown"):
        get_method("magic")


@pytest.mark.parametrize("overrides,error,needle", [
    (["sparsity.pattern=5:4"], PatternError, "smaller than M"),
    (["sparsity.pattern=0:4"], PatternError, "at least 1"),
    (["sparsity.layout=nchw"], SpecError, "sparsity.layout"),
    (["sparsity.solver=magic"], SpecError, "sparsity.solver"),
    (["method.name=srste", "sparsity.transposable=true"], MethodError, "sparsity.transposable"),
    (["train.epochs=0"], SpecError, "train.epochs"),
])
def test_validate_rejects(overrides, error, needle):
    with pytest.raises(error, match=needle):
        validate(load_spec(None, overrides))


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid_and_documents_its_command(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    pythonpath = re.match(r"# PYTHONPATH=(\S+) ", first)      # a spec whose model is a module beside it
    if pythonpath:
        assert (ROOT / pythonpath.group(1)).is_dir()
        monkeypatch.syspath_prepend(str(ROOT / pythonpath.group(1)))    # as the command's PYTHONPATH does
        first = "# " + first[pythonpath.end():]
    assert first.startswith(("# nmtrain train ", "# nmtrain compare ")) and path.name in first
    spec = from_dict(Spec, read_yaml(path))
    validate(spec)
    from nmtrain.experiments.compare import split_label
    for label in spec.sweep.methods:
        get_method(split_label(label)[0])
    if spec.sweep.methods:        # every cell of a shipped grid validates (grid() checks each before running)
        from nmtrain.experiments.compare import grid
        cells = grid(spec, spec.sweep.methods, spec.sweep.patterns, spec.sweep.seeds or None)
        assert len(cells) >= len(spec.sweep.methods) * max(len(spec.sweep.seeds), 1)
        assert all(c.spec.seed in (spec.sweep.seeds or [spec.seed]) for c in cells)
    assert load_spec(path) == spec
    # the resolved spec round-trips through YAML
    again = tmp = dump_spec(spec)
    assert from_dict(Spec, __import__("yaml").safe_load(tmp)) == spec and again


def test_shipped_specs_cover_the_recipes():
    names = {p.name for p in shipped_specs()}
    assert {"fmnist_quick.yaml", "cifar10_resnet32.yaml", "imagenet_resnet50.yaml", "custom_model.yaml"} <= names


def test_a_retired_key_is_read_and_dropped(tmp_path):
    # A run directory's config.yaml of an older nmtrain holds train.log_interval (every default was
    # written); resume, adaprune and compare --reuse read it back, so it must still load, as no key.
    old = tmp_path / "config.yaml"
    old.write_text("seed: 3\ntrain:\n  epochs: 2\n  log_interval: 20\n")
    spec = load_spec(old)
    assert spec.seed == 3 and spec.train.epochs == 2
    assert "log_interval" not in dump_spec(spec)
    assert load_spec(None, ["train.log_interval=5"]) == load_spec(None)
    with pytest.raises(SpecError, match=r"train.log_intervall: unknown key"):
        load_spec(None, ["train.log_intervall=5"])
