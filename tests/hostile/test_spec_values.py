"""Hostile input, class 5: spec values. One rule table checks every number before anything is built;
patterns, shapes and seeds take ASCII digits only."""

import pytest
import torch

from nmtrain.cli.main import app
from nmtrain.experiments.spec import RULES, Spec, SpecError, load_spec
from nmtrain.sparsity import Pattern, PatternError, parse_pattern

from helpers import QUICK, assert_refused, cli, quick_train, snapshot
from hostile_cases import refused


# == class 5: spec values ==
# Every number of a spec and of a method's parameters is checked against one table (spec.RULES) when the
# YAML data becomes a dataclass, before anything is built or written.

BAD_VALUES = [
    ("optim.lr=nan", "optim.lr: must be a finite number above 0"),
    ("optim.lr=.nan", "optim.lr: must be a finite number above 0"),
    ("optim.lr=inf", "optim.lr: "),
    ("optim.lr=.inf", "optim.lr: "),
    ("optim.lr=-.inf", "optim.lr: "),
    ("optim.lr=-0.1", "optim.lr: "),
    ("optim.lr=0", "optim.lr: must be a finite number above 0"),
    ("optim.momentum=1.0", "optim.momentum: must be a finite number in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum: "),
    ("optim.weight_decay=-1e-4", "optim.weight_decay: must be a finite number at least 0"),
    ("optim.weight_decay=.inf", "optim.weight_decay: "),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs: "),
    ("schedule.gamma=nan", "schedule.gamma: "),
    ("schedule.gamma=0", "schedule.gamma: "),
    ("schedule.milestones=[1, .inf]", "schedule.milestones: every value must be"),
    ("schedule.milestones=[-1]", "schedule.milestones: "),
    ("train.epochs=0", "train.epochs: must be at least 1"),
    ("train.max_steps=0", "train.max_steps: must be at least 1"),
    ("train.eval_interval=-1", "train.eval_interval: must be at least 0"),
    ("train.checkpoint_interval=-2", "train.checkpoint_interval: "),
    ("data.batch_size=0", "data.batch_size: "),
    ("data.eval_batch_size=-1", "data.eval_batch_size: "),
    ("data.num_workers=-1", "data.num_workers: "),
    ("data.train_subset=0", "data.train_subset: "),
    ("data.test_subset=-5", "data.test_subset: "),
    ("data.holdout=0", "data.holdout: "),
    ("model.width=0", "model.width: "),
    ("model.width=nan", "model.width: "),
    ("seed=-1", "seed: must be in [0, 2**63)"),
    (f"seed={2 ** 64}", "seed: must be in [0, 2**63)"),
    (f"seed={2 ** 63}", "seed: "),
    ("sweep.seeds=[0, -1]", "sweep.seeds: every value must be in [0, 2**63)"),
    (f"sweep.seeds=[{2 ** 64}]", "sweep.seeds: "),
]

BAD_METHOD_PARAMS = [
    (["--method", "srste", "method.params.decay=nan"], "method.params.decay: "),
    (["--method", "srste", "method.params.decay=-1"], "method.params.decay: "),
    (["--method", "bimask", "method.params.iter=0"], "method.params.iter: must be at least 1"),
    (["--method", "bimask", "method.params.greedy_num=0"], "method.params.greedy_num: "),
    (["--method", "bimask", "method.params.seed=-1"], "method.params.seed: "),
    (["--method", "bame", "method.params.interval=0"], "method.params.interval: "),
    (["--method", "bame", "method.params.fraction=.inf"], "method.params.fraction: "),
    (["--method", "bame", "method.params.osc_decay=nan"], "method.params.osc_decay: "),
    (["--method", "bame", "method.params.freeze_threshold=0"], "method.params.freeze_threshold: "),
    (["--method", "transposable", "method.params.mask_interval=0"], "method.params.mask_interval: "),
    (["--method", "transposable", "method.params.decay=inf"], "method.params.decay: "),
    (["--method", "unstructured", "method.params.start=-0.1"], "method.params.start: "),
    (["--method", "unstructured", "method.params.interval=0"], "method.params.interval: "),
    (["--method", "pgf", "method.params.schedule=sdfg"], "method.params.schedule: "),
    (["--method", "pgf", "method.params.decay=cosine"], "method.params.decay: "),
    (["--method", "pgf", "method.params.decay_coef=0"], "method.params.decay_coef: "),
    (["--method", "pgf", "method.params.dense=1.5"], "method.params.dense: "),
    (["--method", "pgf", "method.params.dense=0.6", "method.params.fine_tune=0.6"], "method.params.fine_tune: "),
    (["--method", "sste", "method.params.mvue_dw=3"], "method.params.mvue_dw: "),
    (["--method", "maskdecay", "method.params.alpha=-1e-4"], "method.params.alpha: "),
    (["--method", "maskdecay", "method.params.dense_finetune=1.5"], "method.params.dense_finetune: "),
    (["--method", "step", "optim.name=adamw", "method.params.window=0"], "method.params.window: "),
    (["--method", "step", "optim.name=adamw", "method.params.threshold=0"], "method.params.threshold: "),
    (["--method", "step", "optim.name=adamw", "method.params.t_max=nan"], "method.params.t_max: "),
]


