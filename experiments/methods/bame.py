"""`bame` (Yang et al., ICML 2025): Block-Aware Mask Evolution, sparse forward *and* backward.

The paper keeps the forward and the backward N:M sparse and, between iterations ``t_i`` and ``t_f``,
every ``T`` iterations, prunes and regrows weights inside selected *blocks* (N:M groups). Blocks are
chosen by the expected loss reduction of adapting their mask (Loss-aware Mask Adaptation, LMA) and by
how often their mask has flipped (Oscillation-aware Block Freezing, OBF). The public record gives no
formulas; everything below marked *nmtrain* is nmtrain's interpretation.

Two phases. The paper's ablation (its Table 3, as a reviewer describes it) indicates that its best runs
start with ordinary gradient-based N:M training with a dense backward before the sparse-backward phase;
nmtrain runs it so:

1. Steps ``[0, switch)``: SR-STE (``methods/srste.py``): the row-wise N:M mask recomputed from ``|W|``
   at every forward pass, the gradient straight through to all of ``W`` plus ``decay * (1 - E) * W``.
   Training MACs as SR-STE: forward r, backward-data and weight gradient dense.
2. From ``switch`` on: the mask is frozen at the magnitude mask of the weights then, and training is
   BAME's, below. ``switch = 0`` is the fully sparse run from the random init.

``switch`` default 0.2 (*nmtrain*, chosen with the other defaults on a held-out part of the training
set, README "BAME ablation"). Phase 2, every step::

    W~ = W * E                      E: the row-wise N:M mask (groups of M consecutive weights along K)
    y  = op(x, W~)                  forward through W~ (plain autograd)
    dX = op^T(dY, W~)               backward-data through W~
    dW = dW~ * E                    weight gradient at kept entries only; pruned weights do not learn

- Phase-2 mask: row-wise N:M magnitude mask of the weights at ``switch`` (``ctx.layout``). Before the
  adaptation window and from ``t_f`` on it is fixed (*nmtrain*: ``switch``, ``t_i`` and ``t_f`` are
  fractions of the run's total steps, rounded to steps; the window opens at ``max(t_i, switch)``).
- Update steps (*nmtrain*): ``start + k*T`` for k >= 1 and strictly before ``t_f``, ``start`` the
  window's opening. Only at these steps (and the ``score_batches - 1`` steps before each) the dense
  ``dW~`` is read (the gradient of a leaf of -0.0s added to ``W~``); its pruned entries are used only
  for the blocks that may be adapted (the non-frozen ones). The update runs in ``after_backward``,
  *before* the optimizer step, so the step already uses the new mask: the weight gradient is reset
  to ``dW~ * E_new``, and a regrown weight (set to 0, see below) moves by its exact gradient at once.
- LMA (*nmtrain*): first-order Taylor saliencies. Pruning kept weight ``i`` changes the loss by about
  ``|w_i g_i|``; regrowing pruned weight ``j`` (gradient ``g_j`` taken at ``w_j = 0``) can reduce it
  by about ``|g_j| * a`` once ``w_j`` reaches a typical magnitude ``a``; nmtrain takes ``a`` = the
  mean |w| of the layer's kept weights, which puts both saliencies in loss units. A block's gain is
  ``max_j |g_j| a - min_i |w_i g_i|`` (its best swap). Per layer, of the non-frozen blocks the top
  ``ceil(fraction_t * non-frozen)`` by gain are adapted, those with a positive gain only; each does up
  to ``swaps_per_block`` swaps (the k-th most salient pruned for the k-th least salient kept, while
  the gain stays positive), so every group keeps exactly N.
- ``fraction_t`` (*nmtrain*): ``fraction * (1 + cos(pi * (t - t_i) / (t_f - t_i))) / 2``, cosine decay
  (as RigL's drop fraction) from ``fraction`` at ``t_i`` to 0 at ``t_f``.
- Regrown weights (*nmtrain*, ``regrow``) restart at 0 (``zero``, as in RigL: the gradient that chose
  them was taken there) or keep the value they had when pruned (``stale``). A pruned weight keeps its
  value in the dense tensor (it is masked out and gets no gradient); optimizer state is untouched.
- OBF (*nmtrain*): one counter per block, ``osc <- osc_decay * osc + swaps`` at every update step;
  a block with ``osc >= freeze_threshold`` is frozen (neither scored nor adapted) until the decay
  brings it back below. With the defaults (0.9, 3.0) a block swapped at four consecutive updates, or
  more often than about once every three updates in the long run, is frozen.
- The gradient that scores the blocks (*nmtrain*, ``score_batches``) is the sum of ``dW~`` over the
  update step's mini-batch and the ``score_batches - 1`` before it (the sparse backward leaves no
  pruned gradients between updates; each of those steps pays for the scored blocks' dense dW).

Training MACs (*nmtrain* accounting, following the paper's fully sparse ``3rF`` convention): forward
r, backward-data r, weight gradient r, except at update steps where the pruned entries of the blocks
that were scored (the non-frozen ones: choosing among them needs their gradients) add their share,
``r + (1 - r) * non-frozen share``. Note: ``W~`` is N:M along K only, not along C_out, so under
``flops.py``'s strict rule (an operand counts as sparse only where it is N:M along that GEMM's
reduction dimension) the backward-data GEMM would count dense (``F(2r + 1)`` overall); the ``r``
here follows the paper's convention, which the paper's 2.37x-fewer-FLOPs-than-SR-STE figure uses.

Defaults (*nmtrain*): ``switch`` 0.2, ``t_i = 0`` (so the window opens at the switch), ``t_f = 0.75``;
``interval`` 50 — RigL-style runs use ~100 on ImageNet (thousands of steps per epoch), while nmtrain's
quick Fashion-MNIST spec has ~700 steps in the window, where 50 gives ~14 updates; each update adds at
most ``(1 - r) / T`` to the per-step weight-gradient density; ``fraction`` 0.3 (RigL's initial drop
fraction); ``osc_decay`` 0.9, ``freeze_threshold`` 3.0, ``swaps_per_block`` 1, ``regrow`` zero,
``score_batches`` 1, ``decay`` 2e-4 (SR-STE's lambda_W, phase 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...sparsity import Pattern, from_matrix, nm_mask, to_matrix
from ..distributed import rank_mean
from ..layers import gemm
from ..rules import DECAY, FRACTION, STEPS, Choice, Rule, above, at_least, param
from .base import Capabilities, Method, MethodError, register_method
from .ste import masked_weight

REGROW = ("zero", "stale")


@dataclass
class BAMEParams:
    switch: float = param(0.2, FRACTION)        # end of the SR-STE phase (dense backward), fraction of total steps
    t_i: float = param(0.0, FRACTION)           # first adaptation, as a fraction of the run's total steps
    t_f: float = param(0.75, FRACTION)          # mask fixed from here on (fraction of total steps)
    interval: int = param(50, STEPS)            # T: steps between mask updates
    # share of non-frozen blocks adapted at t_i, cosine-decayed to 0 at t_f
    fraction: float = param(0.3, Rule(lo=0, hi=1, note="(a share of the blocks)"))
    osc_decay: float = param(0.9, Rule(lo=0, hi=1))     # oscillation counter decay per update
    freeze_threshold: float = param(3.0, above(0))      # blocks with counter >= this are frozen
    swaps_per_block: int = param(1, at_least(1))        # prune-and-regrow pairs per adapted block and update
    # value of a regrown weight: zero | stale (its value when pruned)
    regrow: str = param("zero", choice=Choice(REGROW, listed=True))
    score_batches: int = param(1, at_least(1, "(mini-batches)"))   # mini-batches of dW~ summed to score the blocks
    decay: float = param(2e-4, DECAY)           # SR-STE's lambda_W on pruned weights in the first phase

    def check(self) -> None:
        """What depends on two parameters (each one's own range and choices are on its field)."""
        if self.t_f < self.t_i:
            raise MethodError(f"method.params.t_f: must not be before t_i={self.t_i}, got {self.t_f}")


@register_method("bame")
class BAME(Method):
    Params = BAMEParams
    # all three from the switch on (backward-data by the paper's convention, see above)
    caps = Capabilities(sparse_gemms=("forward", "backward_data", "weight_grad"), scheduled=True)
    summary = ("BAME: sparse forward and backward; loss-aware prune-and-regrow in selected N:M blocks "
               "between t_i and t_f, oscillating blocks frozen")

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        p = params
        # The parameters were checked as they loaded (their fields' rules, BAMEParams.check); here, what
        # depends on the pattern.
        n, m = ctx.pattern.n, ctx.pattern.m
        if p.swaps_per_block > min(n, m - n):
            raise MethodError(f"method.params.swaps_per_block: at most min(N, M-N)={min(n, m - n)} for "
                              f"{n}:{m}, got {p.swaps_per_block}")
        self.pattern = Pattern(n, m)
        self.switch_step = int(round(p.switch * ctx.total_steps))
        self.t_i_step = max(int(round(p.t_i * ctx.total_steps)), self.switch_step)   # the window opens
        self.t_f_step = max(int(round(p.t_f * ctx.total_steps)), self.t_i_step)
        self._masks: dict[str, torch.Tensor] = {}
        self._osc: dict[str, torch.Tensor] = {}           # (C_out, K/M) per layer, GEMM view
        # At a scoring step, one probe per layer: -0.0s added to W~, whose gradient is the dense dW~
        # (`layer_forward`); None at other steps.
        self._pending: dict[str, torch.Tensor] | None = None
        self._pending_step = -1
        self._acc: dict[str, torch.Tensor] = {}           # dW~ summed over the scoring batches so far
        self._scoring: dict[str, float] = {}              # non-frozen share while scoring, by layer
        self._scoring_step = -1
        self.updates = 0                                  # update steps done
        self.swaps_total = 0
        self.last: dict = {}                              # record of the last update step
        self._scored_share: dict[str, float] = {}         # non-frozen block share at the last update
        self._first_phase = self.switch_step > 0          # SR-STE until switch_step

    # --- schedule ------------------------------------------------------------------------------
    def fraction_at(self, step: int) -> float:
        """Share of non-frozen blocks adapted at ``step`` (0 outside [t_i, t_f))."""
        lo, hi = self.t_i_step, self.t_f_step
        if step < lo or step >= hi:
            return 0.0
        return self.params.fraction * 0.5 * (1.0 + math.cos(math.pi * (step - lo) / (hi - lo)))

    def is_update_step(self, step: int) -> bool:
        lo = self.t_i_step
        return (step > lo and step < self.t_f_step and (step - lo) % self.params.interval == 0
                and self.fraction_at(step) > 0.0)

    def in_first_phase(self, step: int) -> bool:
        return step < self.switch_step

    def next_update(self, step: int) -> int | None:
        """The first update step at or after ``step`` (None: no more updates)."""
        lo, t = self.t_i_step, self.params.interval
        u = lo + max(1, -(-(step - lo) // t)) * t
        while u < self.t_f_step:
            if self.is_update_step(u):
                return u
            u += t
        return None

    def is_scoring_step(self, step: int) -> bool:
        """Steps whose dense ``dW~`` is read: each update step and the ``score_batches - 1`` before it."""
        if self.in_first_phase(step):
            return False
        u = self.next_update(step)
        return u is not None and u - step < self.params.score_batches

    # --- masks -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_masks(self) -> None:
        p = self.pattern
        for name, mod in self.ctx.layers.items():
            if name not in self._masks:
                self._masks[name] = nm_mask(mod.weight.detach(), p.n, p.m, self.ctx.layout)
            w = mod.weight
            rows = w.shape[0]
            if name not in self._osc:
                self._osc[name] = torch.zeros(rows, w.numel() // rows // p.m, device=w.device)

    def _mask(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._masks:
            self._init_masks()
        if self._first_phase:         # SR-STE: the magnitude mask of the weights as they are now
            p = self.pattern
            return nm_mask(module.weight.detach(), p.n, p.m, self.ctx.layout)
        mask = self._masks[name]
        if mask.device != module.weight.device:
            mask = self._masks[name] = mask.to(module.weight.device)
        return mask

    # --- forward -----------------------------------------------------------------------------
    def forward_weight(self, name, module):
        if self._first_phase:     # SR-STE: the magnitude mask of the weights as they are now, made with W~
            if name not in self._masks:
                self._init_masks()
            return self.masked_nm_with_decay(name, module, self.pattern, self.params.decay)
        # a mask held between updates: cast once (mask_as), as fixed's
        return masked_weight(module.weight, self.mask_as(name, self._mask(name, module), module.weight))

    def layer_forward(self, name, module, x):
        w = self.forward_weight(name, module)
        if self._pending is not None and w.requires_grad:
            # The dense dW~, read in after_backward at a scoring step only, as the gradient of a leaf of
            # -0.0s added to W~: ``w + (-0.0)`` is ``w`` bit for bit (−0 included), and the leaf's gradient
            # is dW~, summed over the step's forwards (gradient accumulation). Not ``w.retain_grad()``:
            # torch.compile cannot trace that (a graph break per layer, a recompile per layer name). The
            # probes are made in before_step, eagerly: a leaf cannot be made inside a compiled graph. At a
            # scoring step each holds one weight-sized tensor more than retain_grad did (the probe itself).
            w = w + self._pending[name]
        return gemm(module, x, w)

    # --- step hooks --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        first = self.in_first_phase(step)
        if self._first_phase and not first:     # the switch: freeze the magnitude mask of the weights now
            self._first_phase = False
            self._masks = {}
        self._first_phase = first
        if not self._masks:
            self._init_masks()
        if self.is_scoring_step(step):
            self._pending, self._pending_step = self._probes(), step
            self._scoring_step = step
            self._scoring = {name: float((self._osc[name] < self.params.freeze_threshold).float().mean())
                             for name in self.ctx.layers}
        else:
            self._pending, self._pending_step = None, -1

    def _probes(self) -> dict[str, torch.Tensor]:
        """Per layer, a leaf of -0.0s shaped like its weight, whose gradient will be the dense dW~."""
        return {name: torch.full_like(mod.weight, -0.0, requires_grad=True) for name, mod in self.ctx.layers.items()}

    def after_backward(self, step: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or step != self._pending_step:
            return
        grads = {name: probe.grad for name, probe in pending.items() if probe.grad is not None}
        for name, g in grads.items():
            self._acc[name] = self._acc[name] + g if name in self._acc else g.clone()
        if self.is_update_step(step):
            acc, self._acc = self._acc, {}
            self._update(step, acc, grads)

    @torch.no_grad()
    def _update(self, step: int, scores: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
        frac = self.fraction_at(step)
        totals = {"blocks": 0, "frozen": 0, "scored": 0, "adapted": 0, "swaps": 0}
        self._scored_share = {}
        for name, mod in self.ctx.layers.items():
            if name in scores:
                self._update_layer(name, mod, frac, scores[name], current, totals)
        self.updates += 1
        self.swaps_total += totals["swaps"]
        self.last = {"step": step, "fraction": frac, **totals}

    def _update_layer(self, name: str, mod: nn.Module, frac: float, g_full: torch.Tensor,
                      current: dict[str, torch.Tensor], totals: dict[str, int]) -> None:
        """Swap kept and pruned weights in the chosen blocks of one layer; adds its counts to ``totals``."""
        m = self.pattern.m
        layout, prm = self.ctx.layout, self.params
        # dW~ is no parameter gradient, so DDP does not average it: without this every rank would
        # score its own mini-batch share and choose different blocks.
        g_full = rank_mean(g_full)
        mask = self._mask(name, mod)
        w = to_matrix(mod.weight.detach(), layout).float()
        g = to_matrix(g_full, layout).float()
        e = to_matrix(mask, layout)
        rows, k = w.shape
        eg = e.reshape(rows, k // m, m)
        scale = float(w.abs()[e].mean()) if bool(e.any()) else 0.0
        scale = scale if scale > 0 else 1.0                                 # a: mean |w| of kept weights
        osc = self._osc[name].to(w.device)
        frozen = osc >= prm.freeze_threshold
        flip, n_scored = _block_swaps(w.reshape(rows, k // m, m), g.reshape(rows, k // m, m), eg, scale, frozen,
                                      frac, prm.swaps_per_block)
        swaps = flip.sum(-1).float() / 2                                    # per block
        new_mask = from_matrix((eg ^ flip).reshape(rows, k), mask.shape, layout)
        grown_w = from_matrix((flip & ~eg).reshape(rows, k), mask.shape, layout)
        if prm.regrow == "zero":
            mod.weight.masked_fill_(grown_w, 0.0)                           # regrown weights restart at 0
        if mod.weight.grad is not None:                                     # this step uses the new mask
            g_now = rank_mean(current[name]) if name in current else g_full
            mod.weight.grad.copy_(g_now * new_mask)
        self._masks[name] = new_mask
        self._osc[name] = prm.osc_decay * osc + swaps

        blocks = rows * (k // m)
        self._scored_share[name] = n_scored / blocks
        totals["blocks"] += blocks
        totals["frozen"] += int(frozen.sum())
        totals["scored"] += n_scored
        totals["adapted"] += int((swaps > 0).sum())
        totals["swaps"] += int(swaps.sum())

    # --- results -----------------------------------------------------------------------------
    def masks(self):
        if not self._masks:
            self._init_masks()
        if self._first_phase:
            return {name: self._mask(name, mod) for name, mod in self.ctx.layers.items()}
        return dict(self._masks)

    def export_pattern(self, name):
        return self.pattern

    def oscillation(self) -> dict[str, torch.Tensor]:
        """Per-block oscillation counters (C_out x K/M in the GEMM view), by layer."""
        if not self._osc:
            self._init_masks()
        return dict(self._osc)

    def densities(self, name, step):
        r = self.pattern.density
        if self.in_first_phase(step):
            return r, 1.0, 1.0          # SR-STE: dense backward-data and weight gradient
        dw = r
        if self.last.get("step") == step and name in self._scored_share:
            dw = r + (1.0 - r) * self._scored_share[name]
        elif self._scoring_step == step and name in self._scoring:
            dw = r + (1.0 - r) * self._scoring[name]
        return r, r, dw

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "masks": dict(self._masks), "osc": dict(self._osc), "updates": self.updates,
                "swaps_total": self.swaps_total, "last": dict(self.last),
                "scored_share": dict(self._scored_share), "acc": dict(self._acc),
                "first_phase": self._first_phase}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._masks = dict(state.get("masks", {}))
        self._osc = dict(state.get("osc", {}))
        for name, mod in self.ctx.layers.items():
            if name in self._masks:
                self._masks[name] = self._masks[name].to(mod.weight.device, torch.bool)
            if name in self._osc:
                self._osc[name] = self._osc[name].to(mod.weight.device)
        self.updates = int(state.get("updates", 0))
        self.swaps_total = int(state.get("swaps_total", 0))
        self.last = dict(state.get("last", {}))
        self._scored_share = {k: float(v) for k, v in state.get("scored_share", {}).items()}
        self._first_phase = bool(state.get("first_phase", self.switch_step > 0))
        self._acc = {name: state["acc"][name].to(mod.weight.device)
                     for name, mod in self.ctx.layers.items() if name in state.get("acc", {})}


def _block_swaps(wg: torch.Tensor, gg: torch.Tensor, eg: torch.Tensor, scale: float, frozen: torch.Tensor,
                 frac: float, swaps_per_block: int) -> tuple[torch.Tensor, int]:
    """Which entries flip, per (row, block, M) of weights ``wg``, scores ``gg`` and kept-mask ``eg``: in the
    ``frac`` share of unfrozen blocks with the largest positive gain, the least salient kept weights swap
    with the most salient pruned ones. Returns (flip, number of unfrozen blocks)."""
    inf = torch.tensor(float("inf"), device=wg.device)
    prune_score = torch.where(eg, (wg * gg).abs(), inf)             # kept: |w g|
    grow_score = torch.where(eg, -inf, gg.abs() * scale)            # pruned: |g| * a
    ps, pi = prune_score.sort(-1)                                   # least salient kept first
    gs, gi = grow_score.sort(-1, descending=True)                   # most salient pruned first
    gain = gs[..., 0] - ps[..., 0]                                  # best swap per block

    scored = ~frozen
    n_scored = int(scored.sum())
    want = math.ceil(frac * n_scored - 1e-9)
    eligible = scored & (gain > 0)
    selected = torch.zeros_like(eligible)
    count = min(want, int(eligible.sum()))
    if count > 0:
        flat = torch.where(eligible, gain, -inf).reshape(-1)
        selected.view(-1)[flat.topk(count).indices] = True

    flip = torch.zeros_like(eg)
    for t in range(swaps_per_block):
        do = (selected & (gs[..., t] - ps[..., t] > 0)).unsqueeze(-1)
        flip |= torch.zeros_like(eg).scatter_(-1, pi[..., t:t + 1], do)
        flip |= torch.zeros_like(eg).scatter_(-1, gi[..., t:t + 1], do)
    return flip, n_scored
