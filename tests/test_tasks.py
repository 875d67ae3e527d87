"""The task layer (experiments/tasks): what a batch means, which metric judges a run and which way is better.

Unit tests of both tasks on hand-made batches, the direction in compare's aggregate, verdict and claims
on hand-made rows, the synthetic token stream, and language-model runs end to end on a tiny per-token
model registered for this module only (the registry's `gpt` is another module's).
"""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.data import build_datasets, registry as data_registry
from nmtrain.experiments import models
from nmtrain.experiments.compare import aggregate, cell_line, verdict, write_results
from nmtrain.experiments.evaluate import evaluate
from nmtrain.experiments.rundir import Summary
from nmtrain.experiments.tasks import get_task, list_tasks, task_of_row

from helpers import assert_refused, run_cli, snapshot

CLS, LM = get_task("classification"), get_task("language_model")


# -- the two tasks on hand-made batches ------------------------------------------------------------

def test_the_registry_lists_both_tasks_and_refuses_an_unknown_one():
    assert list(list_tasks()) == ["classification", "language_model"]
    with pytest.raises(ValueError, match="task: 'vision' is unknown; use one of: classification, language_model"):
        get_task("vision")


def test_classification_is_todays_cross_entropy_and_accuracy():
    torch.manual_seed(0)
    net = nn.Linear(6, 3)
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(3)]
    x, y = batches[0]
    assert torch.equal(CLS.loss(net, x, y), F.cross_entropy(net(x), y))
    assert CLS.targets(y) == 5
    acc, loss = evaluate(net, batches, torch.device("cpu"))
    assert CLS.evaluate(net, batches, torch.device("cpu")) == {"test_loss": loss, "accuracy": acc}
    assert CLS.example_input(data_registry.DatasetInfo("s", 3, 2, 9, 1, 1), torch.device("cpu")).shape == (1, 2, 9, 9)
    assert CLS.best(50.0, {"accuracy": 60.0}) == 60.0 and CLS.best(50.0, {"accuracy": 40.0}) == 50.0


