"""`nmtrain adaprune --method learned`: MaskLLM-style learned masks as a one-shot method.

The algorithm is `experiments/learned_masks.py` (weights frozen; per group of M, or per M x M tile for
N:M-T, logits over the candidate masks, Gumbel-softmax samples with annealed temperature and scale, Adam
on the logits against the task's own loss on the calibration batches; the argmax deployed). This module
adapts it to the one-shot contract: the prior comes from another one-shot method (``--prior``,
magnitude by default; wanda or sparsegpt run on a fresh copy of the source to give theirs), the
deployed masks are folded into the source's weights (no weight update: ``--finetune`` then fits the
kept weights as for any method), and the cost (steps, seconds) and what the learning changed go to
summary.json as ``learned_*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...sparsity import Pattern, PatternError, fold_mask
from ...sparsity.learned import check_candidates
from ..learned_masks import LearnedError, LearnedSettings, learn_masks
from .registry import ConversionError, Job, Outcome, get_oneshot, make_params, register_oneshot

PRIORS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LearnedParams:
    """The choices a user sets; the rest of MaskLLM's recipe is `LearnedSettings`' defaults."""
    learn_steps: int = 200          # Adam steps on the logits, cycling over the calibration batches
    learn_lr: float = 5e-4          # MaskLLM's LLaMA scripts: LR 5e-5 x lr-mult 10, cosine to a tenth
    prior: str = "magnitude"        # the one-shot method whose mask the logits start from
    prior_strength: float = 3.0     # MaskLLM's --prior-strength

    def check(self, pattern: Pattern) -> None:
        try:        # a family of candidates too large to enumerate (4:8-T) is refused before any work
            check_candidates(pattern.n, pattern.m, pattern.transposable)
        except PatternError as exc:
            raise ConversionError(f"--pattern: --method learned: {exc}") from None
        if self.prior not in PRIORS:
            raise ConversionError(f"--prior: {self.prior!r} is unknown; use one of: {', '.join(PRIORS)}")
        try:
            self.settings().check()
        except LearnedError as exc:     # names the settings field; say the option
            field, _, rest = str(exc).partition(":")
            option = {"steps": "--learn-steps", "lr": "--learn-lr"}.get(field, "--" + field.replace("_", "-"))
            raise ConversionError(f"{option}:{rest}") from None

    def settings(self) -> LearnedSettings:
        return LearnedSettings(steps=self.learn_steps, lr=self.learn_lr, lr_min=self.learn_lr / 10,
                               prior_strength=self.prior_strength)


@register_oneshot("learned", params=LearnedParams, title="learned", needs_loss=True,
                  summary="MaskLLM-style: logits over the candidate masks of each group (M x M tile for N:M-T), "
                          "Gumbel-softmax on the task's loss, weights frozen, argmax deployed (Fang et al., 2024)")
def learned(job: Job, params: LearnedParams) -> Outcome:
    prior = _prior(job, params.prior)
    bar = job.progress.add_task("learned masks", total=params.learn_steps, info="")

    def on_step(step: int, loss: float) -> None:
        job.progress.update(bar, advance=1, info=f"loss {loss:.4f}")

    try:
        masks, stats = learn_masks(job.model, job.layers, job.pattern, job.layout, prior,
                                   lambda: job.calib.batches(job.device),
                                   lambda net, batch: job.task.loss(net, *batch), params.settings(),
                                   job.generator, on_step=on_step)
    except LearnedError as exc:
        raise ConversionError(f"--method learned: {exc}") from None
    with torch.no_grad():
        for name, layer in job.layers.items():
            layer.weight.copy_(fold_mask(job.original_layer(name).weight.detach(), masks[name]))
    return Outcome(masks=masks, fields={f"learned_{k}": v for k, v in stats.items()})


def _prior(job: Job, name: str) -> dict[str, torch.Tensor]:
    """The prior masks: magnitude's (the job's own), or another method's on a fresh copy of the source."""
    if name == "magnitude":
        return dict(job.prior)
    method = get_oneshot(name)
    return method.fn(job.fresh(), make_params(method.params, {}, job.pattern)).masks
