"""Hostile input to `nmtrain train`: one line on stderr naming the field or file, exit code 2, no partial output."""

import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from nmtrain.cli.main import app

cli = CliRunner()
QUICK = ["data.dataset=synthetic", "data.batch_size=64", "data.eval_batch_size=256", "model.name=mlp",
         "train.epochs=2", "optim.lr=0.05", "schedule.warmup_epochs=0", "--no-progress"]


def _one_line_exit_2(result, needle):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr, result.stderr


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


SPEC_FILES = {
    "malformed.yaml": ("model: [unclosed\n", "not valid YAML at line"),
    "unknown_key.yaml": ("optim:\n  lrr: 0.1\n", "optim.lrr: unknown key"),
    "wrong_type.yaml": ("train:\n  epochs: many\n", "train.epochs: expected int"),
    "not_a_mapping.yaml": ("- just\n- a list\n", "malformed"),   # needle checked loosely below
}


@pytest.mark.parametrize("name", sorted(SPEC_FILES))
def test_bad_spec_files(tmp_path, name):
    text, needle = SPEC_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", str(path), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    if name != "not_a_mapping.yaml":
        assert needle in result.stderr
    assert str(path) in result.stderr or needle.split(":")[0] in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["optim.lrr=0.1"], "optim.lrr: unknown key"),
    (["bogus.key=1"], "bogus: unknown key"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["train.epochs=1.5"], "train.epochs: expected int"),
    (["--pattern", "4:4"], "--pattern: N (weights kept) must be smaller than M"),
    (["--pattern", "5:4"], "--pattern: N (weights kept) must be smaller than M"),
    (["--pattern", "0:4"], "--pattern: N (weights kept per group) must be at least 1"),
    (["--pattern", "-1:4"], "--pattern"),
    (["sparsity.pattern=4:4"], "sparsity.pattern: N (weights kept) must be smaller than M"),
    (["sparsity.pattern=0:4"], "sparsity.pattern: N (weights kept per group) must be at least 1"),
    (["--method", "srste", "--pattern", "2:3", "sparsity.include=['3']"], "sparsity.include: layer 3"),
    (["model.name=resnet9000"], "model.name"),
    (["data.dataset=mnist9"], "data.dataset"),
    (["data.dataset=fashion_mnist", "data.root=/nonexistent"], "data.root"),
])
def test_bad_specs(tmp_path, args, needle):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), *args])
    _one_line_exit_2(result, needle)
    assert not out.exists()


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.max_steps=4"])
    assert result.exit_code == 0, result.stderr
    return out


def test_truncated_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = _snapshot(finished_run)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, f"--resume: {ckpt} is not a readable PyTorch file")
    assert _snapshot(finished_run) == before


def test_garbage_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(1000))
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, f"--resume: {ckpt} is not a readable PyTorch file")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_code_running_pickle_is_refused(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = finished_run / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)
    good["run"] = _RunsCode()
    torch.save(good, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "refused by weights-only loading")
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"                            # a plain pickle file too
    raw.write_bytes(pickle.dumps(_RunsCode()))
    os.replace(raw, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and str(ckpt) in result.stderr
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_that_is_not_a_training_checkpoint(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "is not an nmtrain training checkpoint (missing model")


def test_resume_without_a_checkpoint_or_a_run(finished_run, tmp_path):
    (finished_run / "checkpoint.pt").unlink()
    result = cli.invoke(app, ["train", "--resume", str(finished_run), "--no-progress"])
    _one_line_exit_2(result, "there is no checkpoint to resume from")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(cli.invoke(app, ["train", "--resume", str(empty)]), "--resume: ")
    assert list(empty.iterdir()) == []
    _one_line_exit_2(cli.invoke(app, ["train", "--resume", str(tmp_path / "absent")]), "--resume: ")


def test_output_directory_holding_another_run(finished_run):
    before = _snapshot(finished_run)
    result = cli.invoke(app, ["train", *QUICK, "--out", str(finished_run), "--method", "srste"])
    _one_line_exit_2(result, "already holds a run")
    assert _snapshot(finished_run) == before
    assert cli.invoke(app, ["train", *QUICK, "--out", str(finished_run), "train.max_steps=2",
                            "--overwrite"]).exit_code == 0


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F
    real = F.cross_entropy
    calls = {"train": 0}

    def poisoned(logits, target, *args, **kwargs):
        loss = real(logits, target, *args, **kwargs)
        if kwargs.get("reduction", "mean") == "mean":       # the training loss, not evaluation's sum
            calls["train"] += 1
            if calls["train"] == 7:                            # step 6 (0-based)
                return loss * float("nan")
        return loss
    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "train.checkpoint_interval=4"])
    _one_line_exit_2(result, "training diverged at step 6: loss is nan")
    assert f"{out / 'checkpoint.pt'} (step 4)" in result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    assert not list(out.glob(".*.tmp"))


