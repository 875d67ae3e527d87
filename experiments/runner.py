"""The training runner: one spec in, one run directory out.

It knows nothing about any particular method: it builds data, model and optimizer from the spec,
routes the sparse layers' forward through the method found by name, and records what happened::

    DIR/config.yaml      the resolved spec (every default filled in)
    DIR/metrics.jsonl    one line per eval: step, epoch, loss, test_loss, accuracy, lr, mask_change_rate
                         (and mask_recomputes: step and change rate of each mask recompute since the last line)
    DIR/checkpoint.pt    model, optimizer, scheduler, method state (masks), RNG states, step, and the
                         run's counters (best accuracy, running loss, FLOPs, wall time, metrics lines)
    DIR/model.pt         final state_dict with masks folded in: pruned weights exactly zero
    DIR/summary.json     method, pattern, accuracies, wall time, sparse layers, training FLOPs, accel, and
                         the model's builder (model.name, its source file or library, its arguments)

File names and checkpoint keys are `rundir.py`'s. Every file is written to a temporary name and
renamed, so a killed run never leaves half a file.

``train(spec, resume=True)`` continues the run in ``spec.out`` from its checkpoint.pt: model, optimizer,
scheduler, method state, RNG states and the position in the data order (the train loader's order of
an epoch depends on the seed and the epoch alone, and a resumed epoch skips the batches already
done), so on CPU a resumed run ends bit-identical to one that was never interrupted. A first Ctrl-C
(SIGINT) is deferred to the end of the current step, which is then checkpointed; a second one stops
at once and keeps the last checkpoint.

Multi-process (torchrun; ``WORLD_SIZE > 1`` in the environment): the process group is initialised
(gloo on CPU, nccl on CUDA, one GPU per local rank), each rank trains on its share of every global
batch (``data.batch_size`` is the global batch), the model is wrapped in DistributedDataParallel after
the sparse layers are routed through the method, the loss is summed over the global batch so the
averaged gradient equals one process's, train metrics are reduced across ranks, every rank evaluates
the full test set, and rank 0 alone writes the run directory and prints. At every eval the masks of
every rank are compared by checksum; a divergence raises RuntimeError naming the layer.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import os

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.nn import functional as F

from ..data.loaders import set_epoch
from ..sparsity import Pattern, fold_mask, nm_violation
from .io import CheckpointError, _first_line, load_state_dict, state_dict_mismatch
from .build import build, layer_plan, resolve_device, validate
from .evaluate import evaluate
from .methods import attach, get_method, params_dict  # noqa: F401  (get_method: tests build a method here)
from .methods.ste import change_rate
from .models import builder_record, resolve_builder
from .flops import FlopCounter, macs_per_sample
from .rundir import Checkpoint, RunDir, RunError, check_flags, save_checkpoint
from .spec import Spec, SpecError, dump_spec

NOT_FINITE_AFTER_UPDATE = "the weights are not finite after the update"


class Interrupted(Exception):
    """Training was stopped by Ctrl-C; ``checkpoint_step`` is the step the run can resume from (None: none)."""

    def __init__(self, out: Path, step: int, checkpoint_step: int | None):
        self.out, self.step, self.checkpoint_step = out, step, checkpoint_step
        where = (f"checkpoint at step {checkpoint_step} saved" if checkpoint_step is not None
                 else "no checkpoint was written yet")
        super().__init__(f"interrupted at step {step}; {where}")


class _DeferSigint:
    """While active (main thread only), a first SIGINT only sets ``requested``; a second raises at once."""

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        return False


def _lr_lambda(spec: Spec, steps_per_epoch: int, total_steps: int):
    sch = spec.schedule
    warmup = int(round(sch.warmup_epochs * steps_per_epoch))
    milestones = sorted(int(round(e * steps_per_epoch)) for e in sch.milestones)
    if sch.name not in ("cosine", "step", "constant"):
        raise SpecError(f"schedule.name: {sch.name!r} is unknown; use cosine, step or constant")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sch.name == "cosine":
            span = max(total_steps - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        if sch.name == "step":
            return sch.gamma ** sum(step >= m for m in milestones)
        return 1.0
    return factor


def _optimizer(spec: Spec, model: nn.Module) -> torch.optim.Optimizer:
    o = spec.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    raise SpecError(f"optim.name: {o.name!r} is unknown; use sgd or adamw")


@dataclass
class RunResult:
    out: Path
    summary: dict


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def world_size() -> int:
    """Processes in this run: ``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per layer (count, sum of kept indices, sum of squared kept indices mod a prime): int64, on CPU."""
    rows = []
    for mask in masks.values():
        idx = torch.nonzero(mask.detach().reshape(-1).cpu()).reshape(-1).to(torch.int64)
        rows.append(torch.stack([idx.numel() * torch.ones((), dtype=torch.int64), idx.sum(),
                                 ((idx * idx) % 2_147_483_647).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.int64)


def check_masks_agree(masks: dict[str, torch.Tensor], device: torch.device, step: int) -> None:
    """All-gather a checksum of every mask and raise RuntimeError naming the first layer where ranks differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not masks:
        return
    local = _mask_checksums(masks).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for rank, other in enumerate(gathered[1:], start=1):
        bad = (other != gathered[0]).any(1)
        if bool(bad.any()):
            name = list(masks)[int(bad.nonzero()[0])]
            raise RuntimeError(f"masks diverged across processes at step {step}: layer {name} differs between "
                               f"rank 0 and rank {rank}")


