"""The measuring code of the speed benchmarks (their numbers go to the README, so their arithmetic is tested;
the timings themselves are not, as the brief asks): `train_step.held_bytes` against a hand count, and both
scripts end to end on tiny settings."""

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from helpers import ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Handle:                       # what held_bytes reads of a handle: its state
    def state_dict(self):
        return {"masks": {"0": torch.ones(4, 8, dtype=torch.bool)}, "step": 3}


def test_held_bytes_counts_parameters_gradients_state_and_saved_tensors_once():
    bench = _load("train_step")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    bench._loss(model, x, y).backward()
    opt.step()                                           # momentum buffer: 4x8 floats
    got = bench.held_bytes(model, opt, _Handle(), x, y)
    weight = grad = momentum = 4 * 8 * 4
    mask = 4 * 8                                         # bool
    # saved for the backward: x (5x8) by the Linear (not the weight: x needs no gradient); the log-softmax
    # (5x4), which its own backward and the NLL loss's both save (one storage); the targets (5 int64); the
    # NLL loss's total weight (a float32 scalar)
    saved = 5 * 8 * 4 + 5 * 4 * 4 + 5 * 8 + 4
    assert got == weight + grad + momentum + mask + saved


def test_train_step_benchmark_runs_and_writes_memory_ratios(tmp_path, monkeypatch):
    bench = _load("train_step")
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "2", "--methods", "dense,srste", "--out", str(tmp_path)])
    calls = []
    monkeypatch.setattr(bench.nmtrain, "keep_freed_memory", lambda: calls.append(True) or True)
    bench.main()
    written = json.loads((tmp_path / "train_step.json").read_text())
    assert calls == [True] and written["args"]["malloc"] == "keep"     # as `nmtrain train` runs, by default
    assert written["args"]["order"] == "shuffled"                      # a fresh order every round, by default
    rows = {r["method"]: r for r in written["rows"]}
    assert rows["dense"]["memory_vs_dense"] == 1.0
    assert rows["srste"]["memory_vs_dense"] > 1.0        # SR-STE's autograd keeps its mask for the backward
    assert rows["srste"]["flops_ratio"] < 1.0
    # the step's three phases, each timed and held against dense's: dense against itself exactly, and the
    # phases' medians adding up to about the step's (milliseconds, as the step's)
    assert rows["dense"]["phase_vs_dense"] == {"forward": 1.0, "backward": 1.0, "optimizer": 1.0}
    for row in rows.values():
        parts = row["phase_ms"]
        assert set(parts) == {"forward", "backward", "optimizer"} and min(parts.values()) > 0
        assert 0.5 < sum(parts.values()) / row["median_ms"] < 1.5
        assert row["phase_vs_dense"]["backward"] == parts["backward"] / rows["dense"]["phase_ms"]["backward"]


def test_interleaved_rounds_give_no_method_one_place_or_one_neighbour():
    """In a fixed order a step reads what its place in the round gives it (two identical runs, listed right
    after dense and after that, read 1.067x and 1.060x on LeNet-5): each round has its own seeded order."""
    bench = _load("train_step")
    names = ["dense", "fixed", "transposable", "srste"]
    assert bench.round_orders(names, 3, shuffled=False) == [names] * 3
    orders = bench.round_orders(names, 400, shuffled=True)
    assert orders == bench.round_orders(names, 400, shuffled=True)          # seeded: a rerun steps alike
    assert all(sorted(order) == sorted(names) for order in orders)          # every run once a round
    assert len({tuple(order) for order in orders}) == 24                    # every one of the 4! orders comes up
    for name in names:                  # each run in each place a quarter of the rounds (binomial sd 0.022)
        for place in range(len(names)):
            assert 0.17 < sum(order[place] == name for order in orders) / 400 < 0.33
    for name in names[1:]:              # right after dense: 3/4 (dense not last) x 1/3 of the rounds
        after = sum(any(a == "dense" and b == name for a, b in zip(order, order[1:])) for order in orders)
        assert 0.17 < after / 400 < 0.33