def test_huge_learning_rate_diverges_without_a_checkpoint_of_bad_weights(tmp_path):
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "optim.lr=1e30", "train.checkpoint_interval=1"])
    _one_line_exit_2(result, "training diverged at step")
    assert "lower optim.lr" in result.stderr
    if (out / "checkpoint.pt").exists():
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "model.pt").exists()


def test_weights_gone_non_finite_before_a_mask_recompute_read_as_divergence(tmp_path, monkeypatch):
    # The transposable solvers refuse NaN/Inf weights; when the update made them so, the run must stop
    # with the divergence message, not a solver's error.
    from nmtrain.experiments.methods import transposable
    real = transposable.Transposable._compute

    calls = []

    def poison_then_compute(self, solver):
        calls.append(solver)
        if len(calls) == 2:                   # the first mask, then the recompute before step 3: poison first
            next(iter(self.ctx.layers.values())).weight.data[0, 0] = float("inf")
        return real(self, solver)
    monkeypatch.setattr(transposable.Transposable, "_compute", poison_then_compute)
    out = tmp_path / "run"
    result = cli.invoke(app, ["train", *QUICK, "--out", str(out), "--method", "transposable",
                              "method.params.mask_interval=3"])
    _one_line_exit_2(result, "training diverged at step 2: the weights are not finite after the update")
    assert not (out / "model.pt").exists()


# == class 3: tampered compressed files (convert) ==
#
# `nmtrain convert FILE --to dense` reads a compressed N:M safetensors file whose header says how large
# each dense tensor is. Each case below builds a real compressed file from a tiny model, tampers with
# it, and expects one line naming the file and the violated constraint, exit 2, and nothing written.

# This section's imports stay with it, so that the classes' sections merge cleanly.
import json
import random

from safetensors import safe_open
from safetensors.torch import save_file

from helpers import assert_refused, snapshot
from nmtrain.sparsity import make_mask, parse_pattern

LAYER = "fc.weight"                                         # 16 x 32 at 2:4: values and indices 16 x 16


@pytest.fixture(scope="module")
def compressed_bytes(tmp_path_factory):
    torch.manual_seed(0)
    fc, conv = torch.randn(16, 32), torch.randn(8, 8, 3, 3)
    state = {LAYER: fc * make_mask(fc, parse_pattern("2:4")), "fc.bias": torch.randn(16),
             "conv.weight": conv * make_mask(conv, parse_pattern("2:4"))}
    folder = tmp_path_factory.mktemp("compressed")
    torch.save(state, folder / "m.pt")
    result = cli.invoke(app, ["convert", str(folder / "m.pt"), "--to", "compressed", "--pattern", "2:4",
                              "--out", str(folder / "c.safetensors")])
    assert result.exit_code == 0, result.stderr
    return (folder / "c.safetensors").read_bytes()


def _split(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body):
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def meta(edit):
    """Rewrite the nmtrain metadata JSON in the safetensors header (8-byte length + JSON), data kept."""
    def tamper(path):
        header, body = _split(path.read_bytes())
        data = json.loads(header["__metadata__"]["nmtrain"])
        edit(data)
        header["__metadata__"]["nmtrain"] = json.dumps(data)
        path.write_bytes(_join(header, body))
    return tamper


