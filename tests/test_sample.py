"""`nmtrain sample` (experiments/sample.py, cli/sample.py) on tiny run directories built by hand: config.yaml,
tokenizer.json and model.pt of a tiny GPT, as `nmtrain train` leaves them (issue #23)."""

import json

import pytest
import torch

from nmtrain.data import DatasetInfo, register_dataset
from nmtrain.data import registry as data_registry
from nmtrain.experiments.models import build_model
from nmtrain.experiments.rundir import TOKENIZER
from nmtrain.experiments.sample import generate, load_language_model
from nmtrain.experiments.spec import dump_spec, load_spec
from nmtrain.sparsity import Pattern, nm_violation

from helpers import assert_refused, run_cli, snapshot

CHARS = "".join(sorted("\n !,.:;?abcdefghijklmnopqrstuvwxyzAEIMOR"))   # a char run's vocabulary, in id (code-point) order
BLOCK = 8
DATASET = "test_sample_text"


@pytest.fixture(scope="module", autouse=True)
def text_dataset():
    """A language-model dataset in the registry: a run's task comes from its dataset's entry (never read here)."""
    @register_dataset(DATASET, task="language_model")
    def builder(root, *, augment, download, seed):
        raise AssertionError("sample must not read the corpus")
    yield
    del data_registry._DATASETS[DATASET]


def make_run(path, tokenizer=None, *overrides):
    """A finished language-model run directory of a tiny random GPT; returns its path."""
    tokenizer = tokenizer or {"kind": "char", "chars": CHARS}
    spec = load_spec(None, ["model.name=gpt", f"data.dataset={DATASET}", f"data.block_size={BLOCK}",
                            "model.n_layer=1", "model.n_head=2", "model.n_embd=16", *overrides])
    vocab = 256 if tokenizer["kind"] == "byte" else len(tokenizer["chars"])
    info = DatasetInfo(DATASET, vocab, 1, BLOCK, 0, 0, task="language_model", vocab_size=vocab, block_size=BLOCK)
    torch.manual_seed(0)
    model = build_model("gpt", info, spec.model)
    with torch.no_grad():       # an opinionated model: at init (std 0.02) every next token is about as likely
        for param in model.parameters():
            param.mul_(30)
    path.mkdir()
    (path / "config.yaml").write_text(dump_spec(spec))
    (path / TOKENIZER).write_text(json.dumps(tokenizer))
    torch.save(model.state_dict(), path / "model.pt")
    return path


def sample(*args):
    return run_cli("sample", *args)


def test_sample_is_reproducible_for_a_seed_and_continues_the_prompt(tmp_path):
    run = make_run(tmp_path / "run")
    first = sample(run, "--prompt", "ROMEO:", "--tokens", 40, "--seed", 3, "--temperature", 0.8)
    assert first.exit_code == 0, first.output
    text = first.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) >= len("ROMEO:") + 30      # 40 characters, a newline maybe last
    assert set(text) <= set(CHARS)
    assert sample(run, "--prompt", "ROMEO:", "--tokens", 40, "--seed", 3, "--temperature", 0.8).stdout == first.stdout
    hot = [sample(run, "--prompt", "ROMEO:", "--tokens", 40, "--seed", seed, "--temperature", 2.0).stdout
           for seed in (3, 4)]
    assert hot[0] != hot[1]                                                     # another seed, other text


def test_generation_follows_the_model(tmp_path):
    """top-k 1 is greedy decoding: each token the argmax of the last position, context cropped to block_size."""
    model, tokenizer, spec = load_language_model(make_run(tmp_path / "run"))
    ids = tokenizer.encode("to be or not").tolist()            # longer than the block: cropped
    new = generate(model, ids, 12, BLOCK, top_k=1, seed=0)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq[-BLOCK:]]))[0, -1].argmax()))
    assert new == seq[len(ids):]
    assert tokenizer.decode(tokenizer.encode("to be")) == "to be"
    # a low temperature concentrates the draws on the likeliest token: at 0.01 every draw is the argmax
    assert generate(model, ids, 12, BLOCK, temperature=0.01, seed=5) == new


