"""Hostile input, class 4: bounded work. One bounded YAML reader, and one table of limits for `diversity`:
a refusal, or a bounded answer, comes at once."""

import json
import math
import os
import re
import time

import pytest
import torch

from nmtrain.cli.main import app
from nmtrain.experiments.spec import SpecError, load_spec
from nmtrain.experiments.yamlfile import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES, read_yaml
from nmtrain.sparsity import Pattern
from nmtrain.sparsity import diversity as div

from helpers import assert_refused, cli, resume, snapshot
from hostile_cases import refused


# == class 4: bounded work (YAML) ==
# Every YAML nmtrain reads goes through one reader (experiments/yamlfile.py `load_yaml`): a regular UTF-8 text
# file of bounded size, no key twice, and a bounded number of values and levels with aliases expanded.

def _laughs(levels=9, indent="    "):
    """A "billion laughs": level k lists level k-1 nine times, so the last level expands to 9**levels values."""
    lines = [f"{indent}a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"{indent}a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


def _refused_spec(tmp_path, path, needle, command="train"):
    """``nmtrain COMMAND SPEC`` is refused, and nothing under tmp_path changes."""
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = cli.invoke(app, [command, str(path), "--out", str(out), "--no-progress"])
    assert_refused(result, needle, before, snapshot(tmp_path))
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_alias_bomb_under_sweep_params_is_refused_before_anything_is_written(tmp_path, command):
    spec = tmp_path / "bomb.yaml"
    spec.write_text("sweep:\n  methods: [dense]\n  patterns: ['2:4']\n  params:\n" + _laughs())
    _refused_spec(tmp_path, spec, f"SPEC: {spec}: more than {MAX_YAML_VALUES:,} values once its aliases", command)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_alias_bomb_in_an_override_is_refused(tmp_path, command):
    flow = "{" + _laughs(indent="").replace("\n", ", ").rstrip(", ") + "}"
    refused(tmp_path, "values once its aliases (*name) are expanded", f"sweep.params={flow}", command=command)


@pytest.mark.parametrize("text", [
    "[" * (MAX_YAML_DEPTH + 5) + "]" * (MAX_YAML_DEPTH + 5),        # nested as written
    "{a: &a [*a]}",                                                 # an alias inside itself: endless
    "{" + ", ".join(f"a{k}: &a{k} [*a{k - 1}]" for k in range(1, 60)).replace("[*a0]", "[1]") + "}",  # by aliases
], ids=["written", "self-alias", "alias-chain"])
def test_nesting_is_bounded_also_through_aliases(tmp_path, text):
    refused(tmp_path, f"nested more than {MAX_YAML_DEPTH} levels deep", f"sweep.params={text}")


def test_small_anchors_aliases_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("optim: &o {lr: 0.05, momentum: 0.8}\n"
                    "sweep:\n  params:\n    srste: &p {decay: 0.001}\n    'srste:b': *p\n"
                    "    'srste:c':\n      <<: *p\n      decay: 0.002\n")
    spec = load_spec(path)
    assert spec.optim.lr == 0.05 and spec.sweep.params["srste:b"] == {"decay": 0.001}
    assert spec.sweep.params["srste:c"] == {"decay": 0.002}      # a merged key may be overridden


@pytest.mark.parametrize("text,needle", [
    ("seed: 1\nname: x\nseed: 2\n", "key 'seed' appears twice (lines 1 and 3)"),
    ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "key 'optim.lr' appears twice (lines 2 and 4)"),
    ("sweep:\n  params:\n    srste: {decay: 0.1}\n    bimask: {}\n    srste: {}\n",
     "key 'sweep.params.srste' appears twice (lines 3 and 5)"),
])
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, needle):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(f"SPEC: {path}: {needle}")):
        read_yaml(path)
    _refused_spec(tmp_path, path, needle)


def test_duplicate_keys_in_an_override_value(tmp_path):
    refused(tmp_path, "key 'decay' appears twice", "--method", "srste", "method.params={decay: 0.1, decay: 0.2}")


