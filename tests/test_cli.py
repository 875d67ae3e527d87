"""The CLI, run in-process: prune and diversity end to end, bad input, planned commands."""

import json
import pickle

import pytest
import torch

from nmtrain.sparsity import Pattern, nm_violation

from helpers import run_cli


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3)           # C_in=3: skipped for M=4
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 6)              # out=6: skipped for -T, fine for row-wise


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(_Net().state_dict(), path)
    return path


@pytest.mark.parametrize("pattern,extra", [("2:4", []), ("1:4", []), ("4:8", ["--layout", "flatten"]),
                                           ("2:4", ["--transposable"]), ("2:4-T", ["--solver", "approx"]),
                                           ("4:8-T", ["--solver", "flow"]), ("2:4-T", ["--solver", "enumerate"])])
def test_prune_writes_a_valid_state_dict(ckpt, tmp_path, pattern, extra):
    out = tmp_path / "pruned.pt"
    report = tmp_path / "report.json"
    result = run_cli("prune", ckpt, "-o", out, "--pattern", pattern, "--report", report, *extra)
    assert result.exit_code == 0, result.stderr
    before = torch.load(ckpt, weights_only=True)
    after = torch.load(out, weights_only=True)
    assert list(after) == list(before)
    rep = json.loads(report.read_text())
    pat = Pattern(int(rep["pattern"].split(":")[0]), int(rep["pattern"].split(":")[1].split("-")[0]),
                  rep["pattern"].endswith("-T"))
    pruned = {row["name"] for row in rep["layers"]}
    assert pruned and "stem.weight" not in pruned and "stem.weight" in rep["skipped"]
    for name, value in after.items():
        if name in pruned:
            assert nm_violation(value, pat, rep["layout"]) is None
            kept = value != 0
            assert torch.equal(value[kept], before[name][kept])      # kept weights untouched
            assert int(kept.sum()) == value.numel() * pat.n // pat.m
        else:
            assert torch.equal(value, before[name])                  # everything else unchanged
    for row in rep["layers"]:
        assert row["valid"] and 0 < row["kept_share"] <= row["unstructured_share"] <= 1
    assert "density" in result.stdout and f"{pat.density:.2f}" in result.stdout


def test_prune_include_exclude(ckpt, tmp_path):
    out = tmp_path / "p.pt"
    result = run_cli("prune", ckpt, "-o", out, "--pattern", "2:4", "--include", "fc.*", "--include", "conv.*",
                  "--exclude", "conv.*", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in rep["layers"]] == ["fc.weight"]


