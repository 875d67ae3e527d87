"""`nmtrain sample`: text from a trained language-model run, so a person can read what the model learned.

    text = sample_run("runs/shakespeare", prompt="ROMEO:", tokens=200, temperature=0.8, seed=0)

The model is rebuilt from the run's config.yaml alone (model.name and its sizes, data.block_size) and
its vocabulary from tokenizer.json: the corpus is never read. Its weights are the run's model.pt, or
``weights``: a state_dict (.pt, e.g. from `nmtrain prune`) or a compressed safetensors file from
`nmtrain convert` (inflated to the dense state by `convert.load_source`). Each new token is drawn from
softmax(logits / temperature) over the last ``block_size`` tokens, among the ``top_k`` most likely when
given, by a torch.Generator seeded with ``seed``: the same run, prompt and seed give the same text.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..data import DatasetInfo, dataset_task
from ..data.text import DEFAULT_BLOCK_SIZE
from ..data.tokenizer import from_record
from .convert import load_source
from .errors import ExperimentError
from .evaluate import eval_mode
from .io import read_json_file, state_dict_mismatch
from .models import build_model
from .rundir import CONFIG, MODEL, TOKENIZER, RunDir, load_weights
from .spec import Spec, from_dict
from .yamlfile import read_yaml

MAX_TOKENS = 100_000        # --tokens: a page of text is ~3,000; the bound stops a typo from running for hours


class SampleError(ExperimentError):
    """A run, weights file or option `nmtrain sample` cannot use; one-line message."""


# -- the model -----------------------------------------------------------------------------------

def load_language_model(run: str | Path, weights: str | Path | None = None) -> tuple[nn.Module, dict, Spec]:
    """(the run's model with its weights, in eval mode on the CPU; its tokenizer; its spec)."""
    rd = RunDir(run)
    if not rd.path.is_dir() or not rd.config.is_file():
        raise SampleError(f"RUN: {rd.path} is not a run directory (no {CONFIG}); pass the directory of "
                          "`nmtrain train --out`")
    spec = from_dict(Spec, read_yaml(rd.config, "RUN"))
    task = dataset_task(spec.data.dataset)
    if task != "language_model":
        raise SampleError(f"RUN: {rd.path} is an image classification run (model {spec.model.name} on "
                          f"{spec.data.dataset}); nmtrain sample needs a language-model run")
    if not rd.tokenizer.is_file():
        raise SampleError(f"RUN: {rd.path} has no {TOKENIZER}, so its vocabulary is unknown; it is not a "
                          "language-model run of nmtrain")
    # the run's tokenizer record, read by the one bounded JSON reader and checked as data/tokenizer.py reads any
    tokenizer = from_record(read_json_file(rd.tokenizer, "RUN"), f"RUN: {rd.tokenizer}")
    size, block = tokenizer.vocab_size, context(spec)
    info = DatasetInfo(spec.data.dataset, num_classes=size, in_channels=1, image_size=block, train_size=0,
                       test_size=0, task=task, vocab_size=size, block_size=block, tokenizer=tokenizer.record())
    model = build_model(spec.model.name, info, spec.model)
    state, source = _weights(rd, weights)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise SampleError(f"{source}: does not match model {spec.model.name} of {rd.config}: {problem}")
    model.load_state_dict(state)
    return model.eval(), tokenizer, spec


def context(spec: Spec) -> int:
    """The run's context length: data.block_size, or the text datasets' default when the spec left it null."""
    return spec.data.block_size or DEFAULT_BLOCK_SIZE


def _weights(rd: RunDir, weights: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict to sample with and the field that named it, for messages."""
    if weights is None:
        if not rd.model.is_file():
            raise SampleError(f"RUN: {rd.path} has no {MODEL} (the run has not finished); finish it with "
                              "`nmtrain train --resume`, or pass --weights FILE")
        return load_weights(rd.model, "RUN"), f"RUN: {rd.model}"
    path = Path(weights)
    if path.suffix == ".safetensors" and path.is_file():
        return load_source(path).state, f"--weights {path}"
    return load_weights(path, "--weights"), f"--weights {path}"


# -- sampling ------------------------------------------------------------------------------------

def check_options(tokens: int, temperature: float, top_k: int | None) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise SampleError(f"--tokens: must be an integer in [1, {MAX_TOKENS}], got {tokens!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise SampleError(f"--temperature: must be a finite number above 0 (1.0 samples the model as it is; "
                          f"lower is greedier), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise SampleError(f"--top-k: must be at least 1 (1 is greedy decoding), got {top_k!r}")


@torch.no_grad()
def generate(model: nn.Module, ids: list[int], tokens: int, block_size: int, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> list[int]:
    """``tokens`` new ids after ``ids``: each from the logits of the last position, given at most the last
    ``block_size`` tokens (the context the model was trained with)."""
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.tensor([ids], dtype=torch.long)
    with eval_mode(model):
        for _ in range(tokens):
            logits = model(sequence[:, -block_size:])[0, -1].float() / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            sequence = torch.cat([sequence, nxt.view(1, 1)], dim=1)
    return sequence[0, len(ids):].tolist()


def sample_run(run: str | Path, prompt: str, tokens: int, temperature: float = 1.0, seed: int = 0,
               weights: str | Path | None = None, top_k: int | None = None) -> str:
    """The prompt and ``tokens`` tokens of continuation from the run's model (the module docstring says how)."""
    check_options(tokens, temperature, top_k)
    if not prompt:
        raise SampleError("--prompt: give at least one character to continue from (e.g. --prompt 'ROMEO:')")
    model, tokenizer, spec = load_language_model(run, weights)
    ids = tokenizer.encode(prompt, "--prompt").tolist()
    new = generate(model, ids, tokens, context(spec), temperature, top_k, seed)
    return prompt + tokenizer.decode(new)
