"""`nmtrain compare` in-process on synthetic data: a grid, one table, CSV, JSON and PNG."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from nmtrain.cli.main import app
from nmtrain.experiments.accel import AccelFallbackWarning
from nmtrain.experiments.methods import get_method

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
    assert [c.spec.method.params for c in cells] == [{"mask_interval": 1}, {"decay": 0.001}, {}]


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


def test_compare_with_seeds_runs_every_cell_per_seed_and_reports_mean_std(tmp_path):
    from nmtrain.experiments.compare import verdict

    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1",
                                 "data.batch_size=64", "--methods", "dense,srste", "--patterns", "2:4,1:4",
                                 "--seeds", "0,1,2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    data = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["pattern"]) for r in data] == [("dense", "dense"), ("srste", "2:4"), ("srste", "1:4")]
    for row in data:
        assert row["seeds"] == [0, 1, 2] and row["n_seeds"] == 3
        assert {"method", "pattern", "seeds", "final_accuracy_mean", "final_accuracy_std", "flops_ratio",
                "runs"} <= set(row)
        accs = [run["final_accuracy"] for run in row["runs"]]
        assert [run["seed"] for run in row["runs"]] == [0, 1, 2]
        assert row["final_accuracy_mean"] == pytest.approx(sum(accs) / 3)
        m = row["final_accuracy_mean"]
        assert row["final_accuracy_std"] == pytest.approx((sum((a - m) ** 2 for a in accs) / 2) ** 0.5)
        for run in row["runs"]:       # per-seed run directories are ordinary run directories
            summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
            assert summary["seed"] == run["seed"] and summary["final_accuracy"] == run["final_accuracy"]
    dense = data[0]
    assert dense["vs_dense"] is None and dense["flops_ratio"] == 1.0
    best = [r for r in data if r["is_best"]]
    assert len(best) == 1 and best[0]["vs_best"] is None
    for row in data:
        if row is not best[0]:
            test = row["vs_best"]
            assert test["seeds"] == [0, 1, 2] and isinstance(test["within_noise"], bool)
            assert test["difference"] == pytest.approx(row["final_accuracy_mean"] - best[0]["final_accuracy_mean"])
    # the seeds differ: different inits and data orders give different accuracies somewhere
    assert any(len({run["final_accuracy"] for run in row["runs"]}) > 1 for row in data)
    assert (out / "srste-2of4" / "seed1" / "model.pt").is_file()
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert rows[1]["seeds"] == "0 1 2" and rows[1]["n_seeds"] == "3"
    assert float(rows[1]["final_accuracy_mean"]) == pytest.approx(data[1]["final_accuracy_mean"])
    assert rows[0]["vs_dense"] == "dense" and rows[1]["vs_dense"] == verdict(data[1]["vs_dense"], "–")
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "±" in result.stdout and "srste" in result.stdout


def test_sweep_seeds_in_the_spec_and_bad_seeds_refused_before_any_run(tmp_path):
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import load_spec

    spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}", "sweep.seeds=[3, 4]"])
    cells = grid(spec, ["dense", "srste"], ["2:4"], spec.sweep.seeds)
    assert [(c.spec.method.name, c.spec.seed, c.spec.out) for c in cells] == [
        ("dense", 3, str(tmp_path / "dense" / "seed3")), ("dense", 4, str(tmp_path / "dense" / "seed4")),
        ("srste", 3, str(tmp_path / "srste-2of4" / "seed3")), ("srste", 4, str(tmp_path / "srste-2of4" / "seed4"))]
    for seeds, needle in (("0,0", "twice"), ("0,x", "--seeds"), ("-1", "--seeds: must be in [0, 2**63)")):
        bad = runner.invoke(app, ["compare", "data.dataset=synthetic", "--methods", "dense", "--patterns", "2:4",
                                  "--seeds", seeds, "--out", str(tmp_path / "bad"), "--no-progress"])
        assert bad.exit_code == 2 and needle in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()


def test_aggregate_marks_within_noise_with_a_paired_test():
    from nmtrain.experiments.compare import aggregate, verdict

    def run(method, seed, acc):
        # a run records no pattern exactly when its method masks nothing
        pattern = "2:4" if get_method(method).caps.sparse else "dense"
        return {"method": method, "pattern": pattern, "density": 1.0,
                "final_accuracy": acc, "best_accuracy": acc, "epochs": 1, "seed": seed, "flops_ratio": 1.0,
                "wall_seconds": 1.0, "mask_change_rate": None, "run_dir": "x", "accel": "none"}

    rows = [run("dense", s, a) for s, a in ((0, 90.0), (1, 89.0), (2, 91.0))]
    rows += [run("srste", s, a) for s, a in ((0, 89.0), (1, 88.1), (2, 89.9))]      # 1 point below on each seed
    rows += [run("bimask", s, a) for s, a in ((0, 90.3), (1, 88.7), (2, 90.9))]     # +0.3, -0.3, -0.1: noise
    cells = aggregate(rows)
    by = {c["method"]: c for c in cells}
    assert by["dense"]["is_best"] and by["dense"]["vs_best"] is None
    assert by["srste"]["vs_dense"]["within_noise"] is False and by["srste"]["vs_dense"]["difference"] < 0
    assert by["bimask"]["vs_dense"]["within_noise"] is True
    assert verdict(by["bimask"]["vs_dense"], "–") == "within noise"
    assert verdict(by["srste"]["vs_dense"], "–").startswith("below (-1.00, p=")
    assert verdict(None, "best") == "best"


def test_transposable_patterns_are_cells_only_for_methods_that_take_them(tmp_path):
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import SpecError, load_spec

    spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}"])
    cells = grid(spec, ["dense", "srste", "transposable"], ["2:4", "4:8-T"])
    assert [(c.spec.method.name, c.spec.sparsity.pattern, c.spec.sparsity.transposable) for c in cells] == [
        ("dense", "2:4", False), ("srste", "2:4", False), ("transposable", "2:4", False),
        ("transposable", "4:8", True)]
    with pytest.raises(SpecError, match="srste takes no transposable"):
        grid(spec, ["srste"], ["4:8-T"])


def test_a_seeded_grid_with_transposable_cells_plots_the_change_rate_per_recompute(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1",
                                 "data.batch_size=64", "--methods", "transposable", "--patterns", "2:4,1:4",
                                 "--seeds", "0,1", "sweep.params={transposable: {mask_interval: 2}}",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert (out / "mask_change.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from nmtrain.experiments.compare import recompute_series

    series = recompute_series(json.loads((out / "compare.json").read_text()))
    assert set(series) == {"transposable 2:4-T", "transposable 1:4-T"}
    for runs in series.values():
        assert [seed for seed, _ in runs] == [0, 1]
        assert [step for step, _ in runs[0][1]] == [2, 4, 6]        # 8 steps, recomputed every 2


def test_reuse_reads_finished_cells_of_the_same_spec_and_trains_the_rest(tmp_path):
    out = tmp_path / "cmp"
    base = ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1", "data.batch_size=64",
            "--patterns", "2:4", "--seeds", "0,1", "--out", str(out), "--no-progress"]
    first = runner.invoke(app, base + ["--methods", "srste"])            # a part of the grid, run first
    assert first.exit_code == 0, first.stderr + first.stdout
    model = out / "srste-2of4" / "seed1" / "model.pt"
    stamp = model.stat().st_mtime_ns
    # a run written before data.image_size/mean/std existed holds the same spec: they are at their defaults
    config = out / "srste-2of4" / "seed1" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    assert [saved["data"].pop(k) for k in ("image_size", "mean", "std")] == [None, None, None]
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    full = runner.invoke(app, base + ["--methods", "dense,srste", "--reuse"])
    assert full.exit_code == 0, full.stderr + full.stdout
    assert model.stat().st_mtime_ns == stamp and "reusing the finished run" in full.stdout
    data = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["n_seeds"]) for r in data] == [("dense", 2), ("srste", 2)]
    before = json.loads((out / "srste-2of4" / "seed1" / "summary.json").read_text())
    assert data[1]["runs"][1]["final_accuracy"] == before["final_accuracy"]
    # another spec in the same directories is not silently taken for the same runs
    changed = runner.invoke(app, base + ["--methods", "srste", "--reuse", "optim.lr=0.01"])
    assert changed.exit_code == 2 and "already holds a run" in changed.stderr
    both = runner.invoke(app, base + ["--methods", "srste", "--reuse", "--overwrite"])
    assert both.exit_code == 2 and "--reuse and --overwrite" in both.stderr


def test_a_method_variant_runs_beside_the_method_with_its_own_parameters(tmp_path):
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import SpecError, load_spec

    spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}",
                            "sweep.params={'bimask:local': {search: local}}"])
    cells = grid(spec, ["bimask", "bimask:local"], ["2:4"])
    assert [(c.label, c.spec.method.name, c.spec.method.params, c.spec.out) for c in cells] == [
        ("bimask", "bimask", {}, str(tmp_path / "bimask-2of4")),
        ("bimask:local", "bimask", {"search": "local"}, str(tmp_path / "bimask-local-2of4"))]
    with pytest.raises(SpecError, match="variant 'srste:x'"):
        grid(spec, ["srste:x"], ["2:4"])
    with pytest.raises(SpecError, match="a variant is method:name"):
        grid(spec, ["bimask:"], ["2:4"])
    with pytest.raises(SpecError, match="listed twice"):
        grid(spec, ["srste", "srste"], ["2:4"])
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "data.dataset=synthetic", "model.name=mlp", "train.epochs=1",
                                 "data.batch_size=64", "--methods", "bimask,bimask:local", "--patterns", "1:4",
                                 "--seeds", "0,1", "sweep.params={'bimask:local': {search: local}}",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    data = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in data] == ["bimask", "bimask:local"]
    config = (out / "bimask-local-1of4" / "seed1" / "config.yaml").read_text()
    assert "search: local" in config


def test_the_plot_legend_names_each_pattern_with_its_density():
    from nmtrain.experiments.compare import _density_label
    assert _density_label("2:4") == "2:4 (density 0.50)"
    assert _density_label("1:8") == "1:8 (density 0.12)"
    assert _density_label("dense") == "dense"


def test_the_grid_line_names_each_cell_once_with_its_density():
    from nmtrain.cli.compare import _grid_line
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import load_spec
    spec = load_spec(None, ["train.epochs=1"])
    cells = grid(spec, ["dense", "fixed"], ["2:4", "4:8-T"], [0, 1])
    assert _grid_line(cells, [0, 1]) == ("comparing 6 runs (3 cells x seeds 0,1): dense, fixed 2:4 (density 0.50), "
                                         "fixed 4:8-T (density 0.50)")


def test_sweep_patterns_of_gives_a_method_its_own_patterns(tmp_path):
    from nmtrain.experiments.compare import grid
    from nmtrain.experiments.spec import load_spec

    spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}",
                            "sweep.patterns_of={transposable: ['1:8']}"])
    cells = grid(spec, ["dense", "srste", "transposable"], ["2:4", "1:4"], None, spec.sweep.patterns_of)
    got = [(c.label, c.spec.sparsity.pattern) for c in cells]
    assert got == [("dense", "2:4"), ("srste", "2:4"), ("srste", "1:4"), ("transposable", "1:8")]
    for bad, needle in [("{bimask: ['1:8']}", "sweep.patterns_of: 'bimask' is not one of"),
                        ("{srste: '1:8'}", "sweep.patterns_of.srste: give a list"),
                        ("{srste: ['5:4']}", "5:4")]:
        spec = load_spec(None, ["data.dataset=synthetic", f"out={tmp_path}", f"sweep.patterns_of={bad}"])
        with pytest.raises(Exception) as exc:
            grid(spec, ["dense", "srste"], ["2:4"], None, spec.sweep.patterns_of)
        assert needle in str(exc.value)
