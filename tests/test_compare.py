"""`nmtrain compare` in-process on synthetic data: a grid, one table, CSV, JSON and PNG."""

import csv
import json

import pytest
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments.accel import AccelFallbackWarning

runner = CliRunner()


def test_compare_runs_the_grid_and_writes_table_csv_json_png(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1",
                                 "data.batch_size=64", "--methods", "dense,srste,bimask", "--patterns", "2:4,1:4",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["pattern"]) for r in rows] == [
        ("dense", "dense"), ("srste", "2:4"), ("srste", "1:4"), ("bimask", "2:4"), ("bimask", "1:4")]
    data = json.loads((out / "compare.json").read_text())
    by = {(r["method"], r["pattern"]): r for r in data}
    assert by[("dense", "dense")]["flops_ratio"] == 1.0
    # fewer kept weights, fewer training MACs; Bi-Mask's sparse backward-data beats SR-STE's dense one
    assert by[("srste", "1:4")]["flops_ratio"] < by[("srste", "2:4")]["flops_ratio"] < 1.0
    assert by[("bimask", "2:4")]["flops_ratio"] < by[("srste", "2:4")]["flops_ratio"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in data:
        assert (tmp_path / "cmp" / r["run_dir"].split("/")[-1] / "summary.json").is_file()
    assert "bimask" in result.stdout and "1:4" in result.stdout


def test_compare_needs_a_grid_and_checks_it_first(tmp_path):
    result = runner.invoke(app, ["compare", "data.dataset=synthetic", "--out", str(tmp_path / "x"),
                                 "sweep.methods=[]", "--no-progress"])
    assert result.exit_code == 2 and "sweep" in result.stderr
    bad = runner.invoke(app, ["compare", "data.dataset=synthetic", "--methods", "srste,magic", "--patterns", "2:4",
                              "--out", str(tmp_path / "y"), "--no-progress"])
    assert bad.exit_code == 2 and "magic" in bad.stderr and not (tmp_path / "y").exists()


def test_sweep_params_set_each_methods_parameters(tmp_path):
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import load_spec

    spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}",
                            "sweep.params={transposable: {mask_interval: 1}, srste: {decay: 0.001}}"])
    cells = grid(spec, ["transposable", "srste", "bimask"], ["2:4"])
    assert [c.method.params for c in cells] == [{"mask_interval": 1}, {"decay": 0.001}, {}]


def test_a_spec_with_accel_runs_it_where_the_cell_can_and_masked_dense_elsewhere(tmp_path):
    # accel semi_structured needs transposable 2:4-T: the dense baseline and the 1:4-T cell of the same
    # grid run with accel none instead of the whole grid being refused; the CSV says which cell ran which.
    out = tmp_path / "cmp"
    with pytest.warns(AccelFallbackWarning, match="no CUDA"):         # this CPU: the 2:4-T cell falls back
        result = runner.invoke(app, ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1",
                                     "accel=semi_structured", "device=cpu", "--methods", "dense,transposable",
                                     "--patterns", "2:4-T,1:4-T", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [(r["method"], r["pattern"], r["accel"]) for r in rows] == [
        ("dense", "dense", "none"), ("transposable", "2:4-T", "semi_structured"), ("transposable", "1:4-T", "none")]
    assert "semi_structured" in result.stdout                     # the table's accel column
    summary = json.loads((out / "transposable-2of4T" / "summary.json").read_text())
    assert summary["accel"]["mode"] == "semi_structured" and summary["accel"]["fallback"]   # CPU: masked dense
    bad = runner.invoke(app, ["compare", "data.dataset=synthetic", "accel=turbo", "--methods", "dense",
                              "--patterns", "2:4", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert bad.exit_code == 2 and "accel: 'turbo' is unknown" in bad.stderr
