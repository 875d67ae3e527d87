"""`nmtrain sample`: print text from a trained (or pruned, or converted) language-model run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import user_errors


@user_errors
def sample(
    run: Path = typer.Argument(..., help="A language-model run directory of `nmtrain train` (config.yaml, "
                               "tokenizer.json, model.pt)."),
    prompt: str = typer.Option("\n", help="Text to continue; every character must be in the run's vocabulary "
                               "(data.tokenizer char) or any text (byte)."),
    tokens: int = typer.Option(500, help="Tokens to generate (at most 100000)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature, above 0: 1.0 samples the model as it is, "
                                      "lower is greedier."),
    seed: int = typer.Option(0, help="Seed of the sampler: the same run, prompt and seed give the same text."),
    weights: Optional[Path] = typer.Option(None, help="Other weights for the run's model: a state_dict (.pt, e.g. "
                                           "from `nmtrain prune`) or a compressed .safetensors from `nmtrain convert`."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Sample among the K most likely tokens only."),
) -> None:
    """Generate text from a language-model run: the prompt, then TOKENS tokens drawn one at a time.

    The model is rebuilt from the run's config.yaml and its vocabulary from tokenizer.json (the corpus is
    not read); the context is cropped to data.block_size. Prints prompt + continuation on stdout.
    """
    from ..experiments.sample import sample_run

    text = sample_run(run, prompt, tokens, temperature=temperature, seed=seed, weights=weights, top_k=top_k)
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
