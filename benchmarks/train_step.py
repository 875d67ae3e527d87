"""Training-step time of every method against dense and SR-STE, measured side by side in one run.

Each method trains the same model on the same fixed batches; steps are interleaved in rounds (one step of
every method a round) so that machine noise hits every method alike, and the median step time is reported with
its ratio to dense. Each round runs the methods in a fresh order (a seeded shuffle, ``--order shuffled``, the
default): in a fixed order a method's step reads what its place in the round gives it. Two identical
transposable runs side by side, listed right after dense and after that, read 1.067 and 1.060, 1.057 and
1.044, 1.044 and 1.039 of dense's step in three fixed-order runs on LeNet-5 (``--order fixed`` keeps the
listed order). Each method is attached by `nmtrain.sparsify` and stepped by a plain loop, as `nmtrain train`
and a user's own loop run it: the hooks' cost is in the step. Mask recomputation is part of the step (SR-STE
every step, transposable every `mask_interval` steps, so the run covers at least one interval). Beside the
whole run's median ratio, the timed steps are cut into ``--blocks`` consecutive blocks (default 4) and the
mean ± sample sd of the blocks' median ratios is reported: the noise of the run itself, against which a
difference from 1.00x or from a target is judged. Each phase of the step is timed too (the forward, the
backward, the optimizer step: on a GPU by CUDA events, without a synchronisation inside the step), and its
median is held against dense's: where a method's extra time goes, before a profiler is needed.

    python benchmarks/train_step.py                      # LeNet-5, Fashion-MNIST-sized batches, 2:4
    python benchmarks/train_step.py --model resnet20 --image-size 32 --channels 3 --device cuda
    python benchmarks/train_step.py --optim adamw --methods dense,srste,srste:mvue,sste,maskdecay,step,pgf
    python benchmarks/train_step.py --model vit_tiny --optim adamw      # the ViT-Tiny of the image tasks
    python benchmarks/train_step.py --model gpt --optim adamw --batch 16  # the GPT of the language-model task
    python benchmarks/train_step.py --compile --methods dense,fixed,srste   # eager and torch.compile'd, side by side

``--compile`` times every method twice, eagerly and as ``name+compile``: the model under ``torch.compile``
(``--backend``, default inductor), the step begun eagerly first (``handle.begin_step()``, as ``train.compile: true`` runs it); a
compiled row's "vs dense" is against ``dense+compile``. Its first steps compile: the warm-up steps, untimed.
A method that cannot train compiled (``Method.compile_problem``) is left out of the compiled rows.

A method written ``name:mvue`` runs with ``mvue_dw: true`` (``name:no-mvue``: false), ``name:key=value``
with that parameter; ``--optim adamw`` (AdamW, as STEP needs) in place of SGD. Under SGD a method that takes
only AdamW (STEP) trains with AdamW and is held against ``dense+adamw``, dense on AdamW, timed beside the rest
(AdamW's step costs more than SGD's: against dense on SGD, STEP on LeNet-5 read 1.10-1.12x). Each row also gives the
training FLOPs of its timed steps relative to dense (the handle's `flops()`: `Method.densities` on the
MACs of the steps' own forwards), and the memory a step holds at the end of its forward relative to dense:
the bytes of parameters, gradients, optimizer state, the method's own tensors (its `state_dict`) and every
tensor autograd saved for the backward, each storage counted once (``held_bytes``). That is the step's
peak on any device short of the allocator's own slack, and on a CPU, where torch keeps no peak counter,
the number a run can give.

``--run-length K`` runs K consecutive steps of each method in every round and times all but each run's first:
there, as in a training run, a method's step follows its own, not another model's. It does not change the
verdicts (docs/speed.md, the twenty-fourth session): on the GPT most methods read about 1% lower than step by
step, on LeNet-5 about 0.5% higher, and masked decay with its MVUE weight gradient 3-5% lower on both. Its blocks
spread more, with fewer rounds to average the machine's drift, so the default stays 1, step by step.

As `nmtrain train` does, the benchmark has glibc's malloc keep the memory a step frees
(`nmtrain.keep_freed_memory`; ``--malloc default`` leaves glibc's own thresholds): otherwise, in some processes
and not others, a CPU step of a conv net page-faults on what the last step freed (LeNet-5: 3,300 faults and
4 ms a step), and that, not the methods, decides a ratio.

``--before PATH`` times the code of a change against the code before it, in this one run: every method is
attached a second time, as ``name@before``, by the ``nmtrain`` of PATH (another checkout of this repository,
or a folder holding an installed ``nmtrain/``, as ``pip install --target`` makes it), imported under another
name; its steps are interleaved with the rest, and each method's row gives ``vs before`` (its median step
over its twin's) and whether the two ended with the same weights, bit for bit. Runs in separate processes
differ by more than most changes do on a shared machine (runs of one code: a ratio to dense 0.01-0.05
apart), so a change's before/after is measured side by side. ``dense@before`` is the run's control: the
same torch step, so its ``vs before`` is the noise; a method the code before lacks runs without a twin.
Each row also gives its ``vs before`` net of the control (over dense's, on the method's optimizer), and the
spread of that net ratio over the run's blocks: a change reads as one where the net ratio stands further
from 1 than a few of that spread (on the GPT, separate runs of the same change read 1-2% apart).
The checkout's numba kernels are compiled afresh into a temporary cache: a cache it made as ``nmtrain``
names its machine code as this one's does, and the two would share it.

    python benchmarks/train_step.py --model gpt --optim adamw --batch 16 --methods dense,srste --before /tmp/old

AdamW is nmtrain's (`experiments.optim.AdamW`, what ``nmtrain train`` builds): torch's numbers bit for bit,
with the zero second moments of the weights a mask prunes kept off MKL's square root, whose rare-value path
took each zero (on the GPT, about 2 ms of fixed's and unstructured's steps); a ``--before`` code without it
runs torch's. ``--fused`` builds every optimizer with torch's fused kernel (``fused=True``), as a spec's
``optim.fused: true`` trains: one pass over each parameter, not one per tensor operation, and other numbers.

``--denormals flush`` runs every step with the CPU's denormal numbers taken as zero on every thread
(`nmtrain.flush_denormals`, as ``train.flush_denormals: true`` trains; every run alike). An Intel CPU takes
arithmetic that meets a denormal through a slow microcode path. STEP's sparse phase drives softmaxes to
saturate until their gradients hold denormals (on this benchmark's random tokens, the logits'; on
Shakespeare's text, the attention's, at the q/k/v outputs): on the Intel Xeon the GEMMs of its backward then
slow by up to 17 ms a step (STEP 1.2x dense on the GPT and ViT-Tiny here; on text, STEP's 400-step
``nmtrain train`` run took 1.1x its time with the flush), arithmetic this flag takes out, so that the row
measures the method's per-step work. ``keep`` (the default) leaves the arithmetic as ``nmtrain train`` runs
it by default.

``--model gpt`` trains the language-model task's GPT (4 layers, 128 wide, 4 heads, 64-token windows, a
byte vocabulary) on random tokens, with the loss of the next token.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import pkgutil
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

import nmtrain
from nmtrain.experiments import denormals
from nmtrain.experiments.methods import get_method, list_methods
from nmtrain.experiments.gpt import GPT
from nmtrain.experiments.models import image_model
from nmtrain.experiments.spec import apply_overrides


def _label_params(label: str) -> tuple[str, dict]:
    """``srste:mvue`` → ("srste", {"mvue_dw": True}); ``step:window=5`` → ("step", {"window": 5});
    ``transposable:bound_pruned=false`` → ("transposable", {"bound_pruned": False})."""
    name, _, variant = label.partition(":")
    if not variant:
        return name, {}
    if variant in ("mvue", "no-mvue"):
        return name, {"mvue_dw": variant == "mvue"}
    # the value read as `nmtrain train method.params.key=value` reads it (``false`` is False, not "false")
    return name, apply_overrides({}, [f"method.params.{variant}"])["method"]["params"]


GPT_SHAPE = {"vocab_size": 256, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0,
             "bias": False}


def _model(args, device: torch.device) -> torch.nn.Module:
    if args.model == "gpt":
        return GPT(**GPT_SHAPE).to(device)
    return image_model(args.model, 10, args.channels, args.image_size).to(device)


def _batches(args, device: torch.device) -> list:
    if args.model == "gpt":
        shape = (args.batch, GPT_SHAPE["block_size"])
        return [(torch.randint(0, GPT_SHAPE["vocab_size"], shape, device=device),
                 torch.randint(0, GPT_SHAPE["vocab_size"], shape, device=device)) for _ in range(4)]
    return [(torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device),
             torch.randint(0, 10, (args.batch,), device=device)) for _ in range(4)]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)                      # (batch, classes) or (batch, tokens, vocabulary)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, handle, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes held at the end of a training forward: parameters, gradients, optimizer state, the method's
    tensors and what autograd saved for the backward, each storage once."""
    storages: dict[int, int] = {}
    alive: list[torch.Tensor] = []      # a storage is told apart by its address only while it is alive

    def note(t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            alive.append(t)
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(t):
        note(t)
        return t

    for p in model.parameters():
        note(p)
        note(p.grad)
    for state in opt.state.values():
        for value in state.values():
            note(value)
    for value in handle.state_dict().values():
        for t in (value.values() if isinstance(value, dict) else [value]):
            note(t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, x, y)
    loss.backward()                     # the graph is freed; the step is not taken
    opt.zero_grad(set_to_none=False)
    return sum(storages.values())


COMPILED = "+compile"
ADAMW = "+adamw"        # a run on AdamW under --optim sgd: dense's twin, the baseline of a method that takes only AdamW
BEFORE = "@before"      # a method attached by the code of --before


def _method_of(label: str) -> tuple[str, dict]:
    return _label_params(label.removesuffix(BEFORE).removesuffix(COMPILED).removesuffix(ADAMW))


def _optimizer(label: str, args) -> str:
    """The optimizer ``label`` trains with: --optim, or AdamW for a method that takes nothing else (STEP) and
    for the dense twin it is held against."""
    cls = get_method(_method_of(label)[0])
    takes_adamw_only = bool(cls.caps.optimizers) and "sgd" not in cls.caps.optimizers
    twin = label.removesuffix(BEFORE).removesuffix(COMPILED).endswith(ADAMW)
    return "adamw" if args.optim == "adamw" or takes_adamw_only or twin else "sgd"


def _adamw(package) -> type:
    """The AdamW ``package`` trains with: its own (`experiments.optim.AdamW`: torch's numbers, zero second moments
    at full speed), or torch's for a code before it had one."""
    try:
        return importlib.import_module(f"{package.__name__}.experiments.optim").AdamW
    except ModuleNotFoundError:
        return torch.optim.AdamW


def _attached_run(label: str, args, device: torch.device, attached: ExitStack, package=nmtrain) -> tuple:
    """(model to step, handle, optimizer, step times) of one method, attached by ``package``'s `sparsify`
    (this ``nmtrain``, or the code of --before) until ``attached`` closes; the model to step is compiled for a
    ``name+compile`` label."""
    name, params = _method_of(label)
    torch.manual_seed(0)
    model = _model(args, device)
    fused = True if args.fused else None        # --fused: torch's fused kernel, as `optim.fused: true`
    if _optimizer(label, args) == "adamw":
        opt = _adamw(package)(model.parameters(), lr=1e-3, weight_decay=0.05, fused=fused)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused)
    # the module itself, not the package's lazy public name: that one names `nmtrain` and would be this code
    sparsify = importlib.import_module(f"{package.__name__}.experiments.sparsify").sparsify
    handle = attached.enter_context(sparsify(model, name, args.pattern, opt, total_steps=args.steps + 5, **params))
    return (torch.compile(model, backend=args.backend) if label.endswith(COMPILED) else model), handle, opt, []