def test_prune_accepts_a_run_directory(ckpt, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(ckpt.read_bytes())
    assert run_cli("prune", run, "-o", tmp_path / "p.pt", "--pattern", "2:4").exit_code == 0


def _bad_pickle(path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path.write_bytes(pickle.dumps({"w": Evil()}))


@pytest.mark.parametrize("case,needle", [
    ("5:4", "smaller than M"), ("0:4", "at least 1"), ("two:four", "form N:M"),
    ("missing", "does not exist"), ("corrupt", "not a readable PyTorch file"), ("truncated", "not a readable"),
    ("notdict", "not a state_dict"), ("nested", "not a plain tensor state_dict"), ("code", "refused"),
    ("solver", "--solver 'magic' is unknown"), ("layout", "--layout 'nchw' is unknown"),
    ("width8", "in_features=8 is not a multiple of M=3"), ("include", "matches no tensor"),
    ("include_misfit", "stem.weight (8, 3, 3, 3) cannot hold 2:4"),
    ("nan", "fc.weight has 2 NaN/Inf entries"),
])
def test_prune_bad_input_is_one_line_exit_2_and_writes_nothing(ckpt, tmp_path, case, needle):
    src, pattern, extra = ckpt, "2:4", []
    if case in ("5:4", "0:4", "two:four"):
        pattern = case
    elif case == "missing":
        src = tmp_path / "nope.pt"
    elif case == "corrupt":
        src = tmp_path / "bad.pt"
        src.write_bytes(b"this is not a checkpoint")
    elif case == "truncated":
        src = tmp_path / "trunc.pt"
        src.write_bytes(ckpt.read_bytes()[:200])
    elif case == "notdict":
        src = tmp_path / "t.pt"
        torch.save(torch.zeros(3), src)
    elif case == "nested":
        src = tmp_path / "n.pt"
        torch.save({"model": {"w": torch.zeros(2)}}, src)
    elif case == "code":
        src = tmp_path / "evil.pt"
        _bad_pickle(src)
    elif case == "solver":
        extra = ["--transposable", "--solver", "magic"]
    elif case == "layout":
        extra = ["--layout", "nchw"]
    elif case == "width8":
        src = tmp_path / "w8.pt"
        torch.save({"fc.weight": torch.randn(4, 8)}, src)
        pattern = "2:3"
    elif case == "include":
        extra = ["--include", "nothing*"]
    elif case == "include_misfit":
        extra = ["--include", "stem.*"]
    elif case == "nan":
        src = tmp_path / "nan.pt"
        w = torch.randn(8, 8)
        w[1, 2], w[3, 4] = float("nan"), float("inf")
        torch.save({"fc.weight": w}, src)
        extra = ["--transposable"]
    out = tmp_path / "out.pt"
    # the input checks are about layers training's rule keeps dense (a lone fc, the stem): prune them all
    result = run_cli("prune", src, "-o", out, "--pattern", pattern, "--prune-first", "--prune-last",
                  *extra)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.glob(".out.pt.*")) == []


def test_diversity_json_and_table():
    result = run_cli("diversity", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["pattern"] for r in rows] == ["unstructured", "4:8", "2:4", "4:8-T", "1:2", "2:4-T", "1:2-T"]
    by = {r["pattern"]: r for r in rows}
    assert by["2:4-T"]["count"] == str(90 ** 4) and by["4:8-T"]["count"] == "116963796250"
    assert all(r["exact"] for r in rows)
    table = run_cli("diversity", "--shape", "8x16", "--density", "0.25", "--pattern", "1:4", "--pattern", "1:4-T",
                 "--pattern", "unstructured")
    assert table.exit_code == 0
    assert table.stdout.index("unstructured") < table.stdout.index("1:4-T")


@pytest.mark.parametrize("args,needle", [(["--shape", "8by8"], "--shape"), (["--density", "1.5"], "--density"),
                                         (["--pattern", "2:3"], "not a multiple of M=3"),
                                         (["--pattern", "4:2"], "smaller than M")])
def test_diversity_bad_input(args, needle):
    result = run_cli("diversity", *args)
    assert result.exit_code == 2 and needle in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("command,options", [
    ("adaprune", ["--pattern", "--transposable", "--calib-samples", "--iters", "--batch", "--sequential", "--spec",
                  "--out", "--overwrite"]),
    ("convert", ["--to", "--out", "--pattern", "--layout"])])
def test_issue5_commands_show_options_and_refuse_an_empty_directory(command, options, tmp_path):
    help_text = run_cli(command, "--help").stdout
    assert all(option in help_text for option in options)
    args = {"adaprune": [tmp_path, "--pattern", "2:4"], "convert": [tmp_path, "--to", "dense"]}[command]
    result = run_cli(command, *args)
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_prune_ignores_non_finite_values_in_a_layer_it_skips(tmp_path):
    # NaN/Inf only matter where a mask is computed: a tensor left dense (here C_in=3, no 2:4 groups) is
    # copied as it is, and the layer that is pruned is pruned.
    stem = torch.randn(8, 3, 3, 3)
    stem[0, 0, 0, 0] = float("nan")
    torch.save({"stem.weight": stem, "fc.weight": torch.randn(8, 8)}, tmp_path / "m.pt")
    result = run_cli("prune", tmp_path / "m.pt", "-o", tmp_path / "out.pt", "--pattern", "2:4",
                  "--prune-first", "--prune-last")
    assert result.exit_code == 0, result.stderr + result.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.isnan(out["stem.weight"][0, 0, 0, 0])
    assert torch.equal(out["stem.weight"].nan_to_num(), stem.nan_to_num())
    assert int((out["fc.weight"] != 0).sum()) == 32
