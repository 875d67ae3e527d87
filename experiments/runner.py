"""The training runner: one spec in, one run directory out.

It knows nothing about any particular method: it builds data, model and optimizer from the spec,
routes the sparse layers' forward through the method found by name, and records what happened::

    DIR/config.yaml      the resolved spec (every default filled in)
    DIR/metrics.jsonl    one line per eval: step, epoch, loss, the task's metrics (test_loss, accuracy of an
                         image classifier; val_loss, perplexity, bpc of a language model), lr, mask_change_rate
                         (and mask_recomputes: step and change rate of each mask recompute since the last line)
    DIR/tokenizer.json   a language-model run's tokenizer, written at its start
    DIR/checkpoint.pt    model, optimizer, scheduler, method state (masks), RNG states, step, and the
                         run's counters (best accuracy or val loss, running loss, FLOPs, wall time, metrics lines)
    DIR/model.pt         final state_dict with masks folded in: pruned weights exactly zero
    DIR/summary.json     method, pattern, accuracies, wall time, sparse layers, training FLOPs, accel, and
                         the model's builder (model.name, its source file or library, its arguments)

What a batch means is the run's task (`tasks/`, from the dataset): its loss, how many targets a batch
holds (the running train loss is per target: per image, or per token), its metrics and which way is better.

The run goes in named phases, each a function below: `_build` (spec → device, data, model, layer
plan, schedule length); the optimizer, and the method attached as `nmtrain.sparsify` attaches it
(`attach_method`); `_equip` (what needs them: the DDP wrapper, scheduler, FLOP counter); `_start` or
`_restore`; `_loop` (`_train_step`, then `_after_step`: `_evaluate_step` and `_checkpoint` at their
intervals); the masks folded in (`Sparsified.remove`); `_finish` (write model.pt and summary.json).
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
every rank are compared by checksum; a divergence raises RuntimeError naming the layer. What a
process knows of the others (its rank, the group, the mask check) is `distributed.py`'s.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from ..data.loaders import set_epoch
from ..sparsity import Pattern
from .io import CheckpointError, first_line, state_dict_mismatch
from .build import Built, Preflight, build, layer_plan, resolve_device, validate
from .distributed import (initialized, process_group, rank_and_world, rank_device, sum_across,
                          world_size)
from .methods import params_dict
from .methods.ste import change_rate
from .layers import LayerPlan
from .models import builder_record
from .memory import keep_freed_memory
from .denormals import flush_denormals
from .flops import FlopCounter, macs_per_sample
from .optim import AdamW
from .sparsify import Sparsified, attach_method
from .rundir import Checkpoint, Counters, RunDir, RunError, Summary, check_flags, load_weights, save_checkpoint
from .spec import Spec, SpecError, dump_spec
from .tasks import Task, get_task

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
    warmup = sch.warmup_steps or int(round(sch.warmup_epochs * steps_per_epoch))
    floor = sch.min_lr / spec.optim.lr      # cosine ends at min_lr (validate: not above optim.lr)
    milestones = sorted(int(round(e * steps_per_epoch)) for e in sch.milestones)
    # sch.name is one of its field's choices (spec.ScheduleSpec), checked by validate

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sch.name == "cosine":
            span = max(total_steps - warmup, 1)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        if sch.name == "step":
            return sch.gamma ** sum(step >= m for m in milestones)
        return 1.0
    return factor


def _optimizer(spec: Spec, model: nn.Module) -> torch.optim.Optimizer:
    o = spec.optim      # o.name is sgd or adamw: its field's choices (spec.OptimSpec), checked by validate
    params = list(model.parameters())
    if o.decay_params == "matrices":    # one group decays (matrices and embeddings), one does not (biases, norms)
        params = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = True if o.fused else None       # None: torch's own choice, as before the field existed
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0, fused=fused)
    # torch's AdamW, bit for bit, that takes the pruned weights' zero second moments at full speed (optim.py)
    return AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused)


@dataclass
class RunResult:
    out: Path
    summary: dict


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(spec: Spec, overwrite: bool = False, console=None, progress: bool = True, resume: bool = False,
          preflight: Preflight | None = None) -> RunResult:
    """Train ``spec`` into the run directory ``spec.out``; with ``resume``, continue the run there from its
    checkpoint.pt (``spec`` must then be the run's saved config.yaml). ``preflight``: `validate`'s result
    for ``spec`` when the caller has it (compare's cells), else the spec is validated here. Under torchrun
    (``WORLD_SIZE > 1``) every process calls this; rank 0 alone writes and prints."""
    check_flags(overwrite, resume)
    keep_freed_memory()         # the next step reuses what a step frees, with no page faults (experiments/memory.py)
    if world_size() == 1 or initialized():
        return _train(spec, overwrite, console, progress, resume, preflight)
    preflight = preflight or validate(spec, world_size())
    RunDir(spec.out).check_target(overwrite, resume)   # every rank, before rank 0 can write anything (init is a rendezvous)
    with process_group(resolve_device(spec.device)) as rank:
        return _train(spec, overwrite, console if rank == 0 else None, progress and rank == 0, resume, preflight,
                      target_checked=True)


@dataclass
class Run:
    """One training run in progress: what `_build` made from the spec, the method and optimizer that
    `_equip` adds once the method is attached, and the counters a checkpoint keeps."""
    spec: Spec
    rd: RunDir
    device: torch.device
    world: int                      # processes (1 unless launched by torchrun)
    main: bool                      # rank 0: the one process that writes and prints
    built: Built                    # datasets, loaders, model
    task: Task                      # what a batch means: loss, targets, metrics (the dataset's task)
    plan: LayerPlan
    pattern: Pattern
    method_cls: type
    params: object                  # the method's parameters, parsed
    steps_per_epoch: int
    total_steps: int
    method: object = None
    handle: Sparsified = None       # the method attached as `nmtrain.sparsify` attaches it (its hooks, its steps)
    net: nn.Module = None           # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    flops: FlopCounter = None
    step: int = 0
    best: float = -1.0              # the task's best_metric at its best so far (`_build` starts it at the task's worst)
    running_loss: float = 0.0       # train loss summed since the last eval, over running_n targets
    running_n: int = 0
    wall_before: float = 0.0        # seconds trained before this process (a resumed run)
    start: float = 0.0              # perf_counter when this process started training
    metrics: list[dict] = field(default_factory=list)     # the records of metrics.jsonl so far
    last_masks: dict = field(default_factory=dict)      # the masks at the last eval
    last_ckpt_step: int | None = None

    @property
    def model(self) -> nn.Module:
        return self.built.model

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    def diverged(self, step: int, what: str) -> RunError:
        return _diverged(step, what, self.rd.path, self.last_ckpt_step)


def _train(spec: Spec, overwrite: bool, console, progress: bool, resume: bool, preflight: Preflight | None,
           target_checked: bool = False) -> RunResult:
    run, ckpt = _build(spec, overwrite, resume, preflight, target_checked)
    # Rank 0 holds the directory while it writes; a new run that fails before its first checkpoint leaves nothing.
    held = contextlib.nullcontext() if not run.main else run.rd.writing() if ckpt is None else run.rd.holding()
    # denormals taken as zero on every thread for this run alone: compare's next cell finds the modes as they were
    modes = flush_denormals() if spec.train.flush_denormals else contextlib.nullcontext()
    with held, modes:
        # The method, as `nmtrain.sparsify` attaches it in a user's loop: the sparse layers' forward runs
        # through it and its per-step work in the optimizer's hooks, until `remove` folds the masks in (or
        # the block ends).
        optimizer = _optimizer(spec, run.model)
        with attach_method(run.model, run.method_cls, run.params, run.plan, run.pattern, optimizer,
                           layout=spec.sparsity.layout, solver=spec.sparsity.solver, total_steps=run.total_steps,
                           steps_per_epoch=run.steps_per_epoch, accel=spec.accel, seed=spec.seed,
                           count_flops=False) as handle:       # the run's FlopCounter counts the global batch
            _equip(run, handle)
            if ckpt is None:
                _start(run)
            else:
                _restore(run, ckpt)
            _loop(run, console, progress)
            wall = run.wall()
            # Evaluate what a user deploys: the masks folded into plain weights.
            handle.check_ranks()
            sparse_layers = handle.remove()
        return _finish(run, sparse_layers, wall)


# ------------------------------------------------------------------------------------------------
# build, restore


def _build(spec: Spec, overwrite: bool, resume: bool, preflight: Preflight | None,
           target_checked: bool) -> tuple[Run, Checkpoint | None]:
    """Spec → device, data, model with its starting weights, layer plan and schedule length; and the
    checkpoint to resume from (None for a new run). ``preflight`` is `validate`'s result when the caller
    has it; ``target_checked``: `train` already checked the directory (every process, before the rendezvous)."""
    rd = RunDir(spec.out)
    if preflight is None:
        preflight = validate(spec)
    if not target_checked:
        rd.check_target(overwrite, resume)      # with resume: the run files it will rewrite
    rank, world = rank_and_world()
    ckpt = rd.load_checkpoint() if resume else None
    device = rank_device(resolve_device(spec.device))     # a multi-process CUDA run: this rank's GPU

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    built = build(spec, augment=spec.data.augment, holdout=spec.data.holdout, rank=rank, world=world)
    _load_weights(spec, rd, built.model, ckpt)
    built.model.to(device)

    plan = layer_plan(spec, built, preflight.layer_pattern, device)
    steps_per_epoch = len(built.train_loader)
    total_steps = spec.train.epochs * steps_per_epoch
    if spec.train.max_steps is not None:
        total_steps = min(total_steps, spec.train.max_steps)
    task = get_task(built.info.task)
    run = Run(spec, rd, device, world, rank == 0, built, task, plan, preflight.pattern, preflight.method,
              preflight.params, steps_per_epoch, total_steps, best=task.worst)
    return run, ckpt


def _load_weights(spec: Spec, rd: RunDir, model: nn.Module, ckpt: Checkpoint | None) -> None:
    """The checkpoint's weights when resuming, else ``model.init``'s when the spec names a file."""
    if spec.model.init and ckpt is None:
        state = load_weights(spec.model.init, field="model.init")
        problem = state_dict_mismatch(model.state_dict(), state)
        if problem:
            raise SpecError(f"model.init: {spec.model.init} does not match model {spec.model.name}: {problem}")
        model.load_state_dict(state)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.model)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"--resume: {rd.checkpoint} does not match model {spec.model.name} of "
                                  f"{rd.config} ({first_line(exc)})") from None


def _equip(run: Run, handle: Sparsified) -> None:
    """What needs the attached method: the DDP wrapper, schedule and FLOP counter."""
    spec = run.spec
    method = run.method = handle.method
    run.handle, run.net, run.optimizer = handle, run.model, handle.optimizer
    handle.stepper.on_mask_error = lambda exc: _mask_error(run)
    if run.distributed:   # after routing: DDP's forward then runs the method's sparse forward
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if spec.train.compile:
        # Each run starts dynamo afresh: compare runs its cells in one process, and compiled frames cached
        # for an earlier cell's model would count towards the recompile limit, past which dynamo falls
        # back to eager without a word.
        torch._dynamo.reset()
        run.net = torch.compile(run.net)      # the training forward and backward; evaluation stays eager
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer,
                                                      _lr_lambda(spec, run.steps_per_epoch, run.total_steps))
    # MACs depend on shapes alone: the task's probe input, not a batch loaded from the test split
    run.flops = FlopCounter(macs_per_sample(run.model, run.task.example_input(run.built.info, run.device)))
    run.last_masks = {k: v.clone() for k, v in method.masks().items()}


def _start(run: Run) -> None:
    """A new run: the resolved spec, with the method's parameters filled in, goes first: it names the run."""
    resolved = copy.deepcopy(run.spec)
    resolved.method.params = params_dict(run.params)
    if run.main:
        run.rd.write_config(dump_spec(resolved))
        if run.built.info.tokenizer is not None:       # how the run's token ids read as text (nmtrain sample)
            run.rd.write_tokenizer(run.built.info.tokenizer)


def _restore(run: Run, ckpt: Checkpoint) -> None:
    """A resumed run: optimizer, schedule, method state, counters, metrics so far and RNG states."""
    try:
        run.optimizer.load_state_dict(ckpt.optimizer)
        run.scheduler.load_state_dict(ckpt.scheduler)
        run.handle.load_state_dict({"method": ckpt.method, "step": ckpt.step})
        counters = ckpt.counters()
        run.step = ckpt.step
        run.best, run.running_loss, run.running_n = counters.best, counters.running_loss, counters.running_n
        run.wall_before = counters.wall
        for key, value in counters.flops.items():
            setattr(run.flops, key, value)
        if counters.last_masks is not None:
            run.last_masks = {k: v.to(run.device) for k, v in counters.last_masks.items()}
        else:
            run.last_masks = {k: v.clone() for k, v in run.method.masks().items()}
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"--resume: {run.rd.checkpoint} does not fit the run in {run.rd.config} "
                              f"({first_line(exc)})") from None
    if run.step > run.total_steps:
        raise CheckpointError(f"--resume: {run.rd.checkpoint} is at step {run.step}, past the run's "
                              f"{run.total_steps} steps")
    done = run.rd.read_metrics()
    run.metrics = done if counters.metrics_lines is None else done[:counters.metrics_lines]
    run.last_ckpt_step = run.step
    _restore_rng(ckpt.rng)      # last: building the run above may draw from the global RNGs


# ------------------------------------------------------------------------------------------------
# the loop: step, evaluate, checkpoint


def _loop(run: Run, console, progress: bool) -> None:
    """Train from ``run.step`` to the last step. A first Ctrl-C is deferred to the end of the step,
    which is then checkpointed; a second stops at once and keeps the last checkpoint."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  {task.fields[metric]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress)
    run.start = time.perf_counter()
    in_step = False
    try:
        with bar, _DeferSigint() as sigint:
            task = bar.add_task(f"{run.spec.name} · {run.method_cls.name}", total=run.total_steps,
                                completed=run.step, loss=float("nan"), metric=f"{run.task.short} –")
            run.model.train()
            while run.step < run.total_steps:
                epoch = run.step // run.steps_per_epoch    # a resumed epoch skips the batches already done
                set_epoch(run.built.train_loader, epoch, run.step - epoch * run.steps_per_epoch)
                for x, y in run.built.train_loader:
                    if run.step >= run.total_steps:
                        break
                    in_step = True
                    step_loss = _train_step(run, x, y)
                    bar.update(task, advance=1, loss=step_loss)
                    metrics = _after_step(run)
                    if metrics is not None:
                        bar.update(task, metric=f"{run.task.short} {run.task.format(metrics[run.task.primary])}")
                    in_step = False
                    if sigint.requested:
                        raise KeyboardInterrupt
    except KeyboardInterrupt:
        # At a step boundary the state is consistent: checkpoint it. Inside a step (a second Ctrl-C)
        # the model may be half-updated: keep the last checkpoint.
        if not in_step and run.last_ckpt_step != run.step:
            _checkpoint(run)
        raise Interrupted(run.rd.path, run.step, run.last_ckpt_step) from None


def _train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on the batch (x, y), the method's hooks keeping the contract's order; returns its
    train loss. A non-finite loss stops the run before the backward."""
    step, method = run.step, run.method
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    # The plain loop of a user's own: the method's work runs in its hooks (docs/api.md); the schedule last.
    # The step is begun here, eagerly, as a compiled forward needs (train.compile; elsewhere the same call
    # the first sparse layer's forward would make).
    run.handle.begin_step()
    loss, step_loss, step_n, step_targets = _loss(run, x, y)
    if not math.isfinite(step_loss):
        raise run.diverged(step, f"loss is {step_loss}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.spec.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]],
                                       run.spec.optim.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.flops.add_step(step_n, {n: method.densities(n, step) for n in method.ctx.layers})    # per sample
    run.running_loss += step_loss * step_targets
    run.running_n += step_targets
    run.step += 1
    return step_loss


def _mask_error(run: Run) -> None:
    """A mask solver refused the weights in ``before_step``: when they are not finite, that is the
    divergence, say so (finite ones leave the solver's error as it is)."""
    if _finite(run.model):
        return
    if run.step == 0:
        raise RunError("the starting weights are not finite (NaN/Inf); check model.init") from None
    raise run.diverged(run.step - 1, NOT_FINITE_AFTER_UPDATE) from None


def _loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, int, int]:
    """(loss to backpropagate, the step's mean train loss per target, samples and targets in the step)."""
    task = run.task
    if not run.distributed:
        loss = task.loss(run.net, x, y)
        return loss, loss.item(), y.shape[0], task.targets(y)   # one host sync per step
    # Sum over this rank's targets (labels, or tokens), scaled so that DDP's gradient average is the
    # mean over the global batch's targets (exact also for the epoch's last, unevenly split batch).
    global_batch = run.spec.data.batch_size
    n_step = min(global_batch, len(run.built.train_ds) - (run.step % run.steps_per_epoch) * global_batch)
    n_targets = n_step * (task.targets(y) // y.shape[0])        # every sample holds as many targets
    loss_sum = task.loss(run.net, x, y, reduction="sum")
    loss = loss_sum * (run.world / n_targets)
    stat = torch.stack([loss_sum.detach().double(),
                        torch.tensor(float(task.targets(y)), dtype=torch.float64, device=run.device)])
    sum_across(stat)
    return loss, float(stat[0]) / float(stat[1]), n_step, n_targets


def _after_step(run: Run) -> dict[str, float] | None:
    """Evaluate and checkpoint when their intervals (or the last step) come; returns the metrics if evaluated."""
    step, spe = run.step, run.steps_per_epoch
    do_eval = step % (run.spec.train.eval_interval or spe) == 0 or step == run.total_steps
    do_ckpt = step % (run.spec.train.checkpoint_interval or spe) == 0 or step == run.total_steps
    if (do_eval or do_ckpt) and not _finite(run.model):
        raise run.diverged(step - 1, NOT_FINITE_AFTER_UPDATE)
    metrics = _evaluate_step(run) if do_eval else None
    if do_ckpt:
        _checkpoint(run)
    return metrics


def _evaluate_step(run: Run) -> dict[str, float]:
    """The task's metrics on the test (validation) loader, one line of metrics.jsonl; the running train
    loss starts again."""
    metrics = run.task.evaluate(run.model, run.built.test_loader, run.device)
    masks = run.method.masks()
    run.handle.check_ranks(masks)
    record = {"step": run.step, "epoch": round(run.step / run.steps_per_epoch, 4),
              "loss": run.running_loss / max(run.running_n, 1), **metrics,
              "lr": run.optimizer.param_groups[0]["lr"], "mask_change_rate": change_rate(run.last_masks, masks)}
    record.update(run.method.metric_fields())
    events = run.method.pop_mask_events()
    if events:      # per recompute, for methods that recompute at intervals
        record["mask_recomputes"] = events
    run.last_masks = {k: v.clone() for k, v in masks.items()}
    run.running_loss, run.running_n = 0.0, 0
    run.best = run.task.best(run.best, metrics)
    run.metrics.append(record)
    if run.main:
        run.rd.write_metrics(run.metrics)
    return metrics


def _checkpoint(run: Run) -> None:
    """Everything `_restore` needs, at a step boundary (rank 0 writes; every rank checks the weights)."""
    if not _finite(run.model):
        raise run.diverged(run.step, "the weights are not finite")
    if run.main:
        f = run.flops
        counters = Counters(best=run.best, running_loss=run.running_loss, running_n=run.running_n, wall=run.wall(),
                            metrics_lines=len(run.metrics),
                            flops={"forward": f.forward, "backward_data": f.backward_data,
                                   "backward_weight": f.backward_weight, "dense_total": f.dense_total},
                            last_masks=run.last_masks)
        _save_checkpoint(run.rd.checkpoint, run.model, run.optimizer, run.scheduler, run.handle.state_dict()["method"],
                         run.step,
                         run.step // run.steps_per_epoch, counters)
    run.last_ckpt_step = run.step


# ------------------------------------------------------------------------------------------------
# finish


def _finish(run: Run, sparse_layers: dict, wall: float) -> RunResult:
    """Evaluate the model with the masks folded in (``sparse_layers``: `Sparsified.remove`'s report), write
    model.pt and summary.json."""
    spec, method, info, pattern = run.spec, run.method, run.built.info, run.pattern
    dense = not run.method_cls.caps.sparse
    final = run.task.evaluate(run.model, run.built.test_loader, run.device)
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    if run.main:
        run.rd.write_model(state)
    summary = Summary(
        name=spec.name, method=run.method_cls.name, method_params=params_dict(run.params),
        pattern=None if dense else str(pattern), density=1.0 if dense else pattern.density,
        model=spec.model.name, dataset=spec.data.dataset, seed=spec.seed, device=str(run.device),
        builder=builder_record(spec.model.name, info, spec.model),
        results=run.task.summary_fields(final, run.best),
        eval_split=run.task.split if spec.data.holdout is None else f"holdout ({spec.data.holdout} train samples)",
        epochs=round(run.step / run.steps_per_epoch, 4), steps=run.step, wall_seconds=wall,
        sparse_layers=sparse_layers, skipped_layers=run.plan.skipped if not dense else {},
        train_flops=run.flops.summary(),
        accel=method.accel_report() or {"mode": spec.accel, "sparse_layers": [], "fallback": {}},
        method_fields=method.summary_fields(), processes=run.world if run.distributed else None,
        task=run.task.name, corpus=info.corpus,
    ).to_dict()
    if run.main:
        run.rd.write_summary(summary)
    return RunResult(run.rd.path, summary)      # the caller shows it: `nmtrain train` a table, `compare` a line


def _last_good(out: Path, last_ckpt_step: int | None) -> str:
    if last_ckpt_step is None:
        return "checkpoint: none was written yet"
    return f"checkpoint is {RunDir(out).checkpoint} (step {last_ckpt_step})"


def _diverged(step: int, what: str, out: Path, last_ckpt_step: int | None) -> RunError:
    """The one message of a diverged run: where, what, the checkpoint to go back to, and the fix."""
    return RunError(f"training diverged at step {step}: {what}; the last good {_last_good(out, last_ckpt_step)} "
                    "(lower optim.lr)")


def _save_checkpoint(path: Path, model, optimizer, scheduler, method_state: dict, step: int, epoch: int,
                     counters: Counters | None = None) -> None:
    py = random.getstate()
    save_checkpoint(path, Checkpoint(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        method=method_state, step=step, epoch=epoch, run=counters.to_dict() if counters else {},
        rng={"torch": torch.get_rng_state(), "python": list(py[1]), "python_gauss": py[2],
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}))


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(v) for v in rng["python"]), rng.get("python_gauss")))
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def summary_table(summary: dict) -> Table:
    """`nmtrain train`'s table: the task's columns (final and best accuracy; perplexity and val loss)."""
    f = summary["train_flops"]
    columns = get_task(summary.get("task", "classification")).columns
    table = Table(title=f"nmtrain train · {summary['name']}")
    for col in ("method", "pattern", "density", *(c.label for c in columns), "epochs", "wall", "train FLOPs vs dense",
                "sparse layers"):
        table.add_column(col, justify="right" if col not in ("method", "pattern") else "left")
    table.add_row(summary["method"], summary["pattern"] or "–", f"{summary['density']:.2f}",
                  *(c.format(summary[c.key]) for c in columns), f"{summary['epochs']:g}",
                  f"{summary['wall_seconds']:.1f} s", f"{f['ratio']:.3f} ({f['dense_over_run']:.2f}x fewer)",
                  str(len(summary["sparse_layers"])))
    return table