@pytest.mark.parametrize("override,needle", BAD_VALUES)
def test_bad_values_are_refused_before_the_run_directory_exists(tmp_path, override, needle):
    refused(tmp_path, needle, override)


@pytest.mark.parametrize("args,needle", BAD_METHOD_PARAMS)
def test_bad_method_parameters_are_refused_before_the_run_directory_exists(tmp_path, args, needle):
    refused(tmp_path, needle, *args)


@pytest.mark.parametrize("args,needle", [
    (["optim.lr=nan"], "optim.lr: "),
    ([f"seed={2 ** 64}"], "seed: "),
    (["train.max_steps=0"], "train.max_steps: "),
    (["optim.momentum=1.0"], "optim.momentum: "),
    (["sweep.seeds=[-1]"], "sweep.seeds: "),
    (["sweep.params={srste: {decay: .nan}}"], "method.params.decay: "),
    (["--seeds", "0,-1"], "--seeds: must be in [0, 2**63)"),
    (["--seeds", str(2 ** 64)], "--seeds: "),
])
def test_bad_values_refused_by_compare(tmp_path, args, needle):
    refused(tmp_path, needle, *args, command="compare")


def test_the_message_gives_the_rule_and_the_fix():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["optim.lr=nan"])
    assert str(err.value) == "optim.lr: must be a finite number above 0 (the step size), got nan; e.g. optim.lr=0.1"


def test_seeds_at_the_bounds_are_accepted():
    assert load_spec(None, [f"seed={2 ** 63 - 1}", "sweep.seeds=[0, 1]"]).seed == 2 ** 63 - 1


def test_a_spec_edited_in_code_is_checked_by_validate():
    from nmtrain.experiments.build import validate
    spec = Spec()
    spec.optim.lr = float("nan")
    with pytest.raises(SpecError, match="optim.lr: "):
        validate(spec)


def _numeric_fields(cls, where):
    """Dotted paths of every int or float field (or list or Optional of them) of a dataclass tree."""
    import dataclasses
    import typing
    paths = []
    for name, tp in typing.get_type_hints(cls).items():
        path = name if where == "" else f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            paths += _numeric_fields(tp, path)
            continue
        args = set(typing.get_args(tp)) | {tp}
        args |= {a for arg in list(args) for a in typing.get_args(arg)}
        if args & {int, float}:
            paths.append(path)
    return paths


def _fields_with_a_rule(cls, where):
    """Dotted paths of the fields of ``cls`` that carry their rule (``rules.param(default, rule)``)."""
    import dataclasses
    from nmtrain.experiments.rules import rule_of
    return [f"{where}.{f.name}" for f in dataclasses.fields(cls) if rule_of(f) is not None]


def test_every_numeric_field_has_a_rule():
    from nmtrain.experiments.methods import list_methods
    paths, ruled = _numeric_fields(Spec, ""), set(RULES)
    for cls in list_methods().values():
        paths += _numeric_fields(cls.Params, "method.params")
        ruled |= set(_fields_with_a_rule(cls.Params, "method.params"))
    assert sorted(set(paths) - ruled) == []
    assert sorted(set(RULES) - set(paths)) == []        # no rule for a field that is gone