def test_runs_of_steps_time_all_but_each_runs_first_step():
    """``--run-length K``: K consecutive steps of each method a round, each run's first untimed (it follows another
    model's step); step by step (K = 1) as before: every step timed after the warm-up rounds."""
    bench = _load("train_step")
    assert bench.run_plan(3) == [[(i, i >= 5)] for i in range(8)]
    plan = bench.run_plan(7, 4)
    # two warm-up rounds (8 steps, none timed), then runs of 4 with 3 timed, the last cut at the 7th timed step
    assert plan == [[(0, False), (1, False), (2, False), (3, False)], [(4, False), (5, False), (6, False), (7, False)],
                    [(8, False), (9, True), (10, True), (11, True)], [(12, False), (13, True), (14, True), (15, True)],
                    [(16, False), (17, True)]]
    for steps, length in [(1, 2), (80, 2), (80, 4), (81, 16), (5, 5)]:
        plan = bench.run_plan(steps, length)
        flat = [i for run in plan for i, _ in run]
        assert flat == list(range(len(flat)))                          # consecutive steps: the batches cycle alike
        assert sum(timed for run in plan for _, timed in run) == steps
        assert all(not run[0][1] and len(run) <= length for run in plan)   # a run's first step never timed


def test_train_step_runs_of_steps_end_to_end(tmp_path, monkeypatch):
    bench = _load("train_step")
    argv = ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8", "--steps", "4", "--blocks", "2",
            "--methods", "dense,fixed", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ["--run-length", "0"])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert refused.value.code == 2 and not (tmp_path / "train_step.json").exists()
    timed = []
    real = bench._time_steps
    monkeypatch.setattr(bench, "_time_steps", lambda runs, *a: timed.append(runs) or real(runs, *a))
    monkeypatch.setattr(sys, "argv", argv + ["--run-length", "3"])
    bench.main()
    written = json.loads((tmp_path / "train_step.json").read_text())
    assert written["args"]["run_length"] == 3
    assert {name: len(run[3]) for name, run in timed[0].items()} == {"dense": 4, "fixed": 4}
    rows = {r["method"]: r for r in written["rows"]}
    assert rows["dense"]["block_ratios"] == [1.0, 1.0] and len(rows["fixed"]["block_ratios"]) == 2


def test_train_step_benchmark_reports_the_spread_of_its_blocks(tmp_path, monkeypatch):
    bench = _load("train_step")
    # by hand: 8 steps in 2 blocks, the method twice dense's time in the first block and equal in the second
    assert bench.block_ratios([2, 2, 2, 2, 1, 1, 1, 1], [1] * 8, 2) == [2.0, 1.0]
    assert bench.block_ratios([1, 1, 1], [1, 1, 1], 4) == []          # fewer steps than blocks: no spread
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "6", "--blocks", "3", "--methods", "dense,srste",
                                      "--out", str(tmp_path)])
    bench.main()
    rows = {r["method"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    assert rows["dense"]["block_ratios"] == [1.0, 1.0, 1.0] and rows["dense"]["block_ratio_sd"] == 0.0
    assert len(rows["srste"]["block_ratios"]) == 3 and rows["srste"]["block_ratio_sd"] >= 0.0


def test_train_step_benchmark_times_compiled_twins_against_compiled_dense(tmp_path, monkeypatch):
    bench = _load("train_step")
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "2", "--methods", "dense,srste,srste:mvue", "--compile",
                                      "--backend", "aot_eager", "--out", str(tmp_path)])
    torch._dynamo.reset()
    try:
        bench.main()
    finally:
        torch._dynamo.reset()
    rows = {r["method"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    # the MVUE weight gradient cannot compile (Method.compile_problem): no compiled twin
    assert set(rows) == {"dense", "srste", "srste:mvue", "dense+compile", "srste+compile"}
    assert rows["dense+compile"]["median_vs_dense"] == 1.0          # compiled rows against compiled dense
    assert rows["srste+compile"]["median_vs_dense"] == pytest.approx(rows["srste+compile"]["median_ms"]
                                                                     / rows["dense+compile"]["median_ms"])
    assert rows["srste+compile"]["flops_ratio"] == rows["srste"]["flops_ratio"]


def test_a_method_that_takes_only_adamw_is_held_against_dense_on_adamw(tmp_path, monkeypatch):
    """Under --optim sgd, STEP trains with AdamW: it is held against a dense twin on AdamW (``dense+adamw``), in
    time and in memory, not against dense on SGD; the SGD methods stay against dense."""
    bench = _load("train_step")
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "2", "--methods", "dense,srste,step", "--out", str(tmp_path)])
    bench.main()
    rows = {r["method"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    assert list(rows) == ["dense", "dense+adamw", "srste", "step"]
    for name, base in (("step", "dense+adamw"), ("srste", "dense"), ("dense+adamw", "dense+adamw")):
        assert rows[name]["median_vs_dense"] == pytest.approx(rows[name]["median_ms"] / rows[base]["median_ms"])
        assert rows[name]["memory_vs_dense"] == pytest.approx(rows[name]["held_bytes"] / rows[base]["held_bytes"])
    assert rows["dense+adamw"]["held_bytes"] > rows["dense"]["held_bytes"]        # AdamW's two moments
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "2", "--methods", "dense,step", "--optim", "adamw",
                                      "--out", str(tmp_path)])
    bench.main()
    rows = {r["method"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    assert list(rows) == ["dense", "step"]                                 # already on AdamW: no twin


def test_train_step_fused_builds_every_optimizer_with_torchs_fused_kernel(tmp_path, monkeypatch):
    """--fused: every run's optimizer, SGD or AdamW (STEP's, and its dense twin's), is torch's fused kernel, as a
    spec's optim.fused: true builds it; the JSON records the flag."""
    bench = _load("train_step")
    built = []
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        original = cls.__init__
        monkeypatch.setattr(cls, "__init__", lambda self, *a, _original=original, **k:
                            built.append((type(self).__name__, k.get("fused"))) or _original(self, *a, **k))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "2", "--methods", "dense,srste,step", "--fused",
                                      "--out", str(tmp_path)])
    bench.main()
    written = json.loads((tmp_path / "train_step.json").read_text())
    assert written["args"]["fused"] is True
    assert [r["method"] for r in written["rows"]] == ["dense", "dense+adamw", "srste", "step"]
    assert sorted(built) == [("AdamW", True)] * 2 + [("SGD", True)] * 2