class Uniform(nn.Module):
    """Logits of zeros: every token equally likely, whatever the input."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def test_language_model_loss_is_the_mean_over_every_target_token():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 7)
    x, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    logits = emb(x)
    by_hand = -torch.stack([logits[b, t].log_softmax(-1)[y[b, t]] for b in range(3) for t in range(5)])
    assert torch.allclose(LM.loss(emb, x, y), by_hand.mean())
    assert torch.allclose(LM.loss(emb, x, y, reduction="sum"), by_hand.sum())
    assert LM.targets(y) == 15


def test_language_model_metrics_are_per_token_over_the_whole_loader():
    # A uniform model over 16 tokens: ln 16 nats per token, perplexity 16, 4 bits, whatever the batches.
    batches = [(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)),
               (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))]
    m = LM.evaluate(Uniform(16), batches, torch.device("cpu"))
    assert list(m) == ["val_loss", "perplexity", "bpc"]
    assert m["val_loss"] == pytest.approx(math.log(16)) and m["perplexity"] == pytest.approx(16.0)
    assert m["bpc"] == pytest.approx(4.0)
    # Unequal batches weigh by their tokens, not by batch: 8 tokens at loss a, 4 at loss b.
    emb = nn.Embedding(3, 3)
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[2.0, 0, 0], [0, 0, 0], [0, 0, 0]]))
    m = LM.evaluate(emb, batches, torch.device("cpu"))
    a = -math.log(math.exp(2) / (math.exp(2) + 2))          # token 0 predicts 0
    b = -math.log(1 / (math.exp(2) + 2))                    # token 0 predicts 1
    assert m["val_loss"] == pytest.approx((8 * a + 4 * b) / 12)
    assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    assert LM.example_input(data_registry.DatasetInfo("t", 5, 1, 6, 1, 1, task="language_model", block_size=6),
                            torch.device("cpu")).dtype == torch.long


def test_lower_is_better_for_the_language_model():
    assert LM.lower_is_better and not CLS.lower_is_better
    assert LM.better(5.0, 6.0) and not CLS.better(5.0, 6.0)
    assert LM.best(math.inf, {"val_loss": 2.0}) == 2.0 and LM.best(1.5, {"val_loss": 2.0}) == 1.5
    assert LM.gain(5.0, 6.0) == 1.0 and CLS.gain(5.0, 6.0) == -1.0
    assert LM.summary_fields({"val_loss": 2.0, "perplexity": math.exp(2), "bpc": 2 / math.log(2)}, 1.5) == {
        "final_val_loss": 2.0, "final_perplexity": math.exp(2), "final_bpc": 2 / math.log(2), "best_val_loss": 1.5}


def test_a_language_model_summary_puts_its_keys_where_the_accuracies_stand():
    summary = Summary(name="r", method="dense", method_params={}, pattern=None, density=1.0, model="gpt",
                      dataset="shakespeare", seed=0, device="cpu", builder={}, eval_split="test", epochs=1.0,
                      steps=4, wall_seconds=0.1, sparse_layers={}, skipped_layers={}, train_flops={}, accel={},
                      results={"final_val_loss": 2.0, "final_perplexity": 7.4, "final_bpc": 2.9, "best_val_loss": 1.9},
                      task="language_model", corpus={"name": "c"}).to_dict()
    keys = list(summary)
    assert keys[10:14] == ["final_val_loss", "final_perplexity", "final_bpc", "best_val_loss"]
    assert keys[-2:] == ["task", "corpus"] and "final_accuracy" not in summary


# -- the direction in compare and claims -------------------------------------------------------------

def _row(method, pattern, seed, ppl, flops=1.0):
    return {"method": method, "pattern": pattern, "density": 0.5, "final_perplexity": ppl,
            "final_val_loss": math.log(ppl), "epochs": 1, "seed": seed, "flops_ratio": flops, "wall_seconds": 1.0,
            "mask_change_rate": None, "run_dir": "x", "accel": "none"}


def _lm_rows():
    rows = []
    for seed, base in ((0, 6.0), (1, 6.2), (2, 5.9)):
        rows += [_row("dense", "dense", seed, base),
                 _row("srste", "2:4", seed, base + (0.50, 0.52, 0.49)[seed], 0.88),        # clearly worse
                 _row("transposable", "4:8-T", seed, base + (0.51, 0.50, 0.52)[seed], 0.76),
                 _row("bame", "2:4", seed, base - (0.30, 0.31, 0.29)[seed], 0.70)]         # clearly better
    return rows


def test_aggregate_picks_the_lowest_perplexity_and_says_above_for_lower():
    cells = {(c["method"], c["pattern"]): c for c in aggregate(_lm_rows())}
    bame, srste, dense = cells[("bame", "2:4")], cells[("srste", "2:4")], cells[("dense", "dense")]
    assert bame["is_best"] and not dense["is_best"]
    assert bame["final_perplexity_mean"] == pytest.approx(6.033333 - 0.3, abs=1e-5)
    assert set(bame) >= {"final_perplexity_mean", "final_perplexity_std", "final_val_loss_mean"}
    assert "final_accuracy_mean" not in bame
    assert verdict(bame["vs_dense"], "–", True).startswith("above (-0.30, p=")     # lower perplexity: better
    assert verdict(srste["vs_dense"], "–", True).startswith("below (+0.50, p=")
    assert verdict(srste["vs_best"], "best", True).startswith("below (+0.80, p=")
    assert task_of_row(bame) is LM and task_of_row(_lm_rows()[0]) is LM
    assert cell_line(_lm_rows()[0], 1, 4, False) == "[1/4] dense seed 0: final ppl 6.000, wall 1.0 s · x"


def test_an_image_row_reads_as_before():
    row = {"method": "dense", "pattern": "dense", "final_accuracy": 89.6, "best_accuracy": 90.0, "seed": 0,
           "wall_seconds": 23.1, "run_dir": "x"}
    assert task_of_row(row) is CLS
    assert cell_line(row, 2, 6, False) == "[2/6] dense seed 0: final acc 89.60%, wall 23.1 s · x"
    test = {"difference": -0.5, "p_value": 0.01, "within_noise": False}
    assert verdict(test, "–") == "below (-0.50, p=0.010)"


def test_a_language_model_grid_writes_perplexity_columns(tmp_path):
    cells = aggregate(_lm_rows())
    write_results(cells, tmp_path, "lm", seeds=True)
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert list(rows[0])[5:8] == ["final_perplexity_mean", "final_perplexity_std", "final_val_loss_mean"]
    by = {(r["method"], r["pattern"]): r for r in rows}
    assert by[("bame", "2:4")]["vs_dense"].startswith("above") and by[("bame", "2:4")]["vs_best"] == "best"
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    write_results(_lm_rows(), tmp_path, "lm")
    assert next(csv.reader((tmp_path / "compare.csv").open()))[3:5] == ["final_perplexity", "final_val_loss"]


def test_claims_judge_perplexity_in_its_direction():
    spec = importlib.util.spec_from_file_location("claims", Path(__file__).resolve().parents[1] / "benchmarks" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    out = {v["claim"]: v for v in claims.verdicts(aggregate(_lm_rows()))}
    hubara = out["4:8-T about as accurate as 2:4 (Hubara et al.)"]
    assert hubara["holds"] and hubara["mean_a"] == pytest.approx(6.543333, abs=1e-5)
    bame = out["BAME ≈ SR-STE at 2:4, fewer FLOPs (Yang et al.)"]
    assert not bame["holds"] and bame["verdict"].startswith("does not hold (above)")    # lower perplexity


# -- the synthetic token stream ------------------------------------------------------------------------

def test_synthetic_text_yields_shifted_windows_every_offset_and_non_overlapping():
    train, val, info = build_datasets("synthetic_text", seed=3)
    assert (info.task, info.vocab_size, info.block_size, info.num_classes, info.image_size) == \
        ("language_model", 16, 8, 16, 8)
    assert len(train) == 2048 - 8 and len(val) == (512 - 9) // 8 + 1 == info.test_size
    x, y = train[5]
    x6, _ = train[6]
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (8,)
    assert torch.equal(x[1:], y[:-1]) and torch.equal(x6, torch.cat([x[1:], y[-1:]]))
    v0, w0 = val[0]
    v1, _ = val[1]
    assert torch.equal(v1[0:1], w0[-1:])              # the next window starts where the last one's targets end
    again, _, _ = build_datasets("synthetic_text", seed=3)
    assert torch.equal(again[100][0], train[100][0])
    other, _, _ = build_datasets("synthetic_text", seed=4)
    assert not torch.equal(other.tokens, train.tokens)
    with pytest.raises(ValueError, match="data.block_size: 600 leaves no window"):
        build_datasets("synthetic_text", block_size=600)


# -- language-model runs end to end ---------------------------------------------------------------------

class TinyLM(nn.Module):
    """A per-token model (embedding, three Linears): enough for a first-order token chain, causal by design."""

    def __init__(self, vocab, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.inp = nn.Linear(width, width)          # sparse: the embedding is the first layer (a lookup, dense)
        self.hidden = nn.Linear(width, width)       # sparse
        self.head = nn.Linear(width, vocab)         # the last: dense

    def forward(self, x):
        return self.head(F.relu(self.hidden(F.relu(self.inp(self.embed(x))))))


@pytest.fixture(scope="module")
def tiny_lm():
    """``model.name=tiny_lm`` for this module's runs: registered, then removed from the registry."""
    models.register_model("tiny_lm", task="language_model")(lambda vocab_size, **sizes: TinyLM(vocab_size))
    yield "tiny_lm"
    models._MODELS.pop("tiny_lm")