def test_byte_runs_take_any_text(tmp_path):
    run = make_run(tmp_path / "run", {"kind": "byte"})
    result = sample(run, "--prompt", "Ça va?", "--tokens", 10, "--seed", 1)
    assert result.exit_code == 0 and result.stdout.startswith("Ça va?")


def test_sample_with_pruned_and_converted_weights(tmp_path):
    run = make_run(tmp_path / "run")
    pruned = tmp_path / "pruned.pt"
    assert run_cli("prune", run / "model.pt", "-o", pruned, "--pattern", "2:4").exit_code == 0
    state = torch.load(pruned, weights_only=True)
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
                 "blocks.0.mlp.fc2.weight"):
        assert nm_violation(state[name], Pattern(2, 4), "nhwc") is None
    assert (state["wte.weight"] != 0).all() and torch.equal(state["head.weight"], state["wte.weight"])
    args = ("--prompt", "ROMEO:", "--tokens", 30, "--seed", 0)
    dense = sample(run, *args)
    sparse = sample(run, *args, "--weights", pruned)
    assert sparse.exit_code == 0 and sparse.stdout != dense.stdout
    assert sample(run, *args, "--weights", pruned).stdout == sparse.stdout

    compressed = tmp_path / "pruned.safetensors"
    converted = run_cli("convert", pruned, "--to", "compressed", "--pattern", "2:4", "--out", compressed)
    assert converted.exit_code == 0, converted.output
    assert sample(run, *args, "--weights", compressed).stdout == sparse.stdout


def test_bad_input_is_refused_and_nothing_written(tmp_path):
    run = make_run(tmp_path / "run")
    image_run = tmp_path / "image"
    image_run.mkdir()
    (image_run / "config.yaml").write_text(dump_spec(load_spec(None, [])))
    bare = make_run(tmp_path / "bare")
    (bare / TOKENIZER).unlink()
    other = tmp_path / "other.pt"
    torch.save({"wte.weight": torch.zeros(3, 3)}, other)
    cases = [
        ((run, "--prompt", "ROMEO & JULIET"),
         "--prompt: the character '&' is not in the vocabulary of the run's char tokenizer"),
        ((run, "--prompt", ""), "--prompt: give at least one character"),
        ((run, "--tokens", 0), "--tokens: must be an integer in [1, 100000]"),
        ((run, "--tokens", 100001), "--tokens: must be an integer in [1, 100000]"),
        ((run, "--temperature", 0), "--temperature: must be a finite number above 0"),
        ((run, "--temperature", "nan"), "--temperature: must be a finite number above 0"),
        ((run, "--top-k", 0), "--top-k: must be at least 1"),
        ((run, "--weights", other), "does not match model gpt"),
        ((run, "--weights", tmp_path / "missing.pt"), "--weights: "),
        ((image_run,), "is an image classification run (model lenet5 on fashion_mnist)"),
        ((bare,), "has no tokenizer.json"),
        ((tmp_path / "nowhere",), "is not a run directory"),
    ]
    for args, needle in cases:
        before = snapshot(tmp_path)
        assert_refused(sample(*args), needle, before, snapshot(tmp_path))


def test_a_tampered_tokenizer_is_refused(tmp_path):
    for record, needle in [({"kind": "word"}, "tokenizer.json: not a tokenizer record"),
                           ({"kind": "char", "chars": "aab"}, "must be its vocabulary, distinct characters"),
                           ({"kind": "char", "chars": 7}, "must be its vocabulary, distinct characters")]:
        run = tmp_path / record["kind"] / str(len(str(record)))
        run.parent.mkdir(exist_ok=True)
        make_run(run)
        (run / TOKENIZER).write_text(json.dumps(record))
        assert_refused(sample(run, "--prompt", "a"), needle)
    run = make_run(tmp_path / "short", {"kind": "char", "chars": CHARS[:-1]})   # 38 symbols for a 39-row model
    (run / TOKENIZER).write_text(json.dumps({"kind": "char", "chars": CHARS + "~"}))
    assert_refused(sample(run, "--prompt", "a"), "does not match model gpt")
