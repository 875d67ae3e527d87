"""The GPT (experiments/gpt.py) and the language-model side of the model registry (issue #23): the causal
mask, tied head, nanoGPT's init, shapes, FLOPs, which Linears are sparse, the task check and a user's own
language model."""

import math
import sys

import pytest
import torch
from torch import nn

from nmtrain.data import DatasetInfo, register_dataset
from nmtrain.data import registry as data_registry
from nmtrain.experiments.build import validate
from nmtrain.experiments.tasks import get_task
from nmtrain.experiments.errors import ModelError
from nmtrain.experiments.flops import macs_per_sample
from nmtrain.experiments.gpt import GPT
from nmtrain.experiments.layers import called_layers, plan_layers
from nmtrain.experiments.models import build_model, builder_record, resolve_builder
from nmtrain.experiments.spec import ModelSpec, SpecError, load_spec
from nmtrain.sparsity import Pattern

from helpers import assert_refused, run_cli, snapshot

V, T = 11, 16       # a tiny vocabulary and context


def lm_info(vocab=V, block=T, name="tiny_text"):
    return DatasetInfo(name, num_classes=vocab, in_channels=1, image_size=block, train_size=0, test_size=0,
                       task="language_model", vocab_size=vocab, block_size=block, tokenizer={"kind": "byte"})


def tiny(**sizes):
    torch.manual_seed(0)
    spec = ModelSpec(name="gpt", **({"n_layer": 2, "n_head": 2, "n_embd": 32} | sizes))
    return build_model("gpt", lm_info(), spec)


@pytest.fixture
def text_dataset():
    """A language-model dataset name in the registry (nothing is read from it: the task check needs none)."""
    name = "test_gpt_text"

    @register_dataset(name, task="language_model")
    def builder(root, *, augment, download, seed):
        raise AssertionError("the task check must not read data")
    yield name
    del data_registry._DATASETS[name]


def test_shapes_and_a_shorter_window():
    model = tiny()
    tokens = torch.randint(0, V, (3, T))
    assert model(tokens).shape == (3, T, V)
    assert model(tokens[:, :5]).shape == (3, 5, V)            # sampling starts from a short prompt
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_future_tokens_never_change_past_logits():
    model = tiny().double().eval()
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, T))
    base = model(tokens)
    for p in (0, 5, T - 2):
        changed = tokens.clone()
        changed[:, p + 1:] = (changed[:, p + 1:] + 1 + torch.randint(0, V - 1, changed[:, p + 1:].shape)) % V
        out = model(changed)
        assert torch.equal(out[:, :p + 1], base[:, :p + 1])           # exactly: the past cannot see the future
        assert (out[:, p + 1] - base[:, p + 1]).abs().max() > 1e-6     # and the future does see its own tokens


def test_the_head_is_tied_to_the_token_embedding():
    model = tiny()
    assert model.head.weight is model.wte.weight
    assert {"wte.weight", "head.weight"} <= set(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and names.count("wte.weight") == 1     # one parameter, optimised once
    model(torch.randint(0, V, (2, T))).logsumexp(-1).mean().backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_init_is_nanogpts():
    torch.manual_seed(0)
    model = GPT(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256, bias=True)
    residual = 0.02 / math.sqrt(2 * 4)
    for block in model.blocks:
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert block.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.03)
        assert block.attn.proj.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(residual, rel=0.05)
        assert block.attn.qkv.bias.abs().max() == 0 and torch.equal(block.ln1.weight, torch.ones(256))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.pos.std().item() == pytest.approx(0.02, rel=0.05)
    no_bias = GPT(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)
    assert all(m.bias is None for m in no_bias.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))


def test_flops_count_the_attention_products_dense():
    model = tiny()
    macs = macs_per_sample(model, get_task("language_model").example_input(lm_info(), "cpu"))
    d = 32
    for i in range(2):
        assert macs[f"blocks.{i}.attn"] == 2 * T * T * d                 # Q K^T and A V
        assert macs[f"blocks.{i}.attn.qkv"] == T * d * 3 * d
        assert macs[f"blocks.{i}.attn.proj"] == T * d * d
        assert macs[f"blocks.{i}.mlp.fc1"] == macs[f"blocks.{i}.mlp.fc2"] == T * d * 4 * d
    assert macs["head"] == T * d * V
    assert "wte" not in macs                                           # a lookup, no multiply