LM_RUN = ["data.dataset=synthetic_text", "model.name=tiny_lm", "data.batch_size=32", "data.eval_batch_size=64",
          "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0", "schedule.warmup_epochs=0",
          "train.max_steps=48", "train.eval_interval=16", "train.checkpoint_interval=16", "--no-progress"]


@pytest.fixture(scope="module")
def lm_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    result = run_cli("train", *LM_RUN, "--method", "srste", "--pattern", "2:4", "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    return out, result


def test_a_language_model_run_records_perplexity(lm_run):
    out, result = lm_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [16, 32, 48]
    assert list(lines[0])[:6] == ["step", "epoch", "loss", "val_loss", "perplexity", "bpc"]
    assert "accuracy" not in lines[0] and "test_loss" not in lines[0]
    for r in lines:
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["bpc"] == pytest.approx(r["val_loss"] / math.log(2))
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "language_model" and s["corpus"]["name"] == "synthetic_text"
    assert s["eval_split"] == "validation"
    assert "final_accuracy" not in s
    # The chain leaves ln 2 nats per token to learn; a uniform guess costs ln 16 = 2.77.
    assert s["final_val_loss"] < 1.2 < math.log(16) and s["final_perplexity"] == pytest.approx(math.exp(s["final_val_loss"]))
    assert s["best_val_loss"] == min(r["val_loss"] for r in lines) <= s["final_val_loss"] + 1e-9
    assert list(s["sparse_layers"]) == ["inp.weight", "hidden.weight"]
    assert s["train_flops"]["ratio"] < 1.0
    assert "final ppl" in result.stdout and "val loss" in result.stdout
    assert not (out / "tokenizer.json").exists()        # token ids already: no tokenizer to record


def test_a_language_model_run_resumes_bit_identical(lm_run, tmp_path, monkeypatch):
    from helpers import interrupt_at, resume

    ref, _ = lm_run
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, 20)
        cut = run_cli("train", *LM_RUN, "--method", "srste", "--pattern", "2:4", "--out", out)
    assert cut.exit_code == 130, cut.stderr
    assert resume(out).exit_code == 0
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (ref / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


def test_a_language_model_run_writes_its_tokenizer(tiny_lm, tmp_path, monkeypatch):
    entry = data_registry._DATASETS["synthetic_text"]

    def with_tokenizer(root, **kwargs):
        from dataclasses import replace
        train, val, info = entry.builder(root, **kwargs)
        return train, val, replace(info, tokenizer={"kind": "char", "chars": "abcdefghijklmnop"})
    monkeypatch.setitem(data_registry._DATASETS, "synthetic_text", data_registry._Entry("synthetic_text",
                                                                                         with_tokenizer, "t",
                                                                                         "language_model"))
    out = tmp_path / "run"
    result = run_cli("train", *LM_RUN, "train.max_steps=2", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "tokenizer.json").read_text()) == {"kind": "char", "chars": "abcdefghijklmnop"}


