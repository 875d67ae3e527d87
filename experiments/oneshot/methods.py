"""The built-in one-shot methods: magnitude, AdaPrune, Wanda and SparseGPT (docs/methods.md#one-shot-conversion).

Each is a function of a `Job` and its params, registered by name (registry.py). Wanda and SparseGPT take
the layers in model order, each on the inputs of the model whose earlier layers are already converted
(the references' sequential order; they go block by block, nmtrain layer by layer, since it knows no
blocks across model families), and work on a layer's GEMM view (`to_matrix` under the run's layout):
a Conv2d's inputs are unfolded into patches in the same K order (`gemm_rows`), so the Hessian and the
input norms line up with the weight's columns, and N:M-T tiles are the same M x M blocks as training's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...sparsity import Hessian, Pattern, fold_mask, from_matrix, sparsegpt, sq_norms, to_matrix, wanda_mask
from ...sparsity.oneshot import OneShotError, check_sparsegpt
from .calibration import gemm_rows, stream_inputs
from .reconstruct import AdaPruneParams, add_back_pruned, fit_layers
from .registry import ConversionError, Job, NoParams, Outcome, register_oneshot


def _set_weight(job: Job, name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        layer = job.layers[name]
        layer.weight.copy_(fold_mask(weight.to(layer.weight.dtype), mask))


@register_oneshot("magnitude", params=NoParams, title="magnitude",
                  summary="N:M of largest |w| along K (N:M-T: the transposable solver on |w|); no calibration")
def magnitude(job: Job, params: NoParams) -> Outcome:
    for name in job.layers:
        _set_weight(job, name, job.original_layer(name).weight.detach(), job.prior[name])
    return Outcome(masks=dict(job.prior))


@register_oneshot("adaprune", params=AdaPruneParams, sequential=lambda p: p.sequential, reconstructs=True,
                  title="AdaPrune", summary="magnitude mask, pruned |w| added back per group, Adam fit of the "
                  "kept weights and bias to the layer's output (Hubara et al., 2021)")
def adaprune(job: Job, params: AdaPruneParams) -> Outcome:
    for name in job.layers:
        w = job.original_layer(name).weight.detach()
        start = add_back_pruned(w, job.prior[name], job.pattern.m, job.layout) if params.add_back else w
        _set_weight(job, name, start, job.prior[name])
    fitted = fit_layers(job, job.prior, params, "AdaPrune")
    return Outcome(masks=dict(job.prior), layer_fields=fitted)


def _layer_by_layer(job: Job, label: str, convert) -> Outcome:
    """Run ``convert(name, layer) -> mask`` on each layer in order, timing each, one progress step per layer."""
    masks, layer_fields = {}, {}
    task = job.progress.add_task(f"{label} layers", total=len(job.layers), info="")
    for name, layer in job.layers.items():
        t0 = time.perf_counter()
        job.progress.update(task, info=name)
        masks[name] = convert(name, layer)
        layer_fields[name] = {"seconds": time.perf_counter() - t0}
        job.progress.advance(task)
    return Outcome(masks=masks, layer_fields=layer_fields)


@register_oneshot("wanda", params=NoParams, sequential=lambda p: True, title="Wanda",
                  summary="N:M of largest |w|·||x|| (Sun et al., ICLR 2024); no weight update")
def wanda(job: Job, params: NoParams) -> Outcome:
    pattern = job.pattern

    def convert(name, layer):
        norms = torch.zeros(to_matrix(layer.weight, job.layout).shape[1], device=job.device)

        def add(x):
            norms.add_(sq_norms(gemm_rows(layer, x, job.layout)))

        stream_inputs(job.model, layer, job.calib.inputs, job.calib.batch, job.device, add)
        w = layer.weight.detach()
        keep = wanda_mask(to_matrix(w, job.layout), norms, pattern.n, pattern.m, pattern.transposable, job.solver)
        mask = from_matrix(keep, w.shape, job.layout)
        _set_weight(job, name, w, mask)
        return mask

    return _layer_by_layer(job, "Wanda", convert)


@dataclass
class SparseGPTParams:
    """The reference's choices (IST-DASLab/sparsegpt ``opt.py``: ``--blocksize 128``, ``--percdamp .01``).

    ``blocksize`` must hold whole groups of M; left unset it is 128, rounded down to a multiple of M (at
    least M): 128 for every M that divides it, as the reference's."""
    blocksize: int | None = None    # columns per block of lazy updates; a multiple of M (None: 128, see above)
    percdamp: float = 0.01          # dampening: this share of the mean Hessian diagonal is added to it

    def check(self, pattern: Pattern) -> None:
        if self.blocksize is None:
            self.blocksize = max(pattern.m, 128 // pattern.m * pattern.m)
        try:
            check_sparsegpt(pattern, self.blocksize, self.percdamp)
        except OneShotError as exc:
            raise ConversionError(f"--{exc}") from None


@register_oneshot("sparsegpt", params=SparseGPTParams, sequential=lambda p: True, title="SparseGPT",
                  summary="N:M by w²/[H⁻¹]² every M columns, pruning error compensated through the inverse "
                  "Hessian (Frantar and Alistarh, ICML 2023)")
def sparsegpt_method(job: Job, params: SparseGPTParams) -> Outcome:
    pattern = job.pattern

    def convert(name, layer):
        w = layer.weight.detach()
        hessian = Hessian(to_matrix(w, job.layout).shape[1], device=job.device)
        stream_inputs(job.model, layer, job.calib.inputs, job.calib.batch, job.device,
                      lambda x: hessian.add_batch(gemm_rows(layer, x, job.layout), x.shape[0]))
        try:
            new, keep = sparsegpt(to_matrix(w, job.layout), hessian.matrix, pattern.n, pattern.m,
                                  pattern.transposable, params.blocksize, params.percdamp, job.solver)
        except OneShotError as exc:
            raise ConversionError(f"--{exc} (layer {name})") from None
        mask = from_matrix(keep, w.shape, job.layout)
        _set_weight(job, name, from_matrix(new, w.shape, job.layout), mask)
        return mask

    return _layer_by_layer(job, "SparseGPT", convert)