def meta_text(text):
    """Replace the nmtrain metadata with raw text (not necessarily JSON)."""
    def tamper(path):
        header, body = _split(path.read_bytes())
        header["__metadata__"]["nmtrain"] = text
        path.write_bytes(_join(header, body))
    return tamper


def tensors(edit):
    """Re-save with safetensors' own writer after ``edit`` changed the stored tensors; metadata kept."""
    def tamper(path):
        with safe_open(str(path), framework="pt") as fh:
            metadata, stored = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        edit(stored)
        save_file(stored, str(path), metadata=metadata)
    return tamper


def raw(edit):
    """Change the file's bytes."""
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def handmade(entries, nmtrain=None):
    """Replace the file by one written byte by byte: ``entries`` name -> (dtype code, shape, data bytes)."""
    def tamper(path):
        header, body = {}, b""
        for name, (code, shape, data) in entries.items():
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        if nmtrain is not None:
            header["__metadata__"] = {"nmtrain": json.dumps(nmtrain)}
        path.write_bytes(_join(header, body))
    return tamper


# A few hundred bytes that ask for 80 GB: one 1 x 2 layer whose metadata says 100000 x 200000
TINY_80GB = handmade({"w::values": ("F32", [1, 2], bytes(8)), "w::indices": ("U8", [1, 2], bytes([0, 1]))},
                     {"format": "nmtrain-nm-compressed", "version": 1, "order": ["w"],
                      "layers": {"w": {"pattern": "2:4", "layout": "nhwc", "shape": [100000, 200000],
                                       "dtype": "float32"}}})


def layer(**fields):
    return meta(lambda m: m["layers"][LAYER].update(fields))


def stored(part, change):
    """Re-save with ``LAYER::part`` replaced by ``change(it)``."""
    name = f"{LAYER}::{part}"
    return tensors(lambda t: t.update({name: change(t[name])}))


def positions(first_group):
    return tensors(lambda t: t[LAYER + "::indices"][0, :2].copy_(torch.tensor(first_group)))


