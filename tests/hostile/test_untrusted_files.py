"""Hostile input, class 3: untrusted files. A checkpoint is read with `torch.load(weights_only=True)`
(a code-running pickle is refused); a compressed N:M file, a run's JSON files, a dataset file and an
image are each read by one checking reader: tampering is one line naming the file."""

import json
import os
import pickle
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmtrain.cli.main import app
from nmtrain.sparsity import make_mask, parse_pattern

from helpers import assert_refused, cli, resume, snapshot, write_imagefolder


# == class 3: checkpoints ==
# A checkpoint is read with `torch.load(weights_only=True)` (`io.load_state_dict` / `RunDir.load_checkpoint`):
# a damaged, foreign or code-running one is one line naming the file.

def test_truncated_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(finished_run)
    assert_refused(resume(finished_run), f"--resume: {ckpt} is not a readable PyTorch file", before,
                   snapshot(finished_run))


def test_garbage_checkpoint_for_resume(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    ckpt.write_bytes(os.urandom(1000))
    assert_refused(resume(finished_run), f"--resume: {ckpt} is not a readable PyTorch file")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_code_running_pickle_is_refused(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = finished_run / "checkpoint.pt"
    good = torch.load(ckpt, weights_only=True)
    good["run"] = _RunsCode()
    torch.save(good, ckpt)
    assert_refused(resume(finished_run), "refused by weights-only loading")
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "raw.pt"                            # a plain pickle file too
    raw.write_bytes(pickle.dumps(_RunsCode()))
    os.replace(raw, ckpt)
    assert_refused(resume(finished_run), str(ckpt))
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_that_is_not_a_training_checkpoint(finished_run):
    ckpt = finished_run / "checkpoint.pt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    assert_refused(resume(finished_run), "is not an nmtrain training checkpoint (missing model")


def test_resume_without_a_checkpoint_or_a_run(finished_run, tmp_path):
    (finished_run / "checkpoint.pt").unlink()
    assert_refused(resume(finished_run), "there is no checkpoint to resume from")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(cli.invoke(app, ["train", "--resume", str(empty)]), "--resume: ")
    assert list(empty.iterdir()) == []
    assert_refused(cli.invoke(app, ["train", "--resume", str(tmp_path / "absent")]), "--resume: ")



# == class 3: tampered compressed files (convert) ==
#
# `nmtrain convert FILE --to dense` reads a compressed N:M safetensors file whose header says how large
# each dense tensor is. Each case below builds a real compressed file from a tiny model, tampers with
# it, and expects one line naming the file and the violated constraint, exit 2, and nothing written.

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


# == class 3: tampered run files ==
# The JSON files of a run directory are read back by one reader (io.read_json_file): a regular file, at
# most MAX_JSON_BYTES, UTF-8, the JSON shape nmtrain writes; anything else is one line naming the file.

TAMPERED_JSON = {"random bytes": os.urandom(200), "not json": b"garbage{\n", "a list": b"[1, 2]\n",
                 "deep": b"[" * 100000 + b"]" * 100000, "latin-1": "caf\xe9".encode("latin-1")}


@pytest.mark.parametrize("tamper", sorted(TAMPERED_JSON))
def test_a_tampered_summary_is_one_line_for_convert(finished_run, tmp_path, tamper):
    (finished_run / "summary.json").write_bytes(TAMPERED_JSON[tamper])
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["convert", str(finished_run), "--to", "compressed"])
    assert_refused(result, f"SOURCE: {finished_run / 'summary.json'} ", before, snapshot(tmp_path))


@pytest.mark.parametrize("tamper", sorted(TAMPERED_JSON))
def test_a_tampered_metrics_file_is_one_line_for_resume(finished_run, tamper):
    (finished_run / "metrics.jsonl").write_bytes(TAMPERED_JSON[tamper])
    before = snapshot(finished_run)
    result = resume(finished_run)
    assert_refused(result, f"--resume: {finished_run / 'metrics.jsonl'} ", before, snapshot(finished_run))


def test_an_oversized_run_file_is_refused_unread(finished_run, monkeypatch):
    from nmtrain.experiments import io as io_module
    monkeypatch.setattr(io_module, "MAX_JSON_BYTES", 16)
    result = resume(finished_run)
    assert_refused(result, "more than nmtrain writes there")


def test_a_gzip_bomb_in_a_dataset_file_is_refused_at_its_cap(tmp_path, monkeypatch):
    import gzip
    from nmtrain.data import idx
    from nmtrain.data.registry import DatasetError
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1 << 16)          # the real cap is 1 GiB: same code, less time
    with gzip.open(tmp_path / "bomb.gz", "wb") as fh:
        fh.write(b"\0" * (1 << 20))
    with pytest.raises(DatasetError, match="expands to more than"):
        idx.read_idx(tmp_path / "bomb.gz")


IMAGE_TAMPERS = {"random bytes": lambda png: os.urandom(300), "truncated": lambda png: png[: len(png) // 2],
                 "empty": lambda png: b""}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("tamper", sorted(IMAGE_TAMPERS))
def test_an_unreadable_image_in_an_imagefolder_is_one_line_naming_it(tmp_path, tamper, workers):
    # Read through one loader (data/imagefolder.py `load_image`); from a DataLoader worker, the CLI takes
    # the original line out of the worker's re-raised traceback (cli/errors.py `one_line`).
    root = write_imagefolder(tmp_path / "images", per_class=2, side=16)
    bad = root / "train" / "bee" / "1.png"
    bad.write_bytes(IMAGE_TAMPERS[tamper](bad.read_bytes()))
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    result = cli.invoke(app, ["train", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                              "data.batch_size=2", f"data.num_workers={workers}", "model.name=lenet5",
                              "train.epochs=1", "--out", str(out), "--no-progress"])
    assert_refused(result, f"data.root: {bad} cannot be read as an image", before, snapshot(tmp_path))
