"""`bimask` (Zhang et al., ICML 2023): separate forward and backward N:M masks.

Forward mask ``B_f``: the top-N of |W| in every group of M along K (recomputed from the current
weights at every forward pass, as in SR-STE). Backward mask ``B_b``: permute the output channels
(rows of the GEMM view) by ``pi``, keep the top-N of ``|W * B_f|`` in every group of M consecutive
(permuted) rows of every column, intersect with ``B_f`` and un-permute. So ``B_b`` is N:M along
C_out in the permuted order, which is what the backward-data GEMM ``dX = dY (W * B_b)`` needs on
sparse tensor cores (``dY``'s channels are permuted the same way).

``pi`` is the best of ``greedy_num`` random permutations (default 10; the paper's ImageNet runs use
100), scored by how many forward-kept weights survive in ``B_b``; it is searched at the first step
and every ``iter`` steps (default 100). The permutations come from a generator seeded by the run's
seed (``ctx.seed``), ``params.seed``, the layer's index and the search count: runs with different seeds
draw different permutations (the draws are a large share of Bi-Mask's seed-to-seed spread), and every
process of a multi-process run draws the same ``pi`` (the public code lost it under DataParallel).
``pi`` is saved in checkpoints.

``search: local`` (*nmtrain*; default ``random``, the paper's search, kept as it is) starts from that best
draw and swaps rows between groups while the share of forward-kept weights that ``B_b`` keeps rises
(:func:`local_search`). Random draws barely beat random grouping (81.25% at 2:4, 68.4% at 1:4 in
expectation); the local search finds clearly better groupings. The share is recorded as
``backward_survival`` in metrics.jsonl (mean over layers) and summary.json (per layer).

Forward uses ``W * B_f``; backward-data uses ``W * B_b`` (autograd's own product on a straight-through view
of W whose data is swapped after the forward, `bimask_gemm`; a custom autograd function where that cannot
serve); the weight gradient is dense (straight-through) plus SR-STE's ``decay * (1 - B_f) * W`` (2e-4).
Training MACs: F * (2r + 1).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from ...sparsity import Pattern, from_matrix, nm_mask, to_matrix
from ...sparsity.fused import bimask_operands4, column_nm4_mask, column_nm4_masked
from ...sparsity.nm import nm_mask_and_product
from ..rules import DECAY, SEED, STEPS, Choice, at_least, param
from .base import Capabilities, Method, MethodError, register_method
from .ste import masked_weight, product


SEARCHES = ("random", "local")


@dataclass
class BiMaskParams:
    greedy_num: int = param(10, at_least(1, "(permutations tried per search)"))    # random permutations per search
    iter: int = param(100, STEPS)           # steps between permutation searches
    decay: float = param(2e-4, DECAY)       # lambda_W on pruned weights
    seed: int = param(0, SEED)              # mixed with the run's seed for the permutation generator
    # random: best of greedy_num draws (the paper) | local: then row swaps (nmtrain)
    search: str = param("random", choice=Choice(SEARCHES, listed=True))
    # local: most rounds of pairwise group swaps (stops after 20 without a gain)
    local_rounds: int = param(100, at_least(1))


PATIENCE = 20                   # local search: rounds in a row without any improving swap before it stops


def backward_mask(fmask_matrix: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``B_b`` of a GEMM-view matrix (C_out x K): column-wise top-n of ``|scores| * B_f`` per M permuted rows
    (``scores``: the magnitudes, or the signed weights themselves)."""
    # one compiled pass on a CPU (eager: torch.compile traces the formula)
    fused = column_nm4_mask(scores, fmask_matrix, perm, n) if m == 4 and not torch.compiler.is_compiling() else None
    if fused is not None:
        return fused
    rows, cols = scores.shape
    s = (scores.abs() * fmask_matrix)[perm]                             # permuted rows
    groups = s.reshape(rows // m, m, cols)
    top = groups.topk(n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).reshape(rows, cols)
    keep &= fmask_matrix[perm]                                          # never keep what B_f prunes
    out = torch.empty_like(keep)
    out[perm] = keep                                                    # un-permute
    return out


def backward_mask_and_product(fmask_matrix: torch.Tensor, weight_matrix: torch.Tensor, perm: torch.Tensor, n: int,
                              m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`backward_mask` of the signed ``weight_matrix`` and ``weight_matrix * B_b`` (detached), as the two give
    them; at M = 4 on a CPU in one pass (`sparsity.fused.column_nm4_masked`)."""
    weight_matrix = weight_matrix.detach()
    fused = (column_nm4_masked(weight_matrix, fmask_matrix, perm, n)
             if m == 4 and not torch.compiler.is_compiling() else None)
    if fused is not None:
        return fused
    keep = backward_mask(fmask_matrix, weight_matrix, perm, n, m)
    return keep, product(weight_matrix, keep)


def search_permutation(fmask_matrix: torch.Tensor, scores: torch.Tensor, n: int, m: int, tries: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Best of ``tries`` random row permutations by forward-kept weights surviving in ``B_b``."""
    rows = scores.shape[0]
    best, best_score = None, -1
    for _ in range(tries):
        perm = torch.randperm(rows, generator=generator).to(scores.device)
        kept = int(backward_mask(fmask_matrix, scores, perm, n, m).sum())
        if kept > best_score:       # strict: the first best wins, deterministically
            best, best_score = perm, kept
    return best, best_score


def surviving(fmask_matrix: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> int:
    """Forward-kept entries that ``B_b`` keeps under ``perm``: per group of M permuted rows and per column,
    ``min(N, kept in the group)`` (what :func:`backward_mask` keeps when no kept weight is exactly 0)."""
    rows, cols = fmask_matrix.shape
    counts = fmask_matrix[perm].reshape(rows // m, m, cols).sum(1)
    return int(counts.clamp(max=n).sum())


def random_grouping_survival(n: int, m: int, density: float | None = None) -> float:
    """Expected share of forward-kept weights in ``B_b`` when rows are grouped at random: per column a group
    holds X ~ Binomial(M, r) kept entries and B_b keeps min(N, X) of them, so E[min(N, X)] / (M r)."""
    r = n / m if density is None else density
    expected = sum(min(n, x) * math.comb(m, x) * r ** x * (1 - r) ** (m - x) for x in range(m + 1))
    return expected / (m * r)


def local_search(fmask_matrix: torch.Tensor, perm: torch.Tensor, n: int, m: int, generator: torch.Generator,
                 rounds: int) -> tuple[torch.Tensor, int]:
    """Improve ``perm`` by swapping rows between groups while the surviving count rises.

    Why this algorithm: the objective ``sum over groups g, columns c of min(N, count_gc)`` changes, for a
    swap of row r (group A) with row s (group B), only through the columns where r and s differ; with
    ``u = [count < N]`` (room to gain) and ``v = [count <= N]`` (an entry lost is lost) per group and column,
    the change is ``F_s . (u_A - v_B) + F_r . (u_B - v_A) - (F_r * F_s) . (u_A - v_B + u_B - v_A)`` exactly.
    Each round pairs the groups at random (disjoint pairs, so their swaps are independent), scores all
    M x M swaps of every pair with one batched product, and applies each pair's best swap when it gains.
    A round costs ``C_out * M * K`` multiply-adds, vectorised; the objective never decreases, so the
    result is never below the starting (best random) permutation. Deterministic for a given generator.
    """
    rows, cols = fmask_matrix.shape
    groups = rows // m
    perm = perm.clone()
    if groups < 2:
        return perm, surviving(fmask_matrix, perm, n, m)
    p = fmask_matrix[perm].float().reshape(groups, m, cols)           # rows in permuted order, kept current
    counts = p.sum(1)
    idle = 0
    for _ in range(rounds):
        u, v = (counts < n).float(), (counts <= n).float()
        order = torch.randperm(groups, generator=generator)[: groups - groups % 2].to(p.device).reshape(-1, 2)
        a, b = order[:, 0], order[:, 1]
        fa, fb = p[a], p[b]                                               # (pairs, M, K)
        x, y = u[a] - v[b], u[b] - v[a]                                   # (pairs, K)
        gain = (torch.bmm(fb, x.unsqueeze(2)).transpose(1, 2) + torch.bmm(fa, y.unsqueeze(2))
                - torch.bmm(fa * (x + y).unsqueeze(1), fb.transpose(1, 2)))  # (pairs, M_r, M_s)
        best, where = gain.reshape(len(a), -1).max(1)
        do = best > 0.5                                                   # integer gains: at least one entry
        if not bool(do.any()):
            idle += 1
            if idle >= PATIENCE:
                break
            continue
        idle = 0
        ga, gb, r, s_ = a[do], b[do], where[do] // m, where[do] % m
        row_a, row_b = p[ga, r].clone(), p[gb, s_].clone()
        p[ga, r], p[gb, s_] = row_b, row_a
        counts[ga] += row_b - row_a
        counts[gb] += row_a - row_b
        pos_a, pos_b = ga * m + r, gb * m + s_
        perm[pos_a], perm[pos_b] = perm[pos_b].clone(), perm[pos_a].clone()
    return perm, surviving(fmask_matrix, perm, n, m)


class _BiMaskGEMM(torch.autograd.Function):
    """y = op(x, W * B_f) + b; dX = op^T(dY, W * B_b); dW = the dense dW (straight through W~ to W; SR-STE's decay is
    added once per optimizer step, `Method.add_pruned_decay`). ``w_f`` and ``w_b``: W * B_f and W * B_b, made
    with the masks (`BiMask._operands`). The formula as a Function: traced by torch.compile, under autocast,
    for a frozen weight, and wherever `_swapped_gemm` (the same bits by autograd's own nodes) cannot serve."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_f, w_b, conv):
        ctx.save_for_backward(x, w_b)
        ctx.conv = conv
        if conv is None:
            y = F.linear(x, w_f)
        else:
            stride, padding, dilation, groups = conv
            y = F.conv2d(x, w_f, None, stride, padding, dilation, groups)
        # the bias added in place, in the Function: the same bits as autograd's ``y + b`` (the GEMM's own bias
        # rounds otherwise on small Linears), without a second output-sized tensor to make and to fill
        if bias is not None:
            y.add_(bias if conv is None else bias.view(1, -1, 1, 1))
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w_b = ctx.saved_tensors
        # only the gradients asked for, as autograd's own GEMMs: no dX for a first layer's input (the data)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.conv is None:
            grad_x = grad @ w_b if need_x else None
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        else:
            stride, padding, dilation, groups = ctx.conv
            # one call for both: what torch.nn.grad's conv2d_input and conv2d_weight each make with one output
            # asked for (dW does not read the weight, so passing W * B_b for dX leaves it as it was)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, w_b, None, _pair(stride), _pair(padding), _pair(dilation), False, [0], groups,
                (need_x, need_w, False))
        grad_b = None
        if ctx.needs_input_grad[2]:         # as autograd's add of a broadcast bias (a conv's, viewed (1, C, 1, 1))
            shape = (grad.shape[-1],) if ctx.conv is None else (1, grad.shape[1], 1, 1)
            grad_b = grad.sum_to_size(shape).view(-1)
        return grad_x, grad_w, grad_b, None, None, None


def bimask_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w_f: torch.Tensor,
                w_b: torch.Tensor, conv: tuple | None) -> torch.Tensor:
    """`_BiMaskGEMM`'s product, its gradients the same bits, through autograd's own C++ nodes where they can take it
    (`_swapped_gemm`): a training forward of a weight that takes a gradient, not traced, not under autocast."""
    if (torch.compiler.is_compiling() or not (weight.requires_grad and torch.is_grad_enabled())
            or torch.is_autocast_enabled(x.device.type) or not _swap_reaches_the_backward()):
        return _BiMaskGEMM.apply(x, weight, bias, w_f, w_b, conv)
    return _swapped_gemm(x, weight, bias, w_f, w_b, conv)


def _swapped_gemm(x, weight, bias, w_f, w_b, conv) -> torch.Tensor:
    """``op(x, W * B_f) + b`` by torch's own product on a straight-through view of ``weight`` holding ``W * B_f``
    (as `ste.straight_through` makes SR-STE's), the view then set to hold ``W * B_b``.

    Why it is Bi-Mask's backward: the product's node saved that view itself, and reads it only in the
    backward, for ``dX = dY (W * B_b)``; ``dW = dYᵀ X`` reads the input, and the view passes it straight on to
    ``W``. Setting ``.data`` moves no bytes and leaves the version counter as it was. Why: `_BiMaskGEMM`'s
    Python node cost each layer about 33 µs a backward and 14 µs a forward, run cold between the GEMMs (on
    the GPT, 0.75 ms of a 29 ms step); these nodes are C++. A Linear's product is ``torch.matmul(x, Wᵀ)``,
    what ``F.linear`` runs without a bias; the bias is added in place after it, as the Function adds it."""
    if conv is None:
        operand = weight.t()
        operand.data = w_f.t()
        y = torch.matmul(x, operand)
        operand.data = w_b.t()
    else:
        operand = weight.view_as(weight)
        operand.data = w_f
        stride, padding, dilation, groups = conv
        y = F.conv2d(x, operand, None, stride, padding, dilation, groups)
        operand.data = w_b
    if bias is not None:
        y.add_(bias if conv is None else bias.view(1, -1, 1, 1))
    return y


@functools.cache
def _swap_reaches_the_backward() -> bool:
    """Whether autograd's product nodes read the operand they saved as it is when the backward runs (torch's mm
    and convolution nodes keep the very tensor they were given): `_swapped_gemm` relies on it, so it is checked
    once, on exact small integers, for a Linear on a matrix and on a batch of sequences and for a conv; where it
    fails every layer takes `_BiMaskGEMM`."""
    def exact(shape, w_shape, conv, d_w) -> bool:
        x = torch.ones(shape, requires_grad=True)
        weight = torch.ones(w_shape, requires_grad=True)
        y = _swapped_gemm(x, weight, None, torch.ones(w_shape), torch.full(w_shape, 2.0), conv)
        y.sum().backward()
        # dX through W * B_b: 2 from each of the 2 output channels; dW the dense one, X's ones summed
        return (x.grad is not None and weight.grad is not None and bool((x.grad == 4.0).all())
                and bool((weight.grad == d_w).all()))

    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        return (exact((1, 3), (2, 3), None, 1.0) and exact((2, 1, 3), (2, 3), None, 2.0)
                and exact((1, 1, 2, 2), (2, 1, 1, 1), ((1, 1), (0, 0), (1, 1), 1), 4.0))


@register_method("bimask")
class BiMask(Method):
    Params = BiMaskParams
    # backward-data through the permuted backward mask, N:M along C_out in groups of M output channels
    caps = Capabilities(sparse_gemms=("forward", "backward_data"), needs_column_groups=True)
    summary = "Bi-Mask: forward N:M mask + permuted backward N:M mask (sparse backward-data), dense dW"

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        # every parameter is checked as the parameters load, by the rule on its field (build_params)
        self.perms: dict[str, torch.Tensor] = {}
        self.searches = 0
        self.last_search_step = -1
        self.survival: dict[str, float] = {}      # share of forward-kept weights kept by B_b, per layer

    def _matrices(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The GEMM views of the forward mask and of the (signed) weight."""
        p = self.ctx.pattern
        w = module.weight.detach()
        fmask = nm_mask(w, p.n, p.m, self.ctx.layout)
        return to_matrix(fmask, self.ctx.layout), to_matrix(w, self.ctx.layout)

    def _generator_seed(self, index: int) -> int:
        """One 63-bit seed per (run seed, params.seed, layer, search): distinct runs, distinct draws."""
        key = (self.ctx.seed, self.params.seed, index, self.searches)
        value = 0
        for part in key:        # a fixed mix (not hash(): that changes between processes for some types)
            value = (value * 1_000_003 + int(part) + 0x9E3779B97F4A7C15) % (1 << 63)
        return value

    @torch.no_grad()
    def _search(self, step: int) -> None:
        p = self.ctx.pattern
        for index, (name, mod) in enumerate(self.ctx.layers.items()):
            gen = torch.Generator().manual_seed(self._generator_seed(index))
            fm, w = self._matrices(mod)
            perm, kept = search_permutation(fm, w.abs(), p.n, p.m, self.params.greedy_num, gen)
            if self.params.search == "local":
                perm, kept = local_search(fm, perm, p.n, p.m, gen, self.params.local_rounds)
            self.perms[name] = perm
            self.survival[name] = kept / max(int(fm.sum()), 1)
        self.searches += 1
        self.last_search_step = step

    def before_step(self, step: int) -> None:
        if not self.perms or step % self.params.iter == 0 and step != self.last_search_step:
            self._search(step)

    def _masks_of(self, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._operands(name, module)[:2]

    def _operands(self, name: str, module: nn.Module) -> tuple[torch.Tensor, ...]:
        """``B_f``, ``B_b``, ``W * B_f`` and ``W * B_b`` of ``name`` in the weight's shape, each mask made with its
        masked weight in one pass (`sparsity.nm_mask_and_product`, `backward_mask_and_product`); on a CPU at M = 4
        all four in one call where the groups run along the weight's matrix view (`fused.bimask_operands4`)."""
        p, layout = self.ctx.pattern, self.ctx.layout
        if name not in self.perms:
            self._search(0)
        w = module.weight.detach()
        if (p.m == 4 and (w.dim() == 2 or layout == "flatten") and w.is_contiguous()
                and not torch.compiler.is_compiling()):
            # a Linear, or a conv whose groups run along its flatten view: all four in one call on a CPU
            matrix = w.dim() == 2       # a Linear's weight is its own matrix view: no torch view either way
            made = bimask_operands4(w if matrix else w.view(w.shape[0], -1), self.perms[name], p.n)
            if made is not None:
                fmask, w_f, bm, w_b = made if matrix else (t.view(w.shape) for t in made)
                return fmask, bm, w_f, w_b
        fmask, w_f = nm_mask_and_product(w, p.n, p.m, layout)
        if w.dim() == 4 and w.is_contiguous() and fmask.is_contiguous():
            # B_b is column-wise: a column's mask depends on that column alone, so any view with the weight's
            # output channels as rows gives each weight the same bit. A conv's flatten view is free, where its
            # nhwc GEMM view is a copy and the two results' way back two more (ResNet-20's Bi-Mask step went
            # from 1.05-1.07x dense to 1.03-1.04x).
            rows = w.shape[0]
            bm, w_b = backward_mask_and_product(fmask.view(rows, -1), w.view(rows, -1),
                                                self.perms[name].to(w.device), p.n, p.m)
            return fmask, bm.view(w.shape), w_f, w_b.view(w.shape)
        fm = to_matrix(fmask, layout)
        bm, w_b = backward_mask_and_product(fm, to_matrix(w, layout), self.perms[name].to(fm.device), p.n, p.m)
        return fmask, from_matrix(bm, w.shape, layout), w_f, from_matrix(w_b, w.shape, layout)

    def _batch(self, weights: list[torch.Tensor]) -> list | None:
        """`per_forward`'s batch: every layer's four operands, as `_operands` gives them, where each is made from
        its matrix view's rows (a Linear, or a ``flatten`` conv: `sparsity.batch.LayerMakes.bimask`). Not under
        autocast, where the GEMM is the Function's, which saves ``W * B_b`` itself rather than a view of W."""
        if torch.is_autocast_enabled(weights[0].device.type) or not self.own_matrix_views(weights):
            return None
        return self._makes.bimask(weights, [self.perms[name] for name in self.ctx.layers], self.ctx.pattern.n)

    def layer_forward(self, name, module, x):
        # every layer's operands at a step's first training forward (per_forward); traced, this layer's own
        compiling = torch.compiler.is_compiling()
        if not compiling and name not in self.perms:
            self._search(0)         # here, not in a make that per_forward may run on another thread
        fmask, _, w_f, w_b = self._operands(name, module) if compiling else self.per_forward(
            name, module, self._operands, split=self.ctx.pattern.m == 4,    # M = 4: compiled kernels' work
            batch=self._batch if self.ctx.pattern.m == 4 else None)
        conv = None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise MethodError(f"bimask: layer {name} uses padding_mode={module.padding_mode!r}; only zeros")
            conv = (module.stride, module.padding, module.dilation, module.groups)
        self.note_decay(name, module, fmask, self.params.decay)      # SR-STE's decay: in add_pruned_decay
        return bimask_gemm(x, module.weight, module.bias, w_f, w_b, conv)

    def forward_weight(self, name, module):
        return masked_weight(module.weight, self._masks_of(name, module)[0])

    def masks(self):
        return {name: self._masks_of(name, mod)[0] for name, mod in self.ctx.layers.items()}

    def backward_masks(self):
        return {name: self._masks_of(name, mod)[1] for name, mod in self.ctx.layers.items()}

    @torch.no_grad()
    def backward_survival(self) -> dict[str, float]:
        """Per layer: the share of forward-kept weights that the backward mask keeps, from the masks the
        backward GEMM uses now."""
        out = {}
        for name, mod in self.ctx.layers.items():
            fmask, bmask = self._masks_of(name, mod)
            out[name] = int(bmask.sum()) / max(int(fmask.sum()), 1)
        return out

    def metric_fields(self):
        share = self.backward_survival()
        return {"backward_survival": sum(share.values()) / len(share)} if share else {}

    def summary_fields(self):
        p = self.ctx.pattern
        return {"backward_survival": self.backward_survival(),
                "backward_survival_random_grouping": random_grouping_survival(p.n, p.m)}

    def export_pattern(self, name):
        return Pattern(self.ctx.pattern.n, self.ctx.pattern.m)

    def densities(self, name, step):
        r = self.ctx.pattern.density
        return r, r, 1.0

    def state_dict(self):
        return {**super().state_dict(), "perms": dict(self.perms), "searches": self.searches,
                "last_search_step": self.last_search_step}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.perms = dict(state.get("perms", {}))
        self.searches = int(state.get("searches", 0))
        self.last_search_step = int(state.get("last_search_step", -1))