def train(spec: Spec, overwrite: bool = False, console=None, progress: bool = True, resume: bool = False) -> RunResult:
    """Train ``spec`` into the run directory ``spec.out``; with ``resume``, continue the run there from its
    checkpoint.pt (``spec`` must then be the run's saved config.yaml). Under torchrun (``WORLD_SIZE > 1``)
    every process calls this; rank 0 alone writes and prints."""
    check_flags(overwrite, resume)
    world = world_size()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return _train(spec, overwrite, console, progress, resume)
    validate(spec)
    out = Path(spec.out)
    RunDir(out).check_target(overwrite, resume)   # every rank, before rank 0 can write anything (init is a rendezvous)
    device = resolve_device(spec.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(spec, overwrite, console if dist.get_rank() == 0 else None,
                      progress and dist.get_rank() == 0, resume, checked=not resume)
    finally:
        dist.destroy_process_group()


def _train(spec: Spec, overwrite: bool, console, progress: bool, resume: bool, checked: bool = False) -> RunResult:
    pattern, method_cls, params = validate(spec)
    out = Path(spec.out)
    rd = RunDir(out)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    ckpt = None
    if resume:
        ckpt = rd.load_checkpoint()
    elif not checked:
        rd.check_target(overwrite)
    device = resolve_device(spec.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    built = build(spec, augment=spec.data.augment, holdout=spec.data.holdout, rank=rank, world=world)
    train_ds, info, train_loader, test_loader, model = (built.train_ds, built.info, built.train_loader,
                                                        built.test_loader, built.model)
    if spec.model.init and ckpt is None:
        state = load_state_dict(spec.model.init, field="model.init")
        problem = state_dict_mismatch(model.state_dict(), state)
        if problem:
            raise SpecError(f"model.init: {spec.model.init} does not match model {spec.model.name}: {problem}")
        model.load_state_dict(state)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.model)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"--resume: {rd.checkpoint} does not match model {spec.model.name} of "
                                  f"{rd.config} ({_first_line(exc)})") from None
    model.to(device)

    # Methods with column groups (Bi-Mask's backward mask) need C_out % M == 0 like transposable ones.
    plan_pattern = Pattern(pattern.n, pattern.m, pattern.transposable or method_cls.caps.needs_column_groups)
    plan = layer_plan(spec, built, plan_pattern, device)
    steps_per_epoch = len(train_loader)
    total_steps = spec.train.epochs * steps_per_epoch
    if spec.train.max_steps is not None:
        total_steps = min(total_steps, spec.train.max_steps)
    dense = not method_cls.caps.sparse
    # The sparse layers' forward runs through the method until the block ends (before the fold below).
    with attach(method_cls, plan.sparse, pattern, params, layout=spec.sparsity.layout, solver=spec.sparsity.solver,
                total_steps=total_steps, steps_per_epoch=steps_per_epoch, accel=spec.accel,
                seed=spec.seed) as method:
        net = model
        if distributed:   # after routing: DDP's forward then runs the method's sparse forward
            net = nn.parallel.DistributedDataParallel(model,
                                                      device_ids=[device.index] if device.type == "cuda" else None)
        n_train = len(train_ds)
        global_batch = spec.data.batch_size

        optimizer = _optimizer(spec, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(spec, steps_per_epoch, total_steps))
        sample = next(iter(test_loader))[0].to(device)
        flops = FlopCounter(macs_per_sample(model, sample))

        eval_every = spec.train.eval_interval or steps_per_epoch
        ckpt_every = spec.train.checkpoint_interval or steps_per_epoch
        metrics_lines: list[str] = []
        best = -1.0
        last_masks = {k: v.clone() for k, v in method.masks().items()}
        running_loss, running_n = 0.0, 0
        step = 0
        wall_before = 0.0
        last_ckpt_step: int | None = None

        if ckpt is None:
            # The resolved spec, with the method's parameters filled in, goes first: it names the run.
            resolved = copy.deepcopy(spec)
            resolved.method.params = params_dict(params)
            if main:
                rd.prepare(overwrite)
                rd.write_config(dump_spec(resolved))
        else:
            if main:
                rd.remove_stale_tmp()
            try:
                optimizer.load_state_dict(ckpt.optimizer)
                scheduler.load_state_dict(ckpt.scheduler)
                method.load_state_dict(_to_device(ckpt.method, device))
                run = ckpt.run
                step = ckpt.step
                best = float(run.get("best", -1.0))
                running_loss, running_n = float(run.get("running_loss", 0.0)), int(run.get("running_n", 0))
                wall_before = float(run.get("wall", 0.0))
                for key, value in run.get("flops", {}).items():
                    setattr(flops, key, int(value))
                if "last_masks" in run:
                    last_masks = {k: v.to(device) for k, v in run["last_masks"].items()}
                else:
                    last_masks = {k: v.clone() for k, v in method.masks().items()}
            except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"--resume: {rd.checkpoint} does not fit the run in "
                                      f"{rd.config} "
                                      f"({_first_line(exc)})") from None
            if step > total_steps:
                raise CheckpointError(f"--resume: {rd.checkpoint} is at step {step}, past the run's "
                                      f"{total_steps} steps")
            done = rd.read_metrics()
            metrics_lines = done[:int(ckpt.run.get("metrics_lines", len(done)))]
            last_ckpt_step = step
            _restore_rng(ckpt.rng)      # last: building the run above may draw from the global RNGs

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress)
        start = time.perf_counter()

        def save_checkpoint() -> None:
            nonlocal last_ckpt_step
            if not _finite(model):
                raise _diverged(step, "the weights are not finite", out, last_ckpt_step)
            if not main:
                last_ckpt_step = step
                return
            run = {"best": best, "running_loss": running_loss, "running_n": running_n,
                   "wall": wall_before + time.perf_counter() - start, "metrics_lines": len(metrics_lines),
                   "flops": {"forward": flops.forward, "backward_data": flops.backward_data,
                             "backward_weight": flops.backward_weight, "dense_total": flops.dense_total},
                   "last_masks": last_masks}
            _save_checkpoint(rd.checkpoint, model, optimizer, scheduler, method, step,
                             step // steps_per_epoch, run)
            last_ckpt_step = step

        in_step = False
        try:
            with bar, _DeferSigint() as sigint:
                task = bar.add_task(f"{spec.name} · {method_cls.name}", total=total_steps, completed=step,
                                    loss=float("nan"), acc="–")
                model.train()
                while step < total_steps:
                    epoch = step // steps_per_epoch
                    set_epoch(train_loader, epoch, step - epoch * steps_per_epoch)
                    for x, y in train_loader:
                        if step >= total_steps:
                            break
                        in_step = True
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        try:
                            method.before_step(step)
                        except ValueError:
                            # a mask solver refuses non-finite weights: that is the divergence, say so
                            if _finite(model):
                                raise
                            if step == 0:
                                raise RunError("the starting weights are not finite (NaN/Inf); "
                                               "check model.init") from None
                            raise _diverged(step - 1, NOT_FINITE_AFTER_UPDATE, out, last_ckpt_step) from None
                        if distributed:
                            # Sum over this rank's share, scaled so that DDP's gradient average is the mean over
                            # the global batch (exact also for the epoch's last, unevenly split batch).
                            n_step = min(global_batch, n_train - (step % steps_per_epoch) * global_batch)
                            loss_sum = F.cross_entropy(net(x), y, reduction="sum")
                            loss = loss_sum * (world / n_step)
                            stat = torch.stack([loss_sum.detach().double(),
                                                torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
                            dist.all_reduce(stat)
                            step_loss, step_n = float(stat[0]) / float(stat[1]), n_step
                        else:
                            loss = F.cross_entropy(net(x), y)
                            step_loss, step_n = loss.item(), y.shape[0]   # one host sync per step
                        if not math.isfinite(step_loss):
                            raise _diverged(step, f"loss is {step_loss}", out, last_ckpt_step)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        method.after_backward(step)
                        optimizer.step()
                        scheduler.step()
                        method.after_step(step)
                        flops.add_step(step_n, {n: method.densities(n, step) for n in method.ctx.layers})
                        running_loss += step_loss * step_n
                        running_n += step_n
                        step += 1
                        bar.update(task, advance=1, loss=step_loss)

                        do_eval = step % eval_every == 0 or step == total_steps
                        do_ckpt = step % ckpt_every == 0 or step == total_steps
                        if (do_eval or do_ckpt) and not _finite(model):
                            raise _diverged(step - 1, NOT_FINITE_AFTER_UPDATE, out, last_ckpt_step)
                        if do_eval:
                            acc, test_loss = evaluate(model, test_loader, device)
                            masks = method.masks()
                            check_masks_agree(masks, device, step)
                            record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                                      "loss": running_loss / max(running_n, 1), "test_loss": test_loss, "accuracy": acc,
                                      "lr": optimizer.param_groups[0]["lr"],
                                      "mask_change_rate": change_rate(last_masks, masks)}
                            record.update(method.metric_fields())
                            events = method.pop_mask_events()
                            if events:      # per recompute, for methods that recompute at intervals
                                record["mask_recomputes"] = events
                            last_masks = {k: v.clone() for k, v in masks.items()}
                            running_loss, running_n = 0.0, 0
                            best = max(best, acc)
                            metrics_lines.append(json.dumps(record))
                            if main:
                                rd.write_metrics(metrics_lines)
                            bar.update(task, acc=f"{acc:.2f}%")
                        if do_ckpt:
                            save_checkpoint()
                        in_step = False
                        if sigint.requested:
                            raise KeyboardInterrupt
        except KeyboardInterrupt:
            # At a step boundary the state is consistent: checkpoint it. Inside a step (a second Ctrl-C)
            # the model may be half-updated: keep the last checkpoint.
            if not in_step and last_ckpt_step != step:
                save_checkpoint()
            raise Interrupted(out, step, last_ckpt_step) from None

        wall = wall_before + time.perf_counter() - start
        # Evaluate what a user deploys: the masks folded into plain weights.
        final_masks = method.masks()
        check_masks_agree(final_masks, device, step)
    sparse_layers = fold_masks(method.ctx.layers, final_masks, method.export_pattern, spec.sparsity.layout)
    final_acc, final_loss = evaluate(model, test_loader, device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if main:
        rd.write_model(state)

    summary = {
        "name": spec.name, "method": method_cls.name, "method_params": params_dict(params),
        "pattern": None if dense else str(pattern), "density": 1.0 if dense else pattern.density,
        "model": spec.model.name, "dataset": spec.data.dataset, "seed": spec.seed, "device": str(device),
        "builder": builder_record(spec.model.name, info.num_classes, info.in_channels, info.image_size,
                                  spec.model.width),
        "final_accuracy": final_acc, "best_accuracy": max(best, final_acc), "final_test_loss": final_loss,
        "eval_split": "test" if spec.data.holdout is None else f"holdout ({spec.data.holdout} train samples)",
        "epochs": round(step / steps_per_epoch, 4), "steps": step, "wall_seconds": wall,
        "sparse_layers": sparse_layers, "skipped_layers": plan.skipped if not dense else {},
        "train_flops": flops.summary(),
        "accel": method.accel_report() or {"mode": spec.accel, "sparse_layers": [], "fallback": {}},
    }
    summary.update(method.summary_fields())
    if distributed:
        summary["processes"] = world
    if main:
        rd.write_summary(summary)
    return RunResult(out, summary)      # the caller shows it: `nmtrain train` a table, `compare` a line


@torch.no_grad()
def fold_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor], export_pattern, layout: str) -> dict:
    """Zero every pruned weight in place and check each layer against the pattern its method exports;
    returns summary.json's ``sparse_layers`` (pattern, density, transposable, layout per weight)."""
    report = {}
    for name, mod in layers.items():
        mod.weight.copy_(fold_mask(mod.weight, masks[name]))      # pruned entries +0.0: exports are bit-exact
        exp = export_pattern(name)
        if exp is not None:
            problem = nm_violation(mod.weight, exp, layout)
            if problem is not None:
                raise RuntimeError(f"internal error: {name}.weight breaks {exp} after training: {problem}")
        report[f"{name}.weight"] = {"pattern": None if exp is None else str(exp),
                                    "density": float(masks[name].float().mean()),
                                    "transposable": bool(exp and exp.transposable), "layout": layout}
    return report


def _last_good(out: Path, last_ckpt_step: int | None) -> str:
    if last_ckpt_step is None:
        return "checkpoint: none was written yet"
    return f"checkpoint is {RunDir(out).checkpoint} (step {last_ckpt_step})"


def _diverged(step: int, what: str, out: Path, last_ckpt_step: int | None) -> RunError:
    """The one message of a diverged run: where, what, the checkpoint to go back to, and the fix."""
    return RunError(f"training diverged at step {step}: {what}; the last good {_last_good(out, last_ckpt_step)} "
                    "(lower optim.lr)")


def _save_checkpoint(path: Path, model, optimizer, scheduler, method, step: int, epoch: int,
                     run: dict | None = None) -> None:
    py = random.getstate()
    save_checkpoint(path, Checkpoint(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        method=method.state_dict(), step=step, epoch=epoch, run=run or {},
        rng={"torch": torch.get_rng_state(), "python": list(py[1]), "python_gauss": py[2],
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}))


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"]), rng.get("python_gauss")))
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def summary_table(summary: dict) -> Table:
    f = summary["train_flops"]
    table = Table(title=f"nmtrain train · {summary['name']}")
    for col in ("method", "pattern", "density", "final acc", "best acc", "epochs", "wall", "train FLOPs vs dense",
                "sparse layers"):
        table.add_column(col, justify="right" if col not in ("method", "pattern") else "left")
    table.add_row(summary["method"], summary["pattern"] or "–", f"{summary['density']:.2f}",
                  f"{summary['final_accuracy']:.2f}%", f"{summary['best_accuracy']:.2f}%", f"{summary['epochs']:g}",
                  f"{summary['wall_seconds']:.1f} s", f"{f['ratio']:.3f} ({f['dense_over_run']:.2f}x fewer)",
                  str(len(summary["sparse_layers"])))
    return table