def test_train_step_denormals_flush_takes_them_as_zero_for_every_run(tmp_path, monkeypatch, capsys):
    """--denormals flush sets the CPU's flush-to-zero modes on every thread before any run is built (and says so in
    the title and the JSON); by default nothing is set. A CPU without the modes is refused in one line, exit 2."""
    bench = _load("train_step")
    calls = []
    monkeypatch.setattr(bench.denormals, "set_flush_denormals", lambda on: calls.append(on))
    argv = ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8", "--steps", "2",
            "--methods", "dense,srste", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert calls == [] and json.loads((tmp_path / "train_step.json").read_text())["args"]["denormals"] == "keep"
    monkeypatch.setattr(sys, "argv", argv + ["--denormals", "flush"])
    bench.main()
    assert calls == [True] and json.loads((tmp_path / "train_step.json").read_text())["args"]["denormals"] == "flush"
    assert "denormals flushed" in capsys.readouterr().out
    monkeypatch.setattr(bench.denormals.platform, "machine", lambda: "aarch64")     # no such modes here
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and calls == [True]
    assert "--denormals flush: nmtrain sets the flush-to-zero modes on x86-64 CPUs only" in capsys.readouterr().err


def test_train_step_times_every_method_against_the_code_before_it(tmp_path, monkeypatch):
    """--before attaches every method a second time through another checkout's nmtrain (here this one): each
    twin is held against dense on its own optimizer, and each method's row gives its time over its twin's
    and whether the two ended with the same weights (the same code: yes)."""
    bench = _load("train_step")
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--image-size", "8", "--batch", "8",
                                      "--steps", "3", "--methods", "dense,srste,step", "--before", str(ROOT),
                                      "--out", str(tmp_path)])
    bench.main()
    written = json.loads((tmp_path / "train_step.json").read_text())
    rows = {r["method"]: r for r in written["rows"]}
    mine = ["dense", "dense+adamw", "srste", "step"]
    assert list(rows) == mine + [name + "@before" for name in mine]
    for name in mine:
        assert rows[name]["vs_before"] == pytest.approx(rows[name]["median_ms"] / rows[name + "@before"]["median_ms"])
        assert rows[name]["same_weights_as_before"] is True
        assert "vs_before" not in rows[name + "@before"]
    for name, base in (("step@before", "dense+adamw"), ("srste@before", "dense"), ("dense@before", "dense")):
        assert rows[name]["median_vs_dense"] == pytest.approx(rows[name]["median_ms"] / rows[base]["median_ms"])
    # net of the control: each method's vs before over its dense's (STEP's: dense on AdamW), the control's own 1
    assert rows["dense"]["net_vs_before"] == 1.0 and rows["dense+adamw"]["net_vs_before"] == 1.0
    for name, base in (("srste", "dense"), ("step", "dense+adamw")):
        assert rows[name]["net_vs_before"] == pytest.approx(rows[name]["vs_before"] / rows[base]["vs_before"])
    assert written["args"]["before"] == str(ROOT)


