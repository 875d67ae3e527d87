"""`nmtrain.sparsify`: any of nmtrain's training methods inside anyone's own training loop.

    handle = nmtrain.sparsify(model, method="srste", pattern="2:4", optimizer=opt)
    for x, y in loader:                      # the loop is the user's; nothing else changes in it
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    handle.remove()                          # masks folded into the weights: pruned entries exactly 0

The layers are chosen by the rule training uses (`layers.choose_layers`: every Conv2d and Linear but the
first and the last, those that hold the pattern, ``include``/``exclude`` globs), their forward is routed
through the method (`methods.build_method`, the runner's own), and its per-step work runs from hooks, one
`methods.Stepper` keeping the order of the method contract:

- ``before_step`` at the first *training* forward of a step (a sparse layer's forward pre-hook, in train
  mode with gradients enabled; an evaluation under ``torch.no_grad()`` or ``model.eval()`` never triggers it);
- ``after_backward`` in ``optimizer.step()``'s pre-hook: after every backward of the step (gradient
  accumulation) and after the user's gradient clipping, before the weights change. Under AMP's GradScaler,
  ``scaler.step(opt)`` unscales the gradients first, and a step it skips (inf/NaN) is not a step here either;
- ``after_step`` in ``optimizer.step()``'s post-hook, then the step counter moves on.

Under ``torch.compile`` the model trains compiled when each step is begun eagerly, before the compiled
forward (``handle.begin_step()``; `nmtrain train`'s ``train.compile: true`` does it): ``before_step`` is
Python (mask solvers, schedules) and runs there, and the traced pre-hook finds the step begun and adds
nothing to the graph. A compiled training forward of a step not begun, or of a method that cannot be
traced (`Method.compile_problem`: the MVUE weight gradient's own generator), raises one line instead.

`nmtrain train` is a client of the same code: its runner builds its `Sparsified` with `attach_method`
(the layer plan it validated before reading data) and drives it with a plain loop. So a user's loop and
``nmtrain train`` on the same model, data, seed and method end with bit-identical weights
(tests/test_api.py checks every method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sparsity import Pattern, nm_violation
from .build import check_engine_args, check_method_fits, parse_field_pattern
from .compressed import LayerFormat, Loaded
from .convert import write_compressed
from .distributed import check_masks_agree
from .errors import ExperimentError
from .flops import FlopCounter, layer_macs
from .io import check_output_file, first_line
from .layers import LayerPlan, choose_layers, gemm_layers, route_forward, unroute_forward
from .methods import Stepper, build_method, build_params, get_method, params_dict


class SparsifyError(ExperimentError):
    """A bad argument to `nmtrain.sparsify`, `nmtrain.prune`, `nmtrain.oneshot` or a handle; one line."""


COMPILE_REFUSED = ("model: a sparsified model trains under torch.compile only with each step begun first: call "
                   "handle.begin_step() before the compiled forward (or train it uncompiled)")


@torch.compiler.disable(reason="nmtrain refuses this compiled training forward: call handle.begin_step() before "
                               "it, with a method whose compile_problem() is None")
def _refuse_compiled(message: str = COMPILE_REFUSED) -> None:
    # Called from a hook that dynamo is tracing: disabled, so dynamo breaks the graph and runs it eagerly,
    # and its exception reaches the caller. Raised in the traced code itself, dynamo would take it for a
    # failure to trace, drop the hook's frame back to eager, where is_compiling() is False: training would
    # go on half compiled, never refused.
    raise SparsifyError(message)


# ------------------------------------------------------------------------------------------------
# Arguments: the same checks, and the same one-line messages, as a spec's


def unwrap(model: nn.Module, field: str = "model") -> nn.Module:
    """The module whose layers are sparse: DistributedDataParallel's ``.module``; a compiled model is refused."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    # torch.compile(model)'s OptimizedModule, or a model.compile()'d in place (also under DDP)
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        raise SparsifyError(f"{field}: a torch.compile'd model cannot be sparsified; sparsify the model itself, "
                            "then compile it (docs/api.md#torchcompile)")
    if not isinstance(model, nn.Module):
        raise SparsifyError(f"{field}: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise SparsifyError(f"seed: must be an integer in [0, 2**63), got {seed!r}"[:200])
    return seed


def _check_optimizer_holds(optimizer: torch.optim.Optimizer, plan: LayerPlan) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer, mod in plan.sparse.items():
        if id(mod.weight) not in held:
            raise SparsifyError(f"optimizer: it does not hold {layer}.weight; build it on model.parameters() "
                                "before calling nmtrain.sparsify")


def sparsify(model: nn.Module, method: str = "srste", pattern: str = "2:4",
             optimizer: torch.optim.Optimizer | None = None, *, transposable: bool = False, include=(), exclude=(),
             keep_first_dense: bool = True, keep_last_dense: bool = True, layout: str = "nhwc",
             solver: str = "exact", total_steps: int | None = None, seed: int = 0, example_input: Any = None,
             **params) -> "Sparsified":
    """Train ``model`` with ``method`` at ``pattern`` (N kept of every M) in the caller's own loop.

    Chooses the sparse layers (training's rule; ``include``/``exclude`` fnmatch globs on module names),
    routes their forward through the method and hooks ``optimizer`` so that the method's per-step work
    runs inside ``optimizer.step()``; returns the `Sparsified` handle. ``params`` are the method's
    parameters (``nmtrain train``'s ``method.params``, e.g. ``decay=2e-4``), ``transposable`` asks N:M-T
    masks (methods that take them), ``total_steps`` the run's optimizer steps (required by methods whose
    work follows the run's length: phases, ramps), ``seed`` the seed of the method's own draws,
    ``example_input`` one batch the model takes (then a layer whose forward does not run on it stays dense).
    Bad arguments raise `nmtrain.ExperimentError` (or `nmtrain.SparsityError` for a pattern), one line each."""
    model = unwrap(model)
    attached = [name for name, mod in gemm_layers(model).items() if "forward" in vars(mod)]
    if attached:
        raise SparsifyError(f"model: it is already sparsified (layer {attached[0]} runs through a method); call "
                            "remove() or detach() on that handle first")
    cls = get_method(method)
    parsed = build_params(cls, params)
    check_seed(seed)
    asked = parse_field_pattern(pattern, "sparsity.pattern", transposable)
    check_engine_args(layout, solver)
    if total_steps is None and cls.caps.scheduled:
        raise SparsifyError(f"total_steps: method {cls.name} follows the run's length (its phases and ramps); "
                            "pass total_steps=the optimizer steps the loop will make")
    total = 1 if total_steps is None else total_steps
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise SparsifyError(f"total_steps: must be an integer >= 1, got {total_steps!r}")
    if optimizer is None:
        raise SparsifyError("optimizer: pass the optimizer that steps the model (the method's per-step work "
                            "runs inside its step())")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SparsifyError(f"optimizer: expected the torch.optim.Optimizer that steps the model, got "
                            f"{type(optimizer).__name__}")
    check_method_fits(cls, transposable, type(optimizer).__name__.lower())
    plan = choose_layers(model, cls.caps.layer_pattern(asked), layout=layout, include=include, exclude=exclude,
                         keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense,
                         example_input=example_input) if cls.caps.sparse else LayerPlan({}, {})
    _check_optimizer_holds(optimizer, plan)
    return attach_method(model, cls, parsed, plan, cls.caps.mask_pattern(asked), optimizer, layout=layout,
                         solver=solver, total_steps=total, steps_per_epoch=total, seed=seed)


def attach_method(model: nn.Module, cls, params, plan: LayerPlan, pattern: Pattern, optimizer, *, layout: str,
                  solver: str, total_steps: int, steps_per_epoch: int, accel: str = "none", seed: int = 0,
                  count_flops: bool = True) -> "Sparsified":
    """The method on ``plan``'s layers of ``model``, hooked into ``optimizer``: `sparsify` after its checks,
    and the runner with the plan and parameters its spec's pre-flight validated. ``count_flops=False``: no
    MAC-counting hooks (the runner counts the global batch of all its processes itself)."""
    method = build_method(cls, plan.sparse, pattern, params, layout=layout, solver=solver, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, accel=accel, seed=seed)
    return Sparsified(model, method, plan, optimizer, count_flops)


# ------------------------------------------------------------------------------------------------
# The handle


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


class Sparsified:
    """A model trained sparse by a method, in the caller's loop: what `nmtrain.sparsify` returns.

    ``method`` is the method object, ``layers`` the sparse layers by name, ``skipped`` the layers left dense
    and why, ``step`` the optimizer steps taken. Usable as a context manager: leaving the block detaches
    the method (without folding) unless `remove` already did."""

    def __init__(self, model: nn.Module, method, plan: LayerPlan, optimizer: torch.optim.Optimizer,
                 count_flops: bool = True):
        self.model, self.method, self.optimizer = model, method, optimizer
        self.layers, self.skipped = dict(method.ctx.layers), dict(plan.skipped)
        self.stepper = Stepper(method)
        self.counter = FlopCounter({})
        self._macs: dict[str, int] = {}          # this step's forward MACs by layer, from its training forwards
        self._hooks: list = []
        self._attached = True
        route_forward(self.layers, method)
        for mod in self.layers.values():
            self._hooks.append(mod.register_forward_pre_hook(self._on_forward))
        for name, mod in (gemm_layers(model) if count_flops else {}).items():
            self._hooks.append(mod.register_forward_hook(
                lambda module, args, out, _name=name: self._count(_name, module, out)))
        method.bind_optimizer(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.stepper.before_update()))
        self._hooks.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_update()))

    # --- the hooks ---------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if torch.compiler.is_compiling():
            # dynamo tracing a training forward: the step must have begun eagerly (begin_step), and the
            # method's forward must trace; else refuse (see _refuse_compiled). Traced with the step begun,
            # this hook adds nothing to the graph, only a guard on ``begun``.
            problem = self.method.compile_problem(self.method.params)
            if problem is not None:
                _refuse_compiled(f"model: {problem}")
            if not self.stepper.begun:
                _refuse_compiled()
            return
        self.stepper.begin()

    def begin_step(self) -> None:
        """Begin the optimizer step now: the method's ``before_step`` (masks recomputed when due), which
        otherwise runs at the step's first training forward. Needed each step before the forward of a
        model compiled by ``torch.compile``, where that work cannot run (it is Python: mask solvers,
        schedules); harmless anywhere else (once per step, whoever calls first)."""
        self._require_attached("begin_step")
        self.stepper.begin()

    def _count(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(out, torch.Tensor):
            self._macs[name] = self._macs.get(name, 0) + layer_macs(module, out)

    def _after_update(self) -> None:
        step = self.stepper.step
        self.counter.add_macs(self._macs, {n: self.method.densities(n, step) for n in self.layers})
        self._macs = {}
        self.stepper.after_update()

    # --- what the method holds ---------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.stepper.step

    @property
    def pattern(self) -> Pattern | None:
        return self.method.ctx.pattern if self.method.caps.sparse else None

    def masks(self) -> dict[str, torch.Tensor]:
        """Every sparse layer's current keep-mask (bool, the weight's shape), by layer name."""
        return self.method.masks()

    def check_ranks(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        """Under DistributedDataParallel: raise RuntimeError naming the first layer whose mask differs
        between rank 0 and another rank (nothing to check in a single process). `nmtrain train` runs this at
        every evaluation; call it where a run of yours would want to know. ``masks``: `masks()`'s result when
        you have it already (None: taken here)."""
        masks = self.masks() if masks is None else masks
        device = next(iter(masks.values())).device if masks else torch.device("cpu")
        check_masks_agree(masks, device, self.step)

    def flops(self) -> dict:
        """This process's training GEMM MACs so far, forward, backward-data and backward-weight, at the
        densities the method's N:M operands allow (docs/methods.md, FLOPs), against dense: ``ratio``."""
        return self.counter.summary()

    def summary(self) -> dict:
        """Method, parameters, pattern and density, steps taken, the sparse layers (shape, kept share), the
        layers left dense and why, and `flops`."""
        pattern = self.pattern
        masks = self.masks()
        return {"method": self.method.name, "params": params_dict(self.method.params),
                "pattern": None if pattern is None else str(pattern),
                "density": 1.0 if pattern is None else pattern.density, "step": self.step,
                "sparse_layers": {name: {"shape": list(mod.weight.shape),
                                         "density": float(masks[name].float().mean()) if name in masks else 1.0}
                                  for name, mod in self.layers.items()},
                "skipped_layers": dict(self.skipped), "flops": self.flops()}

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks, permutations, the method's random generators, its counters and the step: what a checkpoint
        needs (beside the model's and the optimizer's) to resume bit-exactly. Take it between steps."""
        f = self.counter
        return {"method": self.method.state_dict(), "step": self.step,
                "flops": {"forward": f.forward, "backward_data": f.backward_data,
                          "backward_weight": f.backward_weight, "dense_total": f.dense_total}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict`'s result (tensors are moved to the model's device)."""
        if not isinstance(state, dict) or not isinstance(state.get("method"), dict) \
                or isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int):
            raise SparsifyError("state: expected the dict of Sparsified.state_dict() (keys method, step)")
        device = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")
        try:
            self.method.load_state_dict(_to_device(state["method"], device))
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise SparsifyError(f"state: it does not fit method {self.method.name} on this model "
                                f"({first_line(exc)})") from None
        self.stepper.step, self.stepper.begun = state["step"], False
        for key, value in (state.get("flops") or {}).items():
            setattr(self.counter, key, value)

    # --- the end -----------------------------------------------------------------------------
    def remove(self) -> dict:
        """Fold every mask into its weight (pruned entries exactly +0.0; what the method deploys) and detach
        the method: the layers' own forward is back, the optimizer's hooks are gone. Returns, per sparse
        weight, its pattern (None: no N:M guarantee), kept share, transposable and layout."""
        self._require_attached("remove")
        report = fold_masks(self.method, self.masks(), self.method.ctx.layout)
        self.detach()
        return report

    def detach(self) -> None:
        """Detach the method without folding its masks (the weights stay dense)."""
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        unroute_forward(self.layers)
        self._hooks, self._attached = [], False

    def export(self, path: str | Path) -> Path:
        """Write the model as `nmtrain convert`'s compressed safetensors file: the deployed weights, each N:M
        layer as its kept values and in-group positions (the model itself is not changed)."""
        self._require_attached("export")
        out = check_output_file(path, "path")        # before any work: only a regular file is replaced
        state, layers = deployed_state(self.model, self.method, self.masks())
        write_compressed(out, Loaded(state, layers, "api"), "path")
        return out

    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise SparsifyError(f"{what}: the method was already removed from this model")

    def __enter__(self) -> "Sparsified":
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False


@torch.no_grad()
def fold_masks(method, masks: dict[str, torch.Tensor], layout: str) -> dict:
    """Set every sparse layer's weight to the one its method deploys (``W * mask`` unless the method says
    otherwise), in place, and check it against the pattern the method exports; returns summary.json's
    ``sparse_layers`` (pattern, density, transposable, layout per weight)."""
    report = {}
    for name, mod in method.ctx.layers.items():
        mod.weight.copy_(method.deployed_weight(name, mod, masks[name]))    # pruned entries +0.0: bit-exact exports
        exp = method.export_pattern(name)
        if exp is not None:
            problem = nm_violation(mod.weight, exp, layout)
            if problem is not None:
                raise RuntimeError(f"internal error: {name}.weight breaks {exp} after training: {problem}")
        report[f"{name}.weight"] = {"pattern": None if exp is None else str(exp),
                                    "density": float(masks[name].float().mean()),
                                    "transposable": bool(exp and exp.transposable), "layout": layout}
    return report


@torch.no_grad()
def deployed_state(model: nn.Module, method, masks: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the model's state_dict on the CPU with every sparse weight as deployed, the N:M layers' formats)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    layers = {}
    for name, mod in method.ctx.layers.items():
        state[f"{name}.weight"] = method.deployed_weight(name, mod, masks[name]).detach().cpu().clone()
        exp = method.export_pattern(name)
        if exp is not None:
            layers[f"{name}.weight"] = LayerFormat(exp, method.ctx.layout)
    return state, layers
