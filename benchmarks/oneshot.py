"""One-shot conversion, measured: every method at every pattern from every source, over calibration seeds.

Each conversion is `nmtrain adaprune`'s own (`experiments.oneshot.convert`, in-process, nothing written);
for each source x method x pattern the table gives the task's primary metric (accuracy, or perplexity)
as mean ± std over the calibration seeds, the share of magnitude pruning's loss the method recovers,
``(m_method - m_magnitude) / (m_original - m_magnitude)`` in the better direction (perplexity: lower),
and the method's seconds (mean). Writes ``oneshot.md`` (the table the README shows), ``oneshot.json`` and
``oneshot.csv`` into ``--out``, and says the threads and ``OMP_WAIT_POLICY`` it ran with.

    python benchmarks/oneshot.py --source lenet-us50=runs/fmnist_us50 --source gpt=runs/gpt_dense
    python benchmarks/oneshot.py --source mlp=RUN --methods magnitude,sparsegpt --patterns 2:4 \\
        --seeds 0 --calib-samples 64 --iters 10 --out /tmp/oneshot          # seconds, on a tiny run

``--finetune`` adds each method followed by AdaPrune's fit of the kept weights (masks fixed) as its own
row (``method+ft``). ``--iters``, ``--batch`` set AdaPrune's fit (method adaprune and the fine-tune),
``--blocksize``, ``--percdamp`` SparseGPT's; each goes to the methods that take it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

from nmtrain.cli.console import console as wide_console
from nmtrain.experiments.catalogue import ONESHOT_METHODS
from nmtrain.experiments.errors import ExperimentError
from nmtrain.experiments.layers import LayerSelectionError
from nmtrain.experiments.oneshot import ConversionSettings, ReconstructParams, available, convert, get_oneshot
from nmtrain.experiments.oneshot.registry import ConversionError, field_names, make_params
from nmtrain.experiments.tasks import get_task
from nmtrain.sparsity import SparsityError, parse_pattern

DEFAULT_PATTERNS = "2:4,1:4,4:8-T,2:4-T"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a source run directory and its name in the table (repeat for several)")
    parser.add_argument("--methods", default=",".join(n for n in ONESHOT_METHODS if available(n)))
    parser.add_argument("--patterns", default=DEFAULT_PATTERNS)
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    parser.add_argument("--calib-samples", type=int, default=1000)
    parser.add_argument("--finetune", action="store_true", help="also each method followed by AdaPrune's fit")
    parser.add_argument("--iters", type=int, default=None, help="AdaPrune's steps per layer (adaprune, fine-tune)")
    parser.add_argument("--batch", type=int, default=None, help="AdaPrune's samples per step")
    parser.add_argument("--blocksize", type=int, default=None, help="SparseGPT's block of lazy updates")
    parser.add_argument("--percdamp", type=float, default=None, help="SparseGPT's dampening")
    parser.add_argument("--out", type=Path, default=Path("docs/results/oneshot"))
    return parser.parse_args(argv)


def _sources(items: list[str]) -> dict[str, Path]:
    sources = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --source: {item!r} is not NAME=RUN_DIR")
        sources[name] = Path(path)
    return sources


def _options(method: str, finetune: bool, args: argparse.Namespace) -> dict:
    """The given options the method (or the fine-tune) takes, by field name."""
    given = {k: getattr(args, k) for k in ("iters", "batch", "blocksize", "percdamp") if getattr(args, k) is not None}
    takes = field_names(get_oneshot(method).params) | (field_names(ReconstructParams) if finetune else set())
    return {k: v for k, v in given.items() if k in takes}


def run_grid(args: argparse.Namespace, console) -> list[dict]:
    """One conversion per source x method x pattern x seed; the per-seed summaries' figures, as records."""
    records = []
    methods = [m for m in args.methods.split(",") if m]
    patterns = [parse_pattern(p) for p in args.patterns.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for source_name, source in _sources(args.source).items():
        for method in methods:
            finetune = args.finetune and not get_oneshot(method).reconstructs
            for pattern in patterns:
                for seed in seeds:
                    settings = ConversionSettings(pattern=pattern, method=method, calib_samples=args.calib_samples,
                                                  calib_seed=seed, finetune=finetune,
                                                  options=_options(method, finetune, args))
                    records.append(_one(source_name, source, settings, console))
    return records


def _skipped(source_name: str, settings: ConversionSettings, label: str, why: Exception, console) -> dict:
    console.print(f"{label}: skipped ({why})")
    return {"source": source_name, "method": settings.method, "pattern": str(settings.pattern),
            "seed": settings.calib_seed, "skipped": str(why)}


def _one(source_name: str, source: Path, settings: ConversionSettings, console) -> dict:
    label = f"{source_name} {settings.method} {settings.pattern} seed {settings.calib_seed}"
    try:        # a pattern the method refuses outright (learned masks at 4:8-T: too many candidate tiles)
        method = get_oneshot(settings.method)
        make_params(method.params, {k: v for k, v in settings.options.items() if k in field_names(method.params)},
                    settings.pattern)
    except ConversionError as exc:
        return _skipped(source_name, settings, label, exc, console)
    try:
        s = convert(source, settings, progress=False, write=False).summary
    except LayerSelectionError as exc:        # a pattern no layer of this model can hold
        return _skipped(source_name, settings, label, exc, console)
    task = get_task(s["task"])
    record = {"source": source_name, "method": settings.method, "pattern": str(settings.pattern),
              "seed": settings.calib_seed, "task": s["task"], "metric": task.primary,
              "calib_samples": s["calib_samples"],
              "eval_split": s["eval_split"], "sparse_layers": len(s["sparse_layers"])}
    for stage in ("original", "magnitude", "oneshot", "finetune"):
        if f"{task.primary}_{stage}" in s:
            record[stage] = s[f"{task.primary}_{stage}"]
    record.update(seconds_oneshot=s["seconds_oneshot"], seconds_finetune=s.get("seconds_finetune"))
    console.print(f"{label}: {task.primary} {task.format(record['oneshot'])}"
                  + (f" (+ fine-tune {task.format(record['finetune'])})" if "finetune" in record else "")
                  + f", {record['seconds_oneshot']:.1f} s")
    return record


def _recovered(value: float, run: dict) -> float | None:
    """``(m - m_magnitude) / (m_original - m_magnitude)``, each difference in the task's better direction."""
    task = get_task(run["task"])
    lost = task.gain(run["original"], run["magnitude"])
    return task.gain(value, run["magnitude"]) / lost if lost > 0 else None


def aggregate(records: list[dict]) -> list[dict]:
    """Per source x method (x fine-tune) x pattern: mean ± std over seeds, recovered share, seconds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "skipped" in r:
            continue
        groups.setdefault((r["source"], r["method"], r["pattern"]), []).append(r)
    rows = []
    for (source, method, pattern), runs in groups.items():
        for stage, label in (("oneshot", method), ("finetune", f"{method}+ft")):
            if stage not in runs[0]:
                continue
            rows.append(_row(source, label, pattern, runs, stage))
    return rows


def _row(source: str, label: str, pattern: str, runs: list[dict], stage: str) -> dict:
    first = runs[0]
    values = [r[stage] for r in runs]
    recovered = [_recovered(v, r) for v, r in zip(values, runs)]
    seconds = [r[f"seconds_{stage}"] + (r["seconds_oneshot"] if stage == "finetune" else 0.0) for r in runs]
    known = [x for x in recovered if x is not None]
    return {"source": source, "method": label, "pattern": pattern, "task": first["task"], "metric": first["metric"],
            "n_seeds": len(runs), "seeds": [r["seed"] for r in runs], "original": first["original"],
            "magnitude": first["magnitude"], "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values,
            "recovered_mean": statistics.fmean(known) if known else None,
            "recovered_std": statistics.stdev(known) if len(known) > 1 else (0.0 if known else None),
            "seconds_mean": statistics.fmean(seconds), "calib_samples": first["calib_samples"],
            "eval_split": first["eval_split"]}


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)"),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _fmt(row: dict, key: str) -> str:
    digits = 2 if row["metric"] == "accuracy" else 3
    return f"{row[key]:.{digits}f}"


def markdown(rows: list[dict], env: dict, args: argparse.Namespace, records: list[dict]) -> str:
    lines = [f"One-shot conversion ({env['date']}; torch {env['torch']}, {env['threads']} threads on {env['cpus']} "
             f"CPUs, device {env['device']}, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}); {args.calib_samples} "
             f"calibration samples, seeds {args.seeds}; metric mean ± std over the seeds; recovered = share of "
             "magnitude's loss recovered; seconds: the method's (and fine-tune's) mean wall time.", "",
             "| source | pattern | metric | original | magnitude | method | mean ± std | recovered | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "–" if r["recovered_mean"] is None else f"{100 * r['recovered_mean']:.0f}% ± {100 * r['recovered_std']:.0f}"
        lines.append(f"| {r['source']} | {r['pattern']} | {r['metric']} | {_fmt(r, 'original')} | "
                     f"{_fmt(r, 'magnitude')} | {r['method']} | {_fmt(r, 'mean')} ± {_fmt(r, 'std')} | {rec} | "
                     f"{r['seconds_mean']:.2f} |")
    skipped = sorted({(r["source"], r["pattern"], r["skipped"]) for r in records if "skipped" in r})
    if skipped:
        lines += ["", *(f"Not measured: {src} at {pat} ({why})." for src, pat, why in skipped)]
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], records: list[dict], env: dict, args: argparse.Namespace) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, env, args, records)
    (out / "oneshot.md").write_text(text)
    (out / "oneshot.json").write_text(json.dumps({"environment": env, "rows": rows, "runs": records}, indent=2) + "\n")
    columns = ["source", "pattern", "metric", "original", "magnitude", "method", "mean", "std", "recovered_mean",
               "recovered_std", "seconds_mean", "n_seeds", "calib_samples", "eval_split"]
    with open(out / "oneshot.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return text


def _table(rows: list[dict], env: dict) -> Table:
    table = Table(title=f"one-shot conversion (OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, {env['threads']} threads)")
    for col in ("source", "pattern", "original", "magnitude", "method", "mean ± std", "recovered", "seconds"):
        table.add_column(col, justify="left" if col in ("source", "pattern", "method") else "right")
    for r in rows:
        rec = "–" if r["recovered_mean"] is None else f"{100 * r['recovered_mean']:.0f}%"
        table.add_row(r["source"], r["pattern"], _fmt(r, "original"), _fmt(r, "magnitude"), r["method"],
                      f"{_fmt(r, 'mean')} ± {_fmt(r, 'std')}", rec, f"{r['seconds_mean']:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = wide_console        # 140 columns when piped
    try:
        records = run_grid(args, console)
    except (ExperimentError, SparsityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = aggregate(records)
    env = environment()
    write(args.out, rows, records, env, args)
    console.print(_table(rows, env))
    console.print(f"written: {args.out / 'oneshot.md'}, oneshot.json, oneshot.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