def test_the_net_of_the_control_takes_out_what_the_run_did_to_both_codes():
    """By hand: the method took twice its twin's time in the first block and its twin's in the second, while the
    code before's dense took dense's time and then twice as long. Per block, the change's net ratio is 2 both
    times (no noise); over the run, the medians' ratio over the control's."""
    bench = _load("train_step")
    model = nn.Linear(2, 2)
    runs = {"m": (model, None, None, [2.0, 2.0, 1.0, 1.0]), "m@before": (model, None, None, [1.0] * 4),
            "dense": (model, None, None, [1.0] * 4), "dense@before": (model, None, None, [1.0, 1.0, 2.0, 2.0])}
    against = bench._against_before(runs, "m", "dense", 2)
    assert against["vs_before"] == 1.5 and against["net_vs_before"] == pytest.approx(1.5 * 1.5)
    assert against["net_vs_before_blocks"] == [2.0, 2.0] and against["net_vs_before_sd"] == 0.0
    assert against["same_weights_as_before"] is True
    assert bench._against_before(runs, "dense@before", "dense", 2) == {}        # a twin has no twin of its own
    assert bench._before_cells(against) == ["1.500", "2.250 ± 0.000", "yes"]
    assert bench._before_cells({}) == ["–", "–", "–"]


def test_the_code_before_is_its_own_package_with_its_own_kernels(tmp_path):
    """The code of --before is imported under another name, its sparsify is its own (not the public name's
    `nmtrain`), and its numba kernels cache apart: a cache made as ``nmtrain`` would carry this code's symbol
    names and be linked to this code's kernels."""
    import nmtrain.experiments.sparsify
    import nmtrain.sparsity.fused as fused

    bench = _load("train_step")
    before = bench.before_package(ROOT)
    assert before.__name__ == "nmtrain_before" and bench.before_package(ROOT) is before
    assert before.experiments.sparsify.sparsify is not nmtrain.experiments.sparsify.sparsify
    if fused.njit is not None:
        theirs = before.sparsity.fused._rank_pass
        assert theirs is not fused._rank_pass
        assert not theirs._cache._cache_path.startswith(str(ROOT))
    other = tmp_path / "other"                  # another checkout's shape: a second code before is refused
    (other / "api").mkdir(parents=True)
    (other / "experiments").mkdir()
    (other / "api" / "__init__.py").write_text("")
    (other / "experiments" / "sparsify.py").write_text("")
    with pytest.raises(RuntimeError, match="nmtrain_before is"):
        bench.before_package(other)
    assert bench.before_package(tmp_path) is None               # nothing of nmtrain there


def test_train_step_refuses_a_before_path_with_no_nmtrain_in_it(tmp_path, monkeypatch, capsys):
    bench = _load("train_step")
    for extra in (["--before", str(tmp_path)], ["--before", str(ROOT), "--compile"]):
        monkeypatch.setattr(sys, "argv", ["train_step.py", "--model", "mlp", "--methods", "dense",
                                          "--out", str(tmp_path / "out")] + extra)
        with pytest.raises(SystemExit) as stop:
            bench.main()
        assert stop.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--before" in message
    assert not (tmp_path / "out").exists()                   # nothing written


def test_masks_benchmark_runs_on_a_small_square_weight(tmp_path, monkeypatch):
    bench = _load("masks")
    monkeypatch.setattr(sys, "argv", ["masks.py", "--sizes", "64", "--no-resnet", "--patterns", "4:8",
                                      "--solvers", "exact,approx", "--flow-tiles", "8", "--out", str(tmp_path)])
    bench.main()
    rows = json.loads((tmp_path / "masks.json").read_text())["rows"]
    solvers = {r["solver"] for r in rows}
    assert {"row-wise top-k (not -T)", "exact", "approx", "flow (networkx)"} <= solvers and "batched" not in solvers
    flow = next(r for r in rows if r["solver"] == "flow (networkx)")
    assert "exact - flow pruned |W| on them: +0.00e+00" in flow["note"]
    assert next(r for r in rows if r["solver"] == "row-wise top-k (not -T)")["note"] == "torch topk"


