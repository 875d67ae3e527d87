"""Bi-Mask's permutation search: surviving share on trained models, and its cost per training step.

    python benchmarks/bimask_search.py RUN_DIR [RUN_DIR ...] [--steps 300] [--out bench-results]

RUN_DIR: Bi-Mask runs (e.g. `nmtrain train --method bimask --pattern 1:4 --out RUN_DIR`). For every
Bi-Mask layer of each run's trained weights (checkpoint.pt), the share of forward-kept weights that the
backward mask keeps: random grouping (the binomial expectation), the paper's best of `greedy_num` random
permutations, and `search: local` started from that draw, with the time each search takes. Then the
step time of Bi-Mask with `search: random` and with `search: local` at the run's `iter`, side by side in
one run (steps interleaved round-robin, the same batches), over `--steps` steps so that the searches'
cost is amortised as in training. Writes `OUT/bimask_search.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmtrain.data import build_datasets  # noqa: E402
from nmtrain.experiments.layers import plan_layers  # noqa: E402
from nmtrain.experiments.methods import attach, get_method, train_step  # noqa: E402
from nmtrain.experiments.methods.bimask import (local_search, random_grouping_survival,  # noqa: E402
                                                search_permutation)
from nmtrain.experiments.models import build_model  # noqa: E402
from nmtrain.experiments.rundir import RunDir  # noqa: E402
from nmtrain.experiments.spec import load_spec  # noqa: E402
from nmtrain.sparsity import nm_mask, parse_pattern, to_matrix  # noqa: E402


def load_run(run: Path):
    spec = load_spec(RunDir(run).config)
    _, _, info = build_datasets(spec.data.dataset, root=spec.data.root, seed=spec.seed, **spec.data.options())
    model = build_model(spec.model.name, info, spec.model)
    ckpt = RunDir(run).load_checkpoint(field="RUN")
    model.load_state_dict(ckpt.model)
    pattern = parse_pattern(spec.sparsity.pattern)
    plan = plan_layers(model, get_method("bimask").caps.layer_pattern(pattern), spec.sparsity.layout,
                       spec.sparsity.include, spec.sparsity.exclude, spec.sparsity.keep_first_dense,
                       spec.sparsity.keep_last_dense)
    return spec, info, model, pattern, plan


def survival_rows(run: Path) -> list[dict]:
    spec, _, _, pattern, plan = load_run(run)
    params = spec.method.params
    rows = []
    for index, (name, mod) in enumerate(plan.sparse.items()):
        w = mod.weight.detach()
        fm = to_matrix(nm_mask(w, pattern.n, pattern.m, spec.sparsity.layout), spec.sparsity.layout)
        scores = to_matrix(w.abs(), spec.sparsity.layout)
        total = int(fm.sum())
        gen = torch.Generator().manual_seed(index)
        start = time.perf_counter()
        perm, kept = search_permutation(fm, scores, pattern.n, pattern.m, params.get("greedy_num", 10), gen)
        t_random = time.perf_counter() - start
        start = time.perf_counter()
        _, better = local_search(fm, perm, pattern.n, pattern.m, gen, params.get("local_rounds", 100))
        t_local = time.perf_counter() - start
        chance = random_grouping_survival(pattern.n, pattern.m)
        rows.append({"run": str(run), "pattern": str(pattern), "layer": name, "c_out": fm.shape[0], "k": fm.shape[1],
                     "random_grouping": chance, "best_random": kept / total, "local": better / total,
                     "local_lift_points": 100 * (better / total - chance), "random_s": t_random, "local_s": t_local})
    return rows


def step_times(run: Path, steps: int) -> dict:
    spec, info, _, pattern, _ = load_run(run)
    torch.manual_seed(0)
    batches = [(torch.randn(spec.data.batch_size, info.in_channels, info.image_size, info.image_size),
                torch.randint(0, info.num_classes, (spec.data.batch_size,))) for _ in range(4)]
    with ExitStack() as attached:      # every model's forward runs through its method while it is timed
        runs = {search: _attached_run(spec, info, pattern, search, steps, attached)
                for search in ("random", "local")}
        _time_steps(runs, batches, steps)
    mean = {search: statistics.fmean(r[3]) for search, r in runs.items()}
    return {"run": str(run), "steps": steps, "iter": runs["local"][1].params.iter,
            "mean_ms_random": mean["random"] * 1000, "mean_ms_local": mean["local"] * 1000,
            "local_over_random": mean["local"] / mean["random"], "threads": torch.get_num_threads()}


def _attached_run(spec, info, pattern, search: str, steps: int, attached: ExitStack) -> tuple:
    """(model, method, optimizer, step times) of Bi-Mask with ``search``, attached until ``attached`` closes."""
    torch.manual_seed(0)
    model = build_model(spec.model.name, info, spec.model)
    plan = plan_layers(model, get_method("bimask").caps.layer_pattern(pattern), spec.sparsity.layout)
    params = {**{k: v for k, v in spec.method.params.items() if k != "search"}, "search": search}
    method = attached.enter_context(attach("bimask", plan.sparse, pattern, params, layout=spec.sparsity.layout,
                                           total_steps=steps, steps_per_epoch=steps, seed=spec.seed))
    return model, method, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), []


def _time_steps(runs: dict, batches: list, steps: int) -> None:
    """Interleaved training steps of every run; each run's step times are appended."""
    for i in range(steps):
        for search, (model, method, opt, times) in runs.items():
            x, y = batches[i % len(batches)]
            start = time.perf_counter()
            train_step(method, i, opt, lambda: F.cross_entropy(model(x), y))
            times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    rows = [row for run in args.runs for row in survival_rows(run)]
    table = Table(title="Bi-Mask backward mask: share of forward-kept weights kept")
    for col in ("run", "pattern", "layer", "C_out x K", "random grouping", "best random", "local",
                "local − random grouping", "search s (random / local)"):
        table.add_column(col, justify="left" if col in ("run", "layer") else "right")
    for r in rows:
        table.add_row(Path(r["run"]).name, r["pattern"], r["layer"], f"{r['c_out']}x{r['k']}",
                      f"{r['random_grouping']:.2%}", f"{r['best_random']:.2%}", f"{r['local']:.2%}",
                      f"{r['local_lift_points']:+.1f} pt", f"{r['random_s']:.3f} / {r['local_s']:.3f}")
    console = Console(width=160)
    console.print(table)
    timing = [step_times(run, args.steps) for run in dict.fromkeys(args.runs)]
    for t in timing:
        console.print(f"{Path(t['run']).name}: mean step {t['mean_ms_random']:.2f} ms (random) vs "
                      f"{t['mean_ms_local']:.2f} ms (local), local/random {t['local_over_random']:.3f} "
                      f"({t['steps']} interleaved steps, iter {t['iter']}, {t['threads']} threads)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bimask_search.json").write_text(json.dumps({"survival": rows, "step_time": timing}, indent=2) + "\n")


if __name__ == "__main__":
    main()