@pytest.mark.parametrize("density", ["1e-300", "0.9999999999"])
def test_a_density_no_block_can_keep_is_named_as_the_density(density):
    assert_refused(cli.invoke(app, ["diversity", "--density", density]), "--density: ")


# == patterns: ASCII digits ==
# \d and int() take any Unicode decimal digit: '２:４' was 2:4. Numbers a user types are ASCII only.

UNICODE_PATTERNS = ["２:４",                 # fullwidth
                    "٢:٤",                  # Arabic-Indic
                    "۲:۴",                  # extended Arabic-Indic (Persian)
                    "²:⁴",                  # superscripts
                    "2:４",                 # one digit is enough
                    "2:4\u3000"]            # an ideographic space after it


@pytest.mark.parametrize("text", UNICODE_PATTERNS)
def test_parse_pattern_takes_ascii_digits_only(text):
    with pytest.raises(PatternError, match="ASCII digits"):
        parse_pattern(text)


def test_parse_pattern_bounds_the_digits_before_reading_them():
    with pytest.raises(PatternError, match="N and M have at most 7 digits") as caught:
        parse_pattern("1" * 5000 + ":4")        # int() would raise its own ValueError past 4300 digits
    assert len(str(caught.value)) < 200
    assert parse_pattern("0002:0004") == Pattern(2, 4)
    with pytest.raises(PatternError, match="at most 2\\*\\*20") as big:
        Pattern(1, 10 ** 5000)                   # the engine's own constructor, and a readable message
    assert "an integer of about 5001 digits" in str(big.value)


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.randn(8, 8)}, path)
    return path


@pytest.mark.parametrize("text", UNICODE_PATTERNS[:4])
@pytest.mark.parametrize("command", ["prune", "train", "train-override", "diversity", "compare"])
def test_every_command_refuses_unicode_digits_in_a_pattern(tmp_path, small_model, command, text):
    out = tmp_path / "out"
    args = {"prune": ["prune", str(small_model), "-o", str(out), "--pattern", text],
            "train": ["train", *QUICK, "--out", str(out), "--pattern", text],
            "train-override": ["train", *QUICK, "--out", str(out), f"sparsity.pattern={text}"],
            "diversity": ["diversity", "-p", text],
            "compare": ["compare", *QUICK, "--out", str(out), "--methods", "srste", "--patterns", f"2:4,{text}"]}
    before = snapshot(tmp_path)
    result = cli.invoke(app, args[command])
    assert_refused(result, "is not of the form N:M or N:M-T with ASCII digits", before, snapshot(tmp_path))
    assert {"train": "--pattern: ", "train-override": "sparsity.pattern: ",
            "diversity": "--pattern: ", "compare": "--patterns / sweep.patterns: "}.get(command, "") in result.stderr


@pytest.mark.parametrize("shape", ["８x８", "8x８", "٨x٨", "8x8\u3000"])
def test_diversity_shape_takes_ascii_digits_only(shape):
    assert_refused(cli.invoke(app, ["diversity", "--shape", shape]), "positive ASCII sizes")


@pytest.mark.parametrize("seeds", ["０,1", "1,٢", "1" * 19, "1" * 5000])
def test_compare_seeds_take_ascii_digits_only(tmp_path, seeds):
    out = tmp_path / "out"
    result = cli.invoke(app, ["compare", *QUICK, "--out", str(out), "--methods", "srste", "--patterns", "2:4",
                              "--seeds", seeds])
    assert_refused(result, "--seeds: give comma-separated integers of at most 18 ASCII digits")
    assert not out.exists() and len(result.stderr) < 300


def test_huge_pattern_digits_in_train_are_one_line(tmp_path):
    out = tmp_path / "run"
    for args in (["--pattern", "7" * 5000 + ":8"], ["sparsity.pattern=2:" + "4" * 5000]):
        result = quick_train(out, *args)
        assert_refused(result, "N and M have at most 7 digits")
        assert not out.exists() and len(result.stderr) < 300