def test_masks_benchmark_names_the_row_wise_path():
    bench = _load("masks")
    small, large = torch.randn(64, 64), torch.randn(1024, 1025 * 4)      # over fused.MAX_ENTRIES (1M)
    assert bench.rowwise_path(small, 2, 4) == "compiled N:4 kernel"
    assert bench.rowwise_path(small, 4, 8) == bench.rowwise_path(large, 2, 4) == "torch topk"
    assert bench.rowwise_path(torch.randn(16, 8, 5, 5), 2, 4) == "compiled N:4 kernel"   # a conv, as it lies
    conv = torch.randn(16, 8, 5, 5).to(memory_format=torch.channels_last)
    assert bench.rowwise_path(conv, 2, 4) == "compiled N:4 kernel"       # nm_mask serves it on the GEMM view


def test_method_labels_read_their_values_as_the_cli_does():
    bench = _load("train_step")
    assert bench._label_params("transposable:bound_pruned=false") == ("transposable", {"bound_pruned": False})
    assert bench._label_params("step:window=5") == ("step", {"window": 5})
    assert bench._label_params("transposable:decay=0.0") == ("transposable", {"decay": 0.0})
    assert bench._label_params("srste:mvue") == ("srste", {"mvue_dw": True})
    assert bench._label_params("dense") == ("dense", {})


def test_mvue_benchmark_checks_its_pairs_and_writes_their_ratios(tmp_path):
    bench = _load("mvue")
    bench.main(["--linear", "8x64", "--conv", "2x3x8x8,2x3x2x2", "--repeat", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "mvue.json").read_text())["rows"]
    assert [(r["kind"], r["shape"]) for r in rows] == [("draws", "8x16x2"), ("linear", "8x64"), ("conv", "2x3x8x8"),
                                                       ("conv", "2x3x2x2")]
    assert all(r["ratio"] == pytest.approx(r["new_ms"] / r["old_ms"]) for r in rows)


def test_mvue_benchmark_refuses_to_time_a_pair_that_samples_differently(tmp_path, monkeypatch):
    bench = _load("mvue")
    monkeypatch.setattr(bench, "uniforms", lambda shape, generator: torch.zeros(shape))
    with pytest.raises(SystemExit, match="draws"):
        bench.main(["--linear", "8x64", "--conv", "", "--repeat", "1", "--out", str(tmp_path)])


def test_kernels_benchmark_times_each_kernel_against_the_code_before_it(tmp_path, capsys):
    """Every N:4 kernel on a matrix and on an nhwc conv, against --before (here this checkout: the same bits, the
    ratio its two medians'); a --before with no nmtrain in it, or a shape the kernels do not serve, is refused
    before any work, with exit code 2."""
    from nmtrain.sparsity import fused
    if fused.njit is None:
        pytest.skip("numba is not installed")
    bench = _load("kernels")
    threads = torch.get_num_threads()
    rows = bench.main(["--matrices", "16x32", "--convs", "8x8x3x3", "--repeat", "3", "--before", str(ROOT),
                       "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads                   # timed on one thread, then given back
    assert [r["kernel"] for r in rows] == ["masked", "decayed", "soft", "bimask", "conv"]
    for row in rows:
        assert row["same_bits"] is True and row["vs_before"] == pytest.approx(row["us"] / row["before_us"])
        assert row["ns_per_entry"] == pytest.approx(row["us"] * 1e3 / row["entries"])
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"] == rows
    for bad, flag in ((["--before", str(tmp_path / "nothing")], "--before"), (["--matrices", "16x30"], "--matrices"),
                      (["--convs", "8x8x3"], "--convs"), (["--matrices", "4096x1024"], "--matrices")):
        with pytest.raises(SystemExit) as stop:
            bench.main(bad + ["--out", str(tmp_path / "out")])
        assert stop.value.code == 2 and flag in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_kernels_benchmark_refuses_a_kernel_whose_bits_differ_from_the_code_before(tmp_path, monkeypatch):
    from nmtrain.sparsity import fused
    if fused.njit is None:
        pytest.skip("numba is not installed")
    bench = _load("kernels")
    bench.before_package(ROOT)
    real = fused.soft_threshold4
    monkeypatch.setattr(fused, "soft_threshold4", lambda w, n, scale: real(w, n, scale) * 2)
    with pytest.raises(SystemExit, match="soft on 16x32"):
        bench.main(["--matrices", "16x32", "--convs", "", "--repeat", "2", "--before", str(ROOT)])


def test_kernels_benchmark_reads_its_shapes():
    bench = _load("kernels")
    assert bench._shapes(2)("16x32,384x128") == [(16, 32), (384, 128)]
    assert bench._shapes(4)("") == [] and bench._shapes(4)("8x8x3x3") == [(8, 8, 3, 3)]