def test_compare_on_language_models_tabulates_perplexity(tiny_lm, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("compare", *LM_RUN, "train.max_steps=16", "--methods", "dense,srste", "--patterns", "2:4",
                     "--seeds", "0,1", "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    data = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["n_seeds"]) for r in data] == [("dense", 2), ("srste", 2)]
    assert all(r["final_perplexity_mean"] > 1 and "final_accuracy_mean" not in r for r in data)
    best = min(data, key=lambda r: r["final_perplexity_mean"])
    assert best["is_best"] and sum(r["is_best"] for r in data) == 1
    assert "final ppl" in result.stdout


def test_adaprune_on_a_language_model_reports_perplexity(lm_run, tmp_path):
    src, _ = lm_run
    out = tmp_path / "ada"
    result = run_cli("adaprune", src, "--pattern", "1:4", "--iters", "30", "--calib-samples", "64", "--out", out,
                     "--no-progress")
    assert result.exit_code == 0, result.stderr + result.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "language_model" and "accuracy_original" not in s
    trained = json.loads((src / "summary.json").read_text())["final_perplexity"]
    assert s["perplexity_original"] == pytest.approx(trained, rel=1e-5)
    assert s["final_perplexity"] == s["perplexity_adaprune"] == pytest.approx(math.exp(s["final_val_loss"]))
    assert "validation perplexity" in result.stdout


def test_a_bad_language_model_spec_is_one_line_and_writes_nothing(tiny_lm, tmp_path):
    before = snapshot(tmp_path)
    result = run_cli("train", *LM_RUN, "data.image_size=32", "--out", tmp_path / "run")
    assert_refused(result, "data.image_size", before, snapshot(tmp_path))
