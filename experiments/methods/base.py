"""The method contract: the `Method` interface, its `Capabilities`, the `Context` it is built with, and the
registry the method modules add themselves to (`register_method`), with `attach`.

In a module of its own so that the method modules import it, not their package (which imports them to
register them): see the package docstring for the life of a training step.
"""


from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ...sparsity import Pattern, fold_mask, nm_mask
from ...sparsity.nm import nm_mask_and_product
from ...sparsity.batch import LayerMakes
from ...sparsity.fused import MAX_ENTRIES, add_pruned_decay_
from ...sparsity.threads import split_map
from ..errors import ExperimentError
from ..layers import gemm, route_forward, unroute_forward
from .ste import change_rate, product, ste_mask, ste_nm
from .wgrad import WeightGradSampler, mvue_gemm


class MethodError(ExperimentError):
    """A method name or parameter that cannot be used; one-line message naming the field."""


@dataclass
class Context:
    """What a method needs to know about the run."""
    layers: dict[str, nn.Module]    # the sparse layers, by module name
    pattern: Pattern
    layout: str
    solver: str
    total_steps: int
    steps_per_epoch: int
    accel: str = "none"             # spec.accel: "semi_structured" runs 2:4 layers on sparse kernels (experiments/accel.py)
    seed: int = 0                   # the run's seed (spec.seed): a method's own random draws start from it


@dataclass
class NoParams:
    pass


GEMMS = ("forward", "backward_data", "weight_grad")    # a layer's three training GEMMs, as densities() orders them


@dataclass(frozen=True)
class Capabilities:
    """What a method is, declared once per class; everything outside ``methods/`` asks this, not the name."""
    sparse: bool = True                     # masks weights (False: the dense baseline: no pattern, no masks)
    sparse_gemms: tuple[str, ...] = ()      # of GEMMS: those whose weight operand can be N:M (densities() < 1)
    needs_transposable: bool = False        # its masks are always N:M-T (layers must fit M x M tiles)
    accepts_transposable: bool = False      # sparsity.transposable: true is meaningful for it
    needs_column_groups: bool = False       # layers need C_out % M == 0 (groups of M output channels)
    accel_patterns: tuple[tuple[int, int], ...] = ()   # (N, M) it can run on accel: semi_structured kernels
    optimizers: tuple[str, ...] = ()        # the optim.name values it works with (empty: any)
    scheduled: bool = False                 # its work follows the run's length (ctx.total_steps): phases, ramps

    def __post_init__(self):
        unknown = set(self.sparse_gemms) - set(GEMMS)
        if unknown:
            raise ValueError(f"Capabilities.sparse_gemms: unknown GEMM(s) {sorted(unknown)}; use {GEMMS}")
        if not self.sparse and (self.sparse_gemms or self.needs_transposable or self.accepts_transposable
                                or self.needs_column_groups or self.accel_patterns):
            raise ValueError("Capabilities: a method that masks nothing (sparse=False) has no sparse capability")

    # The one rule from capabilities to patterns: validate, the runner's layer plan and the methods ask these.
    def mask_pattern(self, asked: Pattern) -> Pattern:
        """The pattern this method's masks satisfy when the spec asks ``asked``: N:M-T where it needs it."""
        return Pattern(asked.n, asked.m, transposable=True) if self.needs_transposable else asked

    def layer_pattern(self, asked: Pattern) -> Pattern:
        """The pattern a layer must fit to be sparse: M x M tiles for transposable masks, and the same
        C_out % M == 0 for column groups (Bi-Mask's backward mask groups M output channels)."""
        p = self.mask_pattern(asked)
        return Pattern(p.n, p.m, transposable=p.transposable or self.needs_column_groups)

    def accel(self, pattern) -> bool:
        """Whether a run at ``pattern`` can use the ``accel: semi_structured`` kernels at all."""
        return (pattern.n, pattern.m) in self.accel_patterns