BEFORE_PACKAGE = "nmtrain_before"


def before_package(path: Path):
    """The ``nmtrain`` at ``path`` (a checkout of this repository, or a folder holding an installed ``nmtrain/``)
    imported as `BEFORE_PACKAGE`, beside this one; None if ``path`` holds neither. A checkout's folders are
    linked into a temporary package as pyproject.toml maps them (``api/`` is the package itself). Its numba
    kernels cache into a temporary folder: machine code that checkout cached as ``nmtrain`` carries this
    code's symbol names, and loaded beside this code it would be linked to this code's kernels."""
    path = Path(path).resolve()
    checkout = (path / "api" / "__init__.py").is_file() and (path / "experiments" / "sparsify.py").is_file()
    if not checkout and not (path / "nmtrain" / "experiments" / "sparsify.py").is_file():
        return None
    loaded = sys.modules.get(BEFORE_PACKAGE)
    if loaded is not None:              # one code before per process: a second path would get the first's modules
        if loaded.before_path != path:
            raise RuntimeError(f"{BEFORE_PACKAGE} is {loaded.before_path} in this process, not {path}")
        return loaded
    root = Path(tempfile.mkdtemp(prefix="nmtrain-before-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / BEFORE_PACKAGE
    if checkout:
        package.mkdir()
        for entry in (path / "api").glob("*.py"):
            (package / entry.name).symlink_to(entry)
        for sub in ("cli", "experiments", "sparsity", "data"):
            (package / sub).symlink_to(path / sub, target_is_directory=True)
    else:
        package.symlink_to(path / "nmtrain", target_is_directory=True)
    try:
        from numba.core import config as numba_config
    except ImportError:                 # no numba: the kernels are not there either
        numba_config = None
    cache = numba_config.CACHE_DIR if numba_config else None
    if numba_config:
        numba_config.CACHE_DIR = str(root / "numba-cache")     # read as each kernel is declared, on import
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(BEFORE_PACKAGE)
        # every kernel is declared now, while the cache points away (a module imported later would not be)
        for sub in ("sparsity", "experiments"):
            top = importlib.import_module(f"{BEFORE_PACKAGE}.{sub}")
            for info in pkgutil.walk_packages(top.__path__, prefix=f"{top.__name__}."):
                importlib.import_module(info.name)
    except BaseException:               # no half-imported code before left for a later call to find
        for name in [name for name in sys.modules if name.split(".")[0] == BEFORE_PACKAGE]:
            del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(root))
        if numba_config:
            numba_config.CACHE_DIR = cache
    module.before_path = path
    return module


def _before_labels(labels: list[str], package) -> list[str]:
    """The methods of ``labels`` that the code of --before has, each as its ``@before`` twin."""
    known = set(importlib.import_module(f"{package.__name__}.experiments.methods").list_methods())
    return [label + BEFORE for label in labels if _method_of(label)[0] in known]


def _labels(args) -> list[str]:
    """The runs: every method of --methods; dense on AdamW too (``dense+adamw``) where a method takes only AdamW
    under --optim sgd, so that it is held against dense on the same optimizer; and with --compile each one's
    compiled twin where the method compiles."""
    labels = args.methods.split(",")
    dense = [label for label in labels if not get_method(_method_of(label)[0]).caps.sparse]
    if dense and any(_optimizer(label, args) != args.optim for label in labels):
        labels.insert(labels.index(dense[0]) + 1, dense[0] + ADAMW)
    if not args.compile:
        return labels
    return labels + [label + COMPILED for label in labels if _compiles(label)]


def _compiles(label: str) -> bool:
    name, params = _method_of(label)
    cls = get_method(name)
    return cls.compile_problem(cls.Params(**params)) is None


PHASES = ("forward", "backward", "optimizer")


def _mark(device: torch.device):
    """A point in a step: the host clock, or on a GPU a recorded CUDA event (no synchronisation in the step)."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start, end) -> float:
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1000


def round_orders(names: list[str], rounds: int, shuffled: bool, seed: int = 0) -> list[list[str]]:
    """The order of the runs in each round of interleaved steps: ``names`` as listed, or (``shuffled``) a fresh
    seeded permutation of them every round, so that no run keeps one place in the round or one neighbour."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        if shuffled:
            rng.shuffle(order)
        orders.append(order)
    return orders


WARMUP = 5      # steps of every run before any is timed


def run_plan(steps: int, run_length: int = 1) -> list[list[tuple[int, bool]]]:
    """Each round's run of consecutive steps, the same for every method: (the step's index, whether it is timed).
    With ``run_length`` 1, one step a round, the first `WARMUP` rounds untimed. With ``run_length`` K > 1, K steps a
    round: the rounds that cover `WARMUP` steps untimed, then each run's first step untimed (it follows another
    model's step) and the others timed, up to ``steps`` timed steps (the last run stops there)."""
    if run_length == 1:
        return [[(i, i >= WARMUP)] for i in range(steps + WARMUP)]
    plan, n, timed = [], 0, 0
    for _ in range(-(-WARMUP // run_length)):
        plan.append([(n + j, False) for j in range(run_length)])
        n += run_length
    while timed < steps:
        run = [(n, False)] + [(n + j, True) for j in range(1, min(run_length, steps - timed + 1))]
        plan.append(run)
        n += len(run)
        timed += len(run) - 1
    return plan


def _time_steps(runs: dict, batches: list, steps: int, device: torch.device, shuffled: bool = True,
                run_length: int = 1) -> dict[str, dict[str, list[float]]]:
    """Interleaved training steps of every run, in the rounds' orders (`round_orders`), each round a run of
    ``run_length`` steps of every method (`run_plan`); each run's timed step times are appended, and its phases'
    times returned: the forward (the method's per-step work begun, the loss), the backward (with the gradients'
    reset) and the optimizer step (with the method's hooks around it)."""
    phases = {name: {phase: [] for phase in PHASES} for name in runs}

    def step(name: str, i: int) -> tuple[float, list[float]]:
        model, handle, opt, _ = runs[name]
        x, y = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        marks = [_mark(device)]
        handle.begin_step()                         # what a compiled forward needs; else the first layer's hook
        loss = _loss(model, x, y)                   # the plain loop: the method's work runs in its hooks
        marks.append(_mark(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(_mark(device))
        opt.step()
        marks.append(_mark(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, [_seconds(a, b) for a, b in zip(marks, marks[1:])]

    plan = run_plan(steps, run_length)
    for order, run in zip(round_orders(list(runs), len(plan), shuffled), plan):
        for name in order:
            for i, timed in run:
                t, parts = step(name, i)
                if timed:
                    runs[name][3].append(t)
                    for phase, seconds in zip(PHASES, parts):
                        phases[name][phase].append(seconds)
    return phases


def _same_mode(runs: dict, reference: str | None, name: str, args=None) -> str | None:
    """``reference``'s run in ``name``'s mode (compiled or eager) and, given ``args``, on ``name``'s optimizer
    (its ``+adamw`` twin), if it was timed."""
    if reference is None:
        return None
    if args is not None and _optimizer(name, args) != _optimizer(reference, args):
        reference += ADAMW
    twin = reference + COMPILED if name.endswith(COMPILED) else reference
    return twin if twin in runs else None


def block_ratios(times: list[float], dense: list[float], blocks: int) -> list[float]:
    """The median-step ratio to dense in each of ``blocks`` consecutive runs of interleaved steps: their spread
    is the run's own noise (the machine drifts over a run; the steps of one block ran side by side)."""
    size = min(len(times), len(dense)) // blocks
    if size == 0:
        return []
    return [statistics.median(times[b * size:(b + 1) * size]) / statistics.median(dense[b * size:(b + 1) * size])
            for b in range(blocks)]


def _report(args, runs: dict, held: dict, device: torch.device, phases: dict) -> tuple[Table, list[dict]]:
    """The table and the JSON rows: every run's median and mean step, against dense (and SR-STE) timed in the
    same mode, its phases' medians against dense's, its training FLOPs and memory against dense."""
    # the reference is the dense baseline (the method that masks nothing), when it is in the list
    baseline = next((name for name in runs if not get_method(_method_of(name)[0]).caps.sparse), None)
    optim = f"{args.optim} (fused)" if args.fused else args.optim
    table = Table(title=f"training step, {args.model} batch {args.batch}, {args.pattern}, {optim}, {device} "
                        f"({torch.get_num_threads()} threads), {args.steps} interleaved steps"
                        + (f" (runs of {args.run_length}, the first untimed)" if args.run_length > 1 else "")
                        + f", malloc {args.malloc}"
                        + (", denormals flushed" if args.denormals == "flush" else ""))
    for col in ("method", "median ms / step", "vs dense", f"± sd ({args.blocks} blocks)", "mean ms / step",
                "vs dense ", "mean vs srste", "fwd/bwd/opt vs dense", "train FLOPs", "held MB", "memory vs dense"):
        table.add_column(col, justify="right", no_wrap=col.startswith("fwd"))
    with_before = any(name.endswith(BEFORE) for name in runs)
    if with_before:
        table.add_column("vs before", justify="right")
        table.add_column(f"net of control ± sd ({args.blocks} blocks)", justify="right")
        table.add_column("same weights", justify="right")
    rows = []
    for name, (_, handle, _, times) in runs.items():
        flops = handle.flops()
        base, srste = _same_mode(runs, baseline, name, args), _same_mode(runs, "srste", name)
        # the median is the typical step; the mean also carries the occasional mask recomputation
        med, mean = statistics.median(times), statistics.fmean(times)
        dense = statistics.median(runs[base][3]) if base else None
        dense_mean = statistics.fmean(runs[base][3]) if base else None
        srste_mean = statistics.fmean(runs[srste][3]) if srste else None
        blocks = block_ratios(times, runs[base][3], args.blocks) if base else []
        block_mean = statistics.fmean(blocks) if blocks else None
        spread = statistics.stdev(blocks) if len(blocks) > 1 else None
        phase_ms = {phase: statistics.median(phases[name][phase]) * 1000 for phase in PHASES}
        phase_ratio = ({phase: phase_ms[phase] / (statistics.median(phases[base][phase]) * 1000) for phase in PHASES}
                       if base else None)
        rows.append({"method": name, "median_ms": med * 1000, "median_vs_dense": med / dense if dense else None,
                     "block_ratios": blocks, "block_ratio_mean": block_mean,
                     "block_ratio_sd": spread,
                     "mean_ms": mean * 1000, "mean_vs_dense": mean / dense_mean if dense_mean else None,
                     "mean_vs_srste": mean / srste_mean if srste_mean else None,
                     "phase_ms": phase_ms, "phase_vs_dense": phase_ratio,
                     "flops_ratio": flops["ratio"], "held_bytes": held[name],
                     "memory_vs_dense": held[name] / held[base] if base else None})
        cells = [name, f"{med * 1000:.2f}", f"{med / dense:.2f}x" if dense else "–",
                 f"{block_mean:.3f} ± {spread:.3f}" if spread is not None else "–",
                 f"{mean * 1000:.2f}", f"{mean / dense_mean:.2f}x" if dense_mean else "–",
                 f"{mean / srste_mean:.2f}x" if srste_mean else "–",
                 "/".join(f"{phase_ratio[p]:.2f}" for p in PHASES) if phase_ratio else "–",
                 f"{flops['ratio']:.3f}",
                 f"{held[name] / 2**20:.1f}", f"{held[name] / held[base]:.2f}x" if base else "–"]
        if with_before:
            against = _against_before(runs, name, base, args.blocks)
            rows[-1].update(against)
            cells += _before_cells(against)
        table.add_row(*cells)
    return table, rows


def _against_before(runs: dict, name: str, base: str | None, blocks: int) -> dict:
    """``name`` against its twin of the code before (nothing where it has none): its median step over the twin's
    (``vs_before``); that ratio over the control's, dense's over ``dense@before`` in the same mode
    (``net_vs_before``: the change, net of what the run did to the same torch step), and the same net ratio in
    each block of consecutive steps (`block_ratios`: their spread is the run's noise on it); whether the two
    ended with the same weights. A change moves a method by more than the noise where ``net_vs_before`` is
    further from 1 than a few of ``net_vs_before_sd``."""
    twin = runs.get(name + BEFORE)
    if twin is None:
        return {}
    times = runs[name][3]
    out = {"vs_before": statistics.median(times) / statistics.median(twin[3]),
           "same_weights_as_before": _same_weights(runs[name][0], twin[0])}
    control = runs.get(base + BEFORE) if base is not None else None
    if control is not None:
        dense = runs[base][3]
        out["net_vs_before"] = out["vs_before"] / (statistics.median(dense) / statistics.median(control[3]))
        nets = [mine / theirs for mine, theirs in zip(block_ratios(times, twin[3], blocks),
                                                      block_ratios(dense, control[3], blocks))]
        out["net_vs_before_blocks"] = nets
        out["net_vs_before_sd"] = statistics.stdev(nets) if len(nets) > 1 else None
    return out


def _before_cells(against: dict) -> list[str]:
    """The table's cells of `_against_before`: vs before, net of the control ± its blocks' sd, same weights."""
    if not against:
        return ["–", "–", "–"]
    net, sd = against.get("net_vs_before"), against.get("net_vs_before_sd")
    return [f"{against['vs_before']:.3f}",
            "–" if net is None else f"{net:.3f}" + ("" if sd is None else f" ± {sd:.3f}"),
            "yes" if against["same_weights_as_before"] else "no"]


def _same_weights(model: torch.nn.Module, twin: torch.nn.Module) -> bool:
    """Whether two models hold the same parameters, bit for bit (-0.0 is not +0.0; a NaN equals its own bits)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1).view(torch.uint8)

    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
        and torch.equal(bits(ours[k]), bits(theirs[k])) for k in ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--methods", default=",".join(list_methods()))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optim", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--fused", action="store_true",
                        help="every optimizer with torch's fused kernel (what optim.fused: true trains with)")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--compile", action="store_true", help="also time every method under torch.compile")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend for --compile")
    parser.add_argument("--malloc", default="keep", choices=("keep", "default"),
                        help="keep: glibc's malloc keeps what a step frees, as `nmtrain train` sets it "
                             "(nmtrain.keep_freed_memory); default: glibc's own thresholds")
    parser.add_argument("--denormals", default="keep", choices=("keep", "flush"),
                        help="flush: denormal numbers taken as zero on every thread (nmtrain.flush_denormals, as "
                             "train.flush_denormals: true), every run alike; keep: the arithmetic as `nmtrain "
                             "train` runs it by default")
    parser.add_argument("--order", default="shuffled", choices=("shuffled", "fixed"),
                        help="shuffled: every round of interleaved steps runs the methods in a fresh seeded order; "
                             "fixed: in the listed order")
    parser.add_argument("--run-length", type=int, default=1,
                        help="steps of each method in a row, every round (the first of each run untimed): 1 "
                             "interleaves step by step; more times steps that follow the method's own, as in "
                             "a training run")
    parser.add_argument("--blocks", type=int, default=4,
                        help="cut the timed steps in this many consecutive blocks and report the mean ± sd of "
                             "their median ratios to dense (the run's own noise)")
    parser.add_argument("--before", type=Path, default=None,
                        help="also time every method as the nmtrain at this path runs it (a checkout, or a folder "
                             "holding an installed nmtrain/), side by side: a change's before and after")
    args = parser.parse_args()
    if args.run_length < 1:
        parser.error(f"--run-length: {args.run_length} is not a number of steps; give 1 or more")
    if args.denormals == "flush":       # every thread (experiments/denormals.py), for the rest of the process
        if (why := denormals.unsupported()) is not None:
            parser.error(f"--denormals flush: {why}; leave --denormals keep")
        denormals.set_flush_denormals(True)
    before = None
    if args.before is not None:
        if args.compile:
            parser.error("--before: times eager steps only; leave out --compile")
        before = before_package(args.before)
        if before is None:
            parser.error(f"--before: {args.before} holds no nmtrain: give a checkout of this repository (api/, "
                         "experiments/) or a folder with an installed nmtrain/ in it")
    if args.malloc == "keep":
        nmtrain.keep_freed_memory()     # else a CPU step may page-fault on what the last one freed, in some processes
    device = torch.device(args.device)
    labels = _labels(args)
    if args.compile:
        # Every compiled model here runs the same code objects (the model class's forward, the routed layers'
        # forward, the hooks): each model's graphs count towards dynamo's per-code-object recompile limit,
        # past which it runs the rest eagerly without a word. Room for every run's graphs (a run alone, as
        # `nmtrain train` has it, needs one per phase).
        torch._dynamo.config.recompile_limit = 64 * len(labels)
        torch._dynamo.config.accumulated_recompile_limit = 64 * len(labels)
    torch.manual_seed(0)
    batches = _batches(args, device)
    with ExitStack() as attached:      # every model's forward runs through its method while it is timed
        runs = {name: _attached_run(name, args, device, attached) for name in labels}
        if before is not None:
            runs.update({name: _attached_run(name, args, device, attached, before)
                         for name in _before_labels(labels, before)})
        phases = _time_steps(runs, batches, args.steps, device, args.order == "shuffled", args.run_length)
        held = {}
        for name, (model, handle, opt, _) in runs.items():
            handle.begin_step()             # as a step does: a compiled forward needs it begun
            held[name] = held_bytes(model, opt, handle, *batches[0])
    table, rows = _report(args, runs, held, device, phases)
    Console(width=200 if before is not None else 160).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}, "rows": rows},
                                                    indent=2))


if __name__ == "__main__":
    main()