def test_every_block_linear_is_sparse_embedding_and_head_dense():
    model = tiny()
    plan = plan_layers(model, Pattern(2, 4), "nhwc", called=called_layers(model, get_task("language_model").example_input(lm_info(), "cpu")))
    assert list(plan.sparse) == [f"blocks.{i}.{layer}" for i in range(2)
                                 for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert "table lookup" in plan.skipped["wte"] and "kept dense" in plan.skipped["head"]
    with pytest.raises(Exception, match="sparsity.include: layer wte cannot be trained sparse"):
        plan_layers(model, Pattern(2, 4), "nhwc", include=["wte", "blocks.*"])


def test_builder_record_holds_the_sizes():
    record = builder_record("gpt", lm_info(), ModelSpec(name="gpt", n_layer=2, n_head=2, n_embd=32))
    assert record["arguments"] == {"vocab_size": V, "block_size": T, "n_layer": 2, "n_head": 2, "n_embd": 32,
                                   "dropout": 0.0, "bias": False}


def test_the_task_of_model_and_dataset_must_match(text_dataset):
    with pytest.raises(ModelError, match="model.name: gpt is a language model; the dataset is image classification"):
        resolve_builder("gpt", "classification")
    with pytest.raises(ModelError, match="lenet5 is an image classifier; the dataset is language modelling"):
        resolve_builder("lenet5", "language_model")
    with pytest.raises(ModelError, match="torchvision:resnet18 is an image classifier"):
        resolve_builder("torchvision:resnet18", "language_model")
    with pytest.raises(ModelError, match="model.width: gpt is a language model, which takes no width"):
        validate(load_spec(None, ["model.name=gpt", f"data.dataset={text_dataset}", "model.width=2"]))
    with pytest.raises(ModelError, match="model.n_layer: lenet5 is an image classifier, which takes no n_layer"):
        validate(load_spec(None, ["model.n_layer=8"]))
    validate(load_spec(None, ["model.name=gpt", f"data.dataset={text_dataset}"]))      # no data read


def test_train_refuses_a_gpt_on_images_before_anything(tmp_path):
    before = snapshot(tmp_path)
    result = run_cli("train", "model.name=gpt", "--out", tmp_path / "run")
    assert_refused(result, "model.name: gpt is a language model; the dataset is image classification",
                   before, snapshot(tmp_path))


@pytest.mark.parametrize("override, needle", [
    ("model.n_head=3", "model.n_embd: 128 does not divide into model.n_head=3 heads"),
    ("model.n_layer=0", "model.n_layer: must be in [1, 256]"),
    ("model.n_embd=100000", "model.n_embd: must be in [1, 65536]"),
    ("model.dropout=1", "model.dropout: must be a finite number in [0, 1)"),
    ("data.block_size=0", "data.block_size: must be in [1, 65536]"),
    ("data.tokenizer=word", "data.tokenizer: 'word' is unknown; use char or byte"),
])
def test_model_sizes_are_checked_as_the_spec_loads(override, needle):
    with pytest.raises(SpecError) as exc:
        load_spec(None, [override])
    assert str(exc.value).startswith(needle) and "\n" not in str(exc.value)


USER_LM = '''
import torch
from torch import nn

class Bigram(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        self.mix = nn.Linear(vocab_size, vocab_size)

    def forward(self, tokens):
        return self.mix(self.table(tokens))

def bigram(vocab_size, block_size, n_embd=8):
    return Bigram(vocab_size)

def flat(vocab_size, block_size):
    return nn.Sequential(nn.Embedding(vocab_size, 4), nn.Flatten(), nn.LazyLinear(vocab_size))

def needs(vocab_size, depth):
    return Bigram(vocab_size)
'''


@pytest.fixture
def user_lm(tmp_path, monkeypatch):
    (tmp_path / "user_lm_mod.py").write_text(USER_LM)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_lm_mod"
    sys.modules.pop("user_lm_mod", None)


def test_a_users_language_model(user_lm):
    spec = ModelSpec(name=f"{user_lm}:bigram", n_embd=16)
    model = build_model(spec.name, lm_info(), spec)
    assert model(torch.randint(0, V, (2, T))).shape == (2, T, V)
    record = builder_record(spec.name, lm_info(), spec)
    assert record["arguments"] == {"vocab_size": V, "block_size": T, "n_embd": 16} and len(record["sha256"]) == 64


@pytest.mark.parametrize("name, sizes, needle", [
    ("flat", {}, "returns torch.float32 of shape (1, 11) for one window of 16 tokens, not float logits of shape "
                 "(1, 16, 11)"),
    ("needs", {}, "requires depth, which nmtrain cannot pass: it passes only vocab_size, block_size, n_layer"),
    ("bigram", {"n_layer": 6}, "model.n_layer: user_lm_mod:bigram takes no n_layer argument, so n_layer 6 would "
                               "be ignored"),
])
def test_a_users_language_model_that_does_not_fit(user_lm, name, sizes, needle):
    spec = ModelSpec(name=f"{user_lm}:{name}", **sizes)
    with pytest.raises(ModelError) as exc:
        build_model(spec.name, lm_info(), spec)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