class Method:
    name = "base"
    Params: type = NoParams
    caps = Capabilities()             # each registered method declares its own
    summary = ""

    def __init__(self, params: Any, ctx: Context):
        self.params = params
        self.ctx = ctx
        self._wgrad: WeightGradSampler | None = None    # the MVUE weight gradients' draws, made on first use
        self._decay: dict[str, tuple[torch.Tensor, float]] = {}     # this step's SR-STE decays: mask, lambda_W
        self._cast: dict[str, tuple] = {}       # mask_as: per layer (mask, its version, its cast or None)
        self._ready: dict[str, tuple] = {}      # per_forward: per layer (its weight, that weight's version, made)
        self._makes = LayerMakes()              # per_forward's batch: every layer's make in one call per thread
        self._forwards_eager = False            # a forward has taken per_forward's path (see hold_for_forward)

    # --- forward -----------------------------------------------------------------------------
    def forward_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        return module.weight

    def layer_forward(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_gemm(name, module, x, self.forward_weight(name, module))

    def sparse_gemm(self, name: str, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's own operation with ``weight``: where a method's forward ends. A method whose
        ``mvue_dw`` parameter is on takes its weight gradient as ``MVUE(dYᵀ) X`` here (methods/wgrad.py);
        without a backward to come (no grad mode) the plain operation is the same forward."""
        if getattr(self.params, "mvue_dw", False) and torch.is_grad_enabled():
            return mvue_gemm(module, x, weight, self.wgrad_sampler().generator)
        return gemm(module, x, weight)

    def wgrad_sampler(self) -> WeightGradSampler:
        """The source of the MVUE weight gradients' draws, seeded from the run's seed (ctx.seed)."""
        if self._wgrad is None:
            self._wgrad = WeightGradSampler(self.ctx.seed)
        return self._wgrad

    # --- SR-STE's decay on pruned weights ----------------------------------------------------
    def masked_with_decay(self, name: str, module: nn.Module, mask: torch.Tensor, decay: float) -> torch.Tensor:
        """``W ⊙ mask`` with the straight-through gradient (all of W learns), and SR-STE's ``decay · (1 − mask) ⊙ W``
        noted for `add_pruned_decay`: added to W's gradient once per optimizer step."""
        self.note_decay(name, module, mask, decay)
        return ste_mask(module.weight, self.mask_as(name, mask, module.weight))

    def masked_nm_with_decay(self, name: str, module: nn.Module, pattern: Pattern, decay: float) -> torch.Tensor:
        """`masked_with_decay` with the row-wise N:M magnitude mask of the layer's current weights (SR-STE's and
        its kin's, recomputed at every forward), the mask and ``W ⊙ mask`` made together (`ste.ste_nm`), every
        layer's at a step's first training forward (`per_forward`)."""
        layout = self.ctx.layout
        made = None if torch.compiler.is_compiling() else self.per_forward(
            name, module, lambda _name, mod: nm_mask_and_product(mod.weight, pattern.n, pattern.m, layout),
            split=pattern.m == 4,       # M = 4: a compiled kernel's work (else torch's topk, on torch's threads)
            batch=lambda weights: self._makes.masked(weights, pattern.n, layout) if pattern.m == 4 else None)
        out, mask = ste_nm(module.weight, pattern.n, pattern.m, layout, made)
        self.note_decay(name, module, mask, decay)
        return out

    def trained_weights(self) -> list[torch.Tensor] | None:
        """Every sparse layer's weight, in `ctx.layers`' order, where each takes a gradient; else None. Outputs kept
        from step to step (`sparsity.batch.LayerMakes`) serve only these: each forward joins what it takes to its
        weight by a view, whose version autograd checks, so no backward reads an output refilled since."""
        weights = [mod.weight for mod in self.ctx.layers.values()]
        return weights if all(w.requires_grad for w in weights) else None

    def own_matrix_views(self, weights: list[torch.Tensor]) -> bool:
        """Whether each weight's GEMM view is its own memory, rows as they lie (a Linear, or any layer under the
        ``flatten`` layout): what the batched kernels of a matrix's rows take."""
        return self.ctx.layout == "flatten" or all(w.dim() == 2 for w in weights)

    def per_forward(self, name: str, module: nn.Module, make: Callable[[str, nn.Module], Any],
                    split: bool = False, batch: Callable[[list[torch.Tensor]], list | None] | None = None) -> Any:
        """``make(name, module)``, a function of the layer's current weight alone, for this forward of ``name``:
        at a step's first training forward made for every sparse layer at once, one after another, and each
        layer then takes its own as its forward comes.

        Why: the per-layer Python and tensor bookkeeping of a mask made at every forward (checks, allocations,
        the kernel's call) runs 3-5x slower between a layer's large GEMMs, which have evicted it from the
        caches, than in one loop over the layers: on the GPT, about 45 µs a layer against 10 µs.

        What a layer takes was made from its weight as it is now: each is kept with its weight and that
        weight's version counter, and one whose weight has since changed (an optimizer step, an in-place edit)
        is made again, as are the other layers' then. Each is taken once: a second forward in a step (a second
        micro-batch) finds nothing made and makes every layer's again, a layer run twice in one forward makes
        its own again. (So a sparse layer that no forward runs, whose result stays unused and valid, leaves
        the others making their own, each as its forward comes: as before, never more work.) Not under
        torch.compile (the caller's traced path makes its own).

        ``split``: ``make`` is a serial compiled kernel's work on a CPU weight (an N:4 mask's ranking), so the
        layers' makes are shared between two threads where the model is large enough (`threads.split_map`:
        the same results, bit for bit); layers above the kernels' size, or not on a CPU, are made by torch's
        own threaded operations, and every layer is then made on this thread.

        ``batch``: given every layer's weight in `ctx.layers`' order, every layer's make at once
        (`sparsity.batch.LayerMakes`: one compiled call per thread, into outputs kept from step to step; a
        layer it cannot serve is None and ``make`` makes it), or None where it does not serve; then ``make``
        per layer as above. The same results, bit for bit. Only where every weight takes a gradient
        (`trained_weights`). On the GPT, Bi-Mask's forward took 0.6-0.8 ms less (docs/speed.md,
        the twenty-second session)."""
        self._forwards_eager = True
        weight = module.weight
        entry = self._ready.pop(name, None)
        if entry is not None and entry[0] is weight and entry[1] == weight._version:
            return entry[2]
        if torch.is_grad_enabled() and (entry is not None or not self._ready):
            # a training forward with nothing made for it, or made from weights since changed: a new step
            others = [(other, mod) for other, mod in self.ctx.layers.items() if other != name]
            weights = None if batch is None else self.trained_weights()
            batched = None if weights is None else batch(weights)
            if batched is not None:
                made = {other: make(other, mod) if result is None else result
                        for (other, mod), result in zip(self.ctx.layers.items(), batched)}
                self._ready = {other: (mod.weight, mod.weight._version, made[other]) for other, mod in others}
                return made[name]
            every = others + [(name, module)]       # this layer's too: the two threads share all of the step's work
            if split and all(mod.weight.is_cpu and mod.weight.numel() <= MAX_ENTRIES for _, mod in every):
                *made, own = split_map(lambda item: make(*item), every, [mod.weight.numel() for _, mod in every])
                self._ready = {other: (mod.weight, mod.weight._version, result)
                               for (other, mod), result in zip(others, made)}
                return own
            self._ready = {other: (mod.weight, mod.weight._version, make(other, mod)) for other, mod in others}
        return make(name, module)

    def hold_for_forward(self, name: str, module: nn.Module, made: Any) -> None:
        """Give ``name``'s next `per_forward` ``made``, made now from the weight as it is (what its ``make`` would
        make from it), taken as `per_forward`'s own are: only if the weight has not changed since. For a method
        whose step ends by reading every weight (transposable's bound, after the optimizer step): the next
        forward's operand made in that pass, while the weight is in cache, and not read again from memory
        (on the GPT, transposable's step 1.2-2% shorter)."""
        self._ready[name] = (module.weight, module.weight._version, made)

    @property
    def forwards_eagerly(self) -> bool:
        """Whether the forwards take what `per_forward` makes (an eager forward: a compiled one makes its own
        operands, and one held for it would be made for nothing)."""
        return self._forwards_eager

    def mask_as(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``mask`` to multiply ``weight`` by: from its second use on, the bool mask cast to the weight's type,
        once per mask rather than once per use.

        ``W * mask`` with a bool mask makes a float copy of the mask on every call, in the forward and again
        in the backward: a copy per layer per step, most of the per-step cost of a method whose mask stays
        fixed between updates. Multiplying by the cast is the same multiply (1.0 and 0.0), bit for bit. The
        first use gets the bool mask back (a mask made afresh every step, SR-STE's, is never cast here: that
        would only hold memory, 4 bytes a weight where autograd saved 1); the cast is redone when the mask is
        another tensor or was changed in place (its version counter). (A bool mask's product on a CPU layer
        is one fused pass, `sparsity.fused.masked`; for a persistent mask the cast and torch's own product on
        every thread measured faster end to end.)"""
        if torch.compiler.is_compiling():       # traced (a compiled evaluation): a plain cast, no Python state
            return mask.to(device=weight.device, dtype=weight.dtype)
        seen = self._cast.get(name)
        same = seen is not None and seen[0] is mask and seen[1] == mask._version
        if same and seen[2] is not None and seen[2].dtype == weight.dtype and seen[2].device == weight.device:
            return seen[2]
        if not same:                            # first use: the bool mask itself (the multiply casts it)
            self._cast[name] = (mask, mask._version, None)
            return mask
        cast = mask.to(device=weight.device, dtype=weight.dtype)
        self._cast[name] = (mask, mask._version, cast)
        return cast

    def note_decay(self, name: str, module: nn.Module, mask: torch.Tensor, decay: float) -> None:
        """Note that this training forward of ``name`` used ``mask`` with SR-STE's ``decay`` (a method whose own
        GEMM stands in for the straight-through mask, Bi-Mask's, calls this itself)."""
        if decay and torch.is_grad_enabled() and module.weight.requires_grad:
            self._decay[name] = (mask, decay)

    def add_pruned_decay(self) -> None:
        """``grad += decay · (1 − mask) ⊙ W`` on the layers whose training forward noted one, once per optimizer
        step, just before ``after_backward`` (`loop.Stepper`): after every backward of the step (so gradient
        accumulation adds it once), after the caller's gradient clipping (so the clip bounds the loss's
        gradient alone, as Hu et al. add theirs "after clipping") and after AMP's unscaling. With one backward
        and no clip, the gradient is the one Zhou et al.'s backward returns, bit for bit."""
        pending, self._decay = self._decay, {}
        for name, (mask, decay) in pending.items():
            weight = self.ctx.layers[name].weight
            w = weight.detach()
            # one fused pass on a CPU layer (sparsity.fused: the same arithmetic), else the tensor formula
            if weight.grad is not None and not add_pruned_decay_(weight.grad, w, mask, decay):
                weight.grad.add_(pruned_decay(w, mask, decay))

    # --- torch.compile -----------------------------------------------------------------------
    @classmethod
    def compile_problem(cls, params: Any) -> str | None:
        """Why this method with ``params`` cannot train under ``torch.compile``, in one line naming the
        parameter and the fix (the caller puts its own field first); None when it can, its step begun eagerly
        (`Sparsified.begin_step`). Every method's forward traces as one graph per phase with its masks as
        inputs, and trains compiled bit for bit as eager under ``aot_eager`` (tests/test_compile.py), except
        the MVUE weight gradient: its draws come from the method's own ``torch.Generator``, which dynamo
        cannot trace (a graph break per layer, its backward run eagerly)."""
        if getattr(params, "mvue_dw", False):
            return (f"{cls.name} with mvue_dw: true cannot train compiled: the MVUE weight gradient draws from the "
                    "method's own torch.Generator, which torch.compile cannot trace; set mvue_dw: false, or train "
                    "uncompiled")
        return None

    # --- the optimizer -----------------------------------------------------------------------
    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the run's optimizer exists, before its state is loaded on a resume: a method that
        reads or changes the optimizer's state (STEP's frozen second moment) keeps the reference and reads
        the state lazily, in its step hooks."""

    # --- step hooks --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    # --- results -----------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Current keep-masks of the sparse layers (empty for dense)."""
        return {}

    def row_masks(self, pattern: Pattern) -> dict[str, torch.Tensor]:
        """Every sparse layer's row-wise N:M magnitude mask of its current weights (``pattern`` along K)."""
        return {name: nm_mask(mod.weight.detach(), pattern.n, pattern.m, self.ctx.layout)
                for name, mod in self.ctx.layers.items()}

    def deployed_weight(self, name: str, module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
        """The weight the trained layer ``name`` deploys, ``mask`` being its final keep-mask: ``W * mask``
        with pruned entries exactly +0.0 (`sparsity.fold_mask`). A method whose forward uses something
        else than the masked W (a continuous method's scaled weight, say) returns that, masked."""
        return fold_mask(module.weight, mask)

    def export_pattern(self, name: str) -> Pattern | None:
        """The pattern the exported weight of ``name`` satisfies (None: no N:M guarantee)."""
        return None

    def densities(self, name: str, step: int) -> tuple[float, float, float]:
        """Share of (forward, backward-data, backward-weight) GEMM MACs that N:M hardware must do."""
        return 1.0, 1.0, 1.0

    def wgrad_density(self) -> float:
        """The weight-gradient GEMM's density: 0.5 where the method's ``mvue_dw`` parameter is on (its dY
        sampled 2:4 along the tokens), else dense. Methods' ``densities()`` use it for their third entry."""
        return 0.5 if getattr(self.params, "mvue_dw", False) else 1.0

    def pop_mask_events(self) -> list[dict]:
        """Mask recomputes since the last call, as ``{"step", "change_rate"}`` records; the runner writes
        them into the next metrics.jsonl line as ``mask_recomputes`` (empty: nothing to report)."""
        return []

    def metric_fields(self) -> dict[str, Any]:
        """Extra fields for every metrics.jsonl line (e.g. Bi-Mask's ``backward_survival``)."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """Extra fields for summary.json."""
        return {}

    def accel_report(self) -> dict | None:
        """Which layers ran on sparse kernels and which fell back, and why (None: no ``accel``)."""
        return None

    # --- checkpoints -------------------------------------------------------------------------
    # Subclasses add their own entries to these and call them (super()): the base class keeps the MVUE
    # weight gradients' generator states, so that a resumed run draws what the uninterrupted one drew.
    def state_dict(self) -> dict[str, Any]:
        rng = self._wgrad.state_dict() if self._wgrad is not None else {}
        return {"wgrad_rng": rng} if rng else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("wgrad_rng"):
            self.wgrad_sampler().load_state_dict(state["wgrad_rng"])


class StoredMaskMethod(Method):
    """A method that holds one keep-mask per layer: computed on first use, saved in checkpoints.

    Subclasses say how the first masks are made (``init_masks``) and when to recompute them.
    """

    def __init__(self, params: Any, ctx: Context):
        super().__init__(params, ctx)
        self._masks: dict[str, torch.Tensor] = {}

    def init_masks(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def mask(self, name: str) -> torch.Tensor:
        if not self._masks:   # first use, possibly an evaluation before the first step
            self._masks = self.init_masks()
        return self._masks[name]

    def masked_held_with_decay(self, name: str, module: nn.Module, decay: float) -> torch.Tensor:
        """`masked_with_decay` with the layer's held mask (``self.mask(name)``: one kept between updates), every
        layer's ``W ⊙ mask`` made at a step's first training forward (`per_forward`; each with the mask it was
        made with, and made again here if the mask has since changed)."""
        mask = self.mask(name)
        if not torch.compiler.is_compiling():
            used, version, made = self.per_forward(name, module, self._held_product, batch=self._held_batch)
            if used is mask and version == mask._version:
                self.note_decay(name, module, mask, decay)
                return ste_mask(module.weight, mask, made=made)
        return self.masked_with_decay(name, module, mask, decay)

    def hold_product(self, name: str, module: nn.Module, product: torch.Tensor) -> None:
        """`hold_for_forward` of ``product``: the layer's ``W ⊙ mask`` with its held mask as it is now, made by the
        caller as `_held_product` would make it."""
        mask = self.mask(name)
        self.hold_for_forward(name, module, (mask, mask._version, product))

    def _held_batch(self, weights: list[torch.Tensor]) -> list | None:
        """`per_forward`'s batch of `_held_product`: every layer's in one compiled call per thread (sparsity.batch)."""
        masks = [self.mask(name) for name in self.ctx.layers]
        made = self._makes.product(weights, masks)
        return None if made is None else [(mask, mask._version, out) for mask, out in zip(masks, made)]

    def _held_product(self, name: str, module: nn.Module) -> tuple[torch.Tensor, int, torch.Tensor]:
        # the bool mask's product, one vectorised pass per layer in per_forward's loop (where `_held_batch` does
        # not serve): on the GPT 1.2 ms a step against 1.7 ms through the cast mask and torch's product. (The
        # masked gradient of fixed and unstructured stays autograd's product with the cast: its C++ backward
        # measured 1.3 ms a step less than a Function's, and 1-2% of the step less than the batch's product with a
        # gradient hook in its place: docs/speed.md, the twenty-third session.)
        mask = self.mask(name)
        return mask, mask._version, product(module.weight.detach(), mask)

    def masks(self):
        if not self._masks:
            self._masks = self.init_masks()
        return dict(self._masks)

    def state_dict(self):
        return {**super().state_dict(), "masks": dict(self._masks)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._masks = dict(state.get("masks", {}))
        self._ready.clear()             # anything held for the forward was made with the masks replaced here


class RecomputedMaskMethod(StoredMaskMethod):
    """A stored mask recomputed every few steps (transposable, maskdecay): each recompute's flip rate, the
    share of mask entries that changed, goes to metrics.jsonl ``mask_recomputes`` and into checkpoints."""

    def __init__(self, params: Any, ctx: Context):
        super().__init__(params, ctx)
        self._events: list[dict] = []       # mask recomputes not yet written to metrics.jsonl

    def recompute_when_due(self, step: int, interval: int, compute) -> None:
        """The first masks at the first step; then ``compute()`` at every step that ``interval`` divides
        (step 0 keeps the first masks), recording the change."""
        if not self._masks:
            self._masks = self.init_masks()
        elif step % interval == 0 and step > 0:
            old, self._masks = self._masks, compute()
            self._ready.clear()         # what was made for the forward (hold_for_forward) used the old masks
            self._events.append({"step": step, "change_rate": change_rate(old, self._masks)})

    def pop_mask_events(self):
        events, self._events = self._events, []
        return events

    def state_dict(self):
        return {**super().state_dict(), "events": list(self._events)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._events = [dict(e) for e in state.get("events", [])]


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def decorator(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if "caps" not in vars(cls):
            raise TypeError(f"method {name!r} must declare its capabilities (caps = Capabilities(...))")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return decorator


def list_methods() -> dict[str, type[Method]]:
    return dict(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise MethodError(f"method.name: {name!r} is unknown; use one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def build_params(cls: type[Method], params: dict) -> Any:
    """``cls``'s parameters from a mapping, checked: each field by its rule (experiments/rules.py), then
    what depends on two of them (the Params class's ``check()``, where it has one)."""
    from ..spec import ChoiceError, SpecError, from_dict
    try:
        parsed = from_dict(cls.Params, params, "method.params")
    except ChoiceError as exc:      # names the field and its choices already
        raise MethodError(str(exc)) from None
    except SpecError as exc:        # an unknown key or a bad number: which method's parameters
        raise MethodError(f"{exc} (method {cls.name})") from None
    check = getattr(parsed, "check", None)
    if check is not None:
        check()
    return parsed


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def build_method(method: str | type[Method], layers: dict[str, nn.Module], pattern: Pattern, params: Any = None, *,
                 layout: str = "nhwc", solver: str = "exact", total_steps: int = 1, steps_per_epoch: int = 1,
                 accel: str = "none", seed: int = 0) -> Method:
    """``method`` (a class or a registered name) built on the sparse ``layers``, not yet routed (`attach` and
    `nmtrain.sparsify` route them). ``params``: the method's Params, or a dict of them (None: the defaults).
    A method that masks nothing (the dense baseline) gets no layers, so the model runs exactly as built."""
    cls = get_method(method) if isinstance(method, str) else method
    if params is None or isinstance(params, dict):
        params = build_params(cls, params or {})
    ctx = Context(layers=layers if cls.caps.sparse else {}, pattern=pattern, layout=layout, solver=solver,
                  total_steps=total_steps, steps_per_epoch=steps_per_epoch, accel=accel, seed=seed)
    return cls(params, ctx)


@contextmanager
def attach(method: str | type[Method], layers: dict[str, nn.Module], pattern: Pattern, params: Any = None, *,
           layout: str = "nhwc", solver: str = "exact", total_steps: int = 1, steps_per_epoch: int = 1,
           accel: str = "none", seed: int = 0) -> Iterator[Method]:
    """Build ``method`` (a class or a registered name) on the sparse ``layers`` and route their forward
    through it (`build_method`); when the block ends, also by an exception, the layers' own forward is back.
    """
    instance = build_method(method, layers, pattern, params, layout=layout, solver=solver, total_steps=total_steps,
                            steps_per_epoch=steps_per_epoch, accel=accel, seed=seed)
    route_forward(instance.ctx.layers, instance)
    try:
        yield instance
    finally:
        unroute_forward(instance.ctx.layers)


def pruned_decay(weight: torch.Tensor, keep: torch.Tensor, decay: float) -> torch.Tensor:
    """SR-STE's ``decay · (1 − mask) ⊙ W``, bit for bit, in two tensor operations where the formula takes three.

    ``W · where(keep, 0, decay)`` rounds ``W·decay`` once, as ``decay · (W · ¬keep)`` does, and gives a kept
    entry ``W · (+0)``: the zero of W's sign, as ``decay · (W · 0)``. ``decay`` is rounded to W's type either
    way (a scalar meets a tensor in the tensor's type); for half precision, where the scalar product is
    taken in float32 first, the formula itself runs.
    """
    if weight.dtype not in (torch.float32, torch.float64):
        return decay * (weight * ~keep)
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    return weight * torch.where(keep, zero, torch.full((), decay, dtype=weight.dtype, device=weight.device))