def test_duplicate_key_in_a_saved_config_refuses_the_resume(finished_run):
    config = finished_run / "config.yaml"
    config.write_text(config.read_text() + "seed: 7\n")
    before = snapshot(finished_run)
    result = resume(finished_run)
    assert_refused(result, f"--resume: {config}: key 'seed' appears twice", before, snapshot(finished_run))


def _binary(tmp_path, kind):
    path = tmp_path / f"{kind}.yaml"
    if kind == "bytes":
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "torch":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "latin1":
        path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    elif kind == "nul":
        path.write_bytes(b"name: x\x00y\n")
    return path


@pytest.mark.parametrize("kind", ["bytes", "torch", "latin1", "nul"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_binary_garbage_as_the_spec(tmp_path, kind, command):
    path = _binary(tmp_path, kind)
    _refused_spec(tmp_path, path, f"SPEC: {path} is not a text YAML file", command)


def test_a_directory_as_the_spec(tmp_path):
    folder = tmp_path / "spec.yaml"
    folder.mkdir()
    _refused_spec(tmp_path, folder, f"SPEC: {folder} is a directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_as_the_spec_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)          # opening it to read would block until a writer comes
    _refused_spec(tmp_path, fifo, f"SPEC: {fifo} is not a regular file")


def test_an_oversized_spec_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n" + "#" * MAX_YAML_BYTES + "\n")
    _refused_spec(tmp_path, path, f"SPEC: {path}: over {MAX_YAML_BYTES >> 10} KiB")


# == class 4: bounded work (diversity) ==
# Every input whose count would take unbounded time or memory is refused up front with the limit named
# (sparsity/diversity.py: MAX_BLOCK_WEIGHTS, MAX_COUNT_DIGITS, EXACT_MAX_M), or answered fast.

FAST_S = 1.0          # a refusal, or a bounded answer, in well under this


def _timed(args):
    start = time.perf_counter()
    result = cli.invoke(app, args)
    return result, time.perf_counter() - start


BLOCK_LIMIT = "--shape: at most 2**20 weights in a block (R x C ≤ 1048576), got "


@pytest.mark.parametrize("shape", ["100000x100000", "1024x1025", "10" + "0" * 29 + "x8", "9" * 5000 + "x8",
                                   "8x" + "1" * 400])
def test_diversity_refuses_a_huge_block_at_once(tmp_path, shape):
    before = snapshot(tmp_path)
    result, took = _timed(["diversity", "--shape", shape])
    assert_refused(result, BLOCK_LIMIT, before, snapshot(tmp_path))
    assert took < FAST_S and len(result.stderr) < 200          # a 5000-digit side is not echoed in full


@pytest.mark.parametrize("args,needle", [
    (["-p", "2:100000"], "--pattern: 2:100000: C=8 is not a multiple of M=100000"),
    (["-p", "1:2000000"], "--pattern: M (group size) must be at most 2**20 = 1048576"),
    (["-p", "9" * 5000 + ":4"], "N and M have at most 7 digits"),
    (["--density", "nan"], "--density: nan must be strictly between 0 and 1"),
    (["--density", "inf"], "--density: inf must be strictly between 0 and 1"),
    (["--density", "0"], "--density: 0.0 must be strictly between 0 and 1"),
    (["--shape", "0x8"], "--shape '0x8' is not of the form RxC"),
    (["--shape", "12x12", "--density", "0.3"], "--density: 0.3 x 144 weights is not a whole number"),
])
def test_diversity_refuses_fast_what_it_cannot_count(args, needle):
    result, took = _timed(["diversity", *args])
    assert_refused(result, needle)
    assert took < FAST_S


def test_leading_zeros_are_no_digits_of_the_value():
    # int() refuses a string of more than 4300 characters, zeros or not: they are stripped first
    result = cli.invoke(app, ["diversity", "-p", "2:" + "0" * 5000 + "4", "--shape", "0" * 5000 + "8x8", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["pattern"] == "2:4"


@pytest.mark.parametrize("args", [
    ["--shape", "1024x1024"],                                      # every family of the largest block
    ["--shape", "1x1048576"],                                      # 2**19 candidate group sizes
    ["--shape", "100x100", "-p", "50:100-T"],                      # A(100, 50): the estimate, in log-gamma
    ["--shape", "1024x1024", "-p", "512:1024-T", "-p", "unstructured"],
    ["--shape", "32x32", "-p", "16:32-T", "-p", "8:16-T"],        # M above EXACT_MAX_M: estimated, not counted
])
def test_diversity_answers_the_largest_allowed_cases_fast(args):
    result, took = _timed(["diversity", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert took < FAST_S and rows
    for row in rows:
        assert math.isfinite(row["log10"]) and row["log10"] > 0
        if row["count"] is not None:                                # a count is exact and within the cap
            assert row["exact"] and len(row["count"]) <= div.MAX_COUNT_DIGITS
        elif row["exact"]:                                          # over the cap: log10 only
            assert row["log10"] >= div.MAX_COUNT_DIGITS - 1


def test_diversity_counts_up_to_the_digit_cap_and_gives_log10_beyond():
    near = json.loads(cli.invoke(app, ["diversity", "--shape", "1x14280", "-p", "unstructured", "--json"]).stdout)
    assert near[0]["count"] == str(math.comb(14280, 7140)) and len(near[0]["count"]) == 4297
    over = json.loads(cli.invoke(app, ["diversity", "--shape", "1x16384", "-p", "unstructured", "--json"]).stdout)
    assert over[0]["count"] is None and over[0]["exact"]
    assert over[0]["log10"] == pytest.approx(math.log10(math.comb(16384, 8192)), rel=1e-12)
    table = cli.invoke(app, ["diversity", "--shape", "1x16384", "-p", "unstructured"])
    assert table.exit_code == 0 and "4,930 digits, not shown" in table.stdout
    assert "counts of more than 4300 digits are not computed" in table.stdout


@pytest.mark.parametrize("call", [
    lambda: div.rank(10 ** 30, 8, 0.5),
    lambda: div.rank(8, 8, float("nan")),
    lambda: div.pattern_diversity(10 ** 5000, 8, Pattern(2, 4)),
    lambda: div.unstructured_diversity(8, 10 ** 6, 0.5),
    lambda: div.families(1 << 21, 1, 0.5),
    lambda: div.transposable_count(32, 16),
])
def test_the_engine_enforces_the_same_limits(call):
    start = time.perf_counter()
    with pytest.raises(div.DiversityError) as caught:
        call()
    assert time.perf_counter() - start < FAST_S
    assert caught.value.field in ("shape", "density", "pattern") and "\n" not in str(caught.value)
    assert len(str(caught.value)) < 200


def test_the_engine_answers_the_worst_allowed_cases_fast():
    start = time.perf_counter()
    assert div.transposable_log10_approx(1024, 512) > 0             # C(2**20, 2**19) in log-gamma
    assert len(div.families(1, 1 << 20, 0.5)) == 20                # M = 2, 4, ..., 2**20
    assert div.unstructured_diversity(1024, 1024, 0.5).count is None
    assert time.perf_counter() - start < FAST_S
    div.transposable_count.cache_clear()
    start = time.perf_counter()
    div.transposable_count(div.EXACT_MAX_M, div.EXACT_MAX_M // 2)   # the slowest exact count allowed
    assert time.perf_counter() - start < 3.0                        # 0.65-0.9 s measured on a busy 2-core machine


def test_the_enumerate_solver_refuses_a_large_tile_without_counting_it():
    from nmtrain.sparsity.solvers.enumerate import enumerate_solver

    start = time.perf_counter()
    with pytest.raises(ValueError, match="8:16-T has more than 5,000 tile masks"):
        enumerate_solver(torch.rand(1, 16, 16), 8)                  # A(16, 8) alone takes seconds
    assert time.perf_counter() - start < FAST_S