# case -> (tamper, the constraint the error must name)
TAMPERS = {
    # sizes the header implies, against what is stored and against caps
    "inflated shape, 80 GB":          (layer(shape=[160000, 131072]), "elements <= 2^33"),
    "tiny file asking for 80 GB":     (TINY_80GB, "elements <= 2^33"),
    "inflated shape, 17 GB":          (layer(shape=[65536, 65536]), "elements = values * M/N"),
    "shape not what values imply":    (layer(shape=[8, 64]), "values shape"),
    "indices shape":                  (stored("indices", lambda i: i.reshape(32, 8)), "indices shape"),
    "shape cannot hold 2:4":          (layer(shape=[16, 30]), "shape holds the pattern"),
    "3-D shape":                      (layer(shape=[16, 32, 1]), "shape holds the pattern"),
    "zero in shape":                  (layer(shape=[0, 32]), "shape is positive ints"),
    "nine dimensions":                (layer(shape=[1] * 9), "shape is positive ints"),
    "metadata dtype mismatch":        (layer(dtype="float16"), "values dtype = dtype"),
    "stored values dtype mismatch":   (stored("values", lambda v: v.half()), "values dtype = dtype"),
    "indices not uint8":              (stored("indices", lambda i: i.long()), "indices dtype uint8"),
    "unknown dtype":                  (layer(dtype="save"), "dtype is floating point"),
    # the canonical form the writer produces
    "duplicate position in a group":  (positions([1, 1]), "positions ascending in group"),
    "positions out of order":         (positions([3, 1]), "positions ascending in group"),
    "position >= M":                  (positions([0, 7]), "positions < M"),
    # pattern and layout
    "N = M":                          (layer(pattern="4:4"), "pattern is N:M, N < M"),
    "M > 256":                        (layer(pattern="2:512"), "M <= 256"),
    "other M, same shape":            (layer(pattern="2:8"), "elements = values * M/N"),
    "unknown layout":                 (layer(layout="nchw"), "known layout"),
    # format, version, names
    "unknown version":                (meta(lambda m: m.update(version=2)), "known version"),
    "unknown format":                 (meta(lambda m: m.update(format="other-format")), "known format"),
    "missing tensor":                 (tensors(lambda t: t.pop(LAYER + "::indices")), "every named tensor stored"),
    "unreferenced tensor":            (tensors(lambda t: t.update(extra=torch.zeros(2))), "every stored tensor named"),
    "extra key-order entry":          (meta(lambda m: m["order"].append("ghost.weight")), "every named tensor stored"),
    "name with a newline":            (meta(lambda m: m["order"].append("evil\nname")), "every named tensor stored"),
    "duplicate key-order entry":      (meta(lambda m: m["order"].append("fc.bias")), "key order without duplicates"),
    "layer not in key order":         (meta(lambda m: m["order"].remove(LAYER)), "every layer in the key order"),
    "reserved '::' in a name":        (meta(lambda m: m["order"].append(LAYER + "::values")), "no name holds '::'"),
    # JSON that is malformed or of the wrong types
    "version as a string":            (meta(lambda m: m.update(version="1")), "known version"),
    "version as true":                (meta(lambda m: m.update(version=True)), "known version"),
    "shape as strings":               (layer(shape=["16", "32"]), "shape is positive ints"),
    "pattern as a number":            (layer(pattern=2), "pattern is N:M, N < M"),
    "order as a string":              (meta(lambda m: m.update(order=LAYER)), "order is a list of names"),
    "layers as a list":               (meta(lambda m: m.update(layers=[])), "layers is an object"),
    "layer entry as a string":        (meta(lambda m: m["layers"].update({LAYER: "2:4"})),
                                       "entry has pattern, layout, shape, dtype"),
    "layer entry without dtype":      (meta(lambda m: m["layers"][LAYER].pop("dtype")),
                                       "entry has pattern, layout, shape, dtype"),
    "metadata not JSON":              (meta_text("{"), "metadata is a JSON object"),
    "metadata a JSON list":           (meta_text("[]"), "metadata is a JSON object"),
    "metadata nested past the stack": (meta_text("[" * 200000), "metadata is a JSON object"),
    "metadata of 17 MiB":             (meta_text(json.dumps({"note": "x" * (17 << 20)})), "metadata <= 16 MiB"),
    # the safetensors container
    "huge header length":             (raw(lambda d: (1 << 62).to_bytes(8, "little") + d[8:]),
                                       "header length <= 64 MiB"),
    "random bytes":                   (raw(lambda d: random.Random(0).randbytes(len(d))), "header length <= 64 MiB"),
    "empty file":                     (raw(lambda d: b""), "8-byte header length"),
    "truncated in the header":        (raw(lambda d: d[:100]), "header inside the file"),
    "truncated in the data":          (raw(lambda d: d[:-7]), "readable safetensors"),
    "dtype torch cannot read":        (handmade({"a": ("F6_E2M3", [4], bytes(3))}), "dtypes torch reads"),
    "header JSON damaged":            (raw(lambda d: d[:8] + b"!" + d[9:]), "readable safetensors"),
}


@pytest.mark.parametrize("case", TAMPERS)
def test_tampered_compressed_file_is_refused(tmp_path, compressed_bytes, case):
    tamper, constraint = TAMPERS[case]
    path = tmp_path / "c.safetensors"
    path.write_bytes(compressed_bytes)
    tamper(path)
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["convert", str(path), "--to", "dense"])      # default output: tmp_path/c.pt
    assert_refused(result, f"[constraint: {constraint}]", before, snapshot(tmp_path))
    assert result.stderr.startswith(f"error: SOURCE: {path}")


def test_the_untampered_file_converts(tmp_path, compressed_bytes):
    path = tmp_path / "c.safetensors"
    path.write_bytes(compressed_bytes)
    result = cli.invoke(app, ["convert", str(path), "--to", "dense"])
    assert result.exit_code == 0, result.stderr
    assert set(torch.load(tmp_path / "c.pt", weights_only=True)) == {LAYER, "fc.bias", "conv.weight"}
