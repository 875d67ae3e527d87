"""Text corpora for language models: token windows, one fixed split, and the ``text`` dataset.

A corpus is a list of files' bytes. Its text is the files joined in sorted file-name order with one
"\\n" between them; it is tokenized whole (data/tokenizer.py: ``char`` or ``byte``) and split once,
the same on every machine, as nanoGPT splits its shakespeare_char: the first 90% of the tokens train,
the last 10% validate. Samples are windows of ``block_size`` tokens::

    x = tokens[i : i + block_size]        y = tokens[i + 1 : i + block_size + 1]   (both torch.long)

The train split gives the window at every offset (train tokens − block_size of them: an epoch is
millions of windows on a real corpus); the validation split gives non-overlapping windows, stride
``block_size``, so the mean loss over the validation loader is the loss per token on the whole split
but its last ``< block_size`` tokens. Each split must hold ``block_size + 1`` tokens at least.

`DatasetInfo.corpus` records what was read: the files, the sha256 of the joined text's bytes, its
size in bytes and characters, the token counts of the two splits and the split rule.

``text`` reads ``data.root``: one UTF-8 file, or a folder whose ``*.txt`` files (that folder only, not
its sub-folders: what is trained on stays visible in one listing) are the corpus. Everything read is
bounded: `MAX_TEXT_BYTES` in all, `MAX_FILES` files. Bad input is one line naming the field and the fix.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .registry import DatasetError, DatasetInfo, positive_int, register_dataset
from .tokenizer import Tokenizer, char_tokenizer, check_kind, code_points, ids_of

TRAIN_FRACTION = 0.9
SPLIT_RULE = ("files in sorted name order joined by one newline; the first 90% of the tokens train, "
              "the last 10% validate")
DEFAULT_BLOCK_SIZE = 64           # tokens of context when data.block_size is null (nanoGPT's CPU recipe)
MAX_TEXT_BYTES = 64 << 20       # a user's corpus: 64 MiB of text (tokens as int32: 256 MiB at most)
MAX_FILES = 10_000
MAX_BLOCK_SIZE = 65_536         # the spec's rule on data.block_size too


class TokenWindows(Dataset):
    """Windows of ``block_size`` tokens of ``tokens`` at offsets 0, stride, 2·stride, ...: ``(x, y)``,
    ``y`` the next token of each of ``x``'s. Tokens stay int32 in memory and become long per window."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {block_size} + 1")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - 1 - self.block_size) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride
        chunk = self.tokens[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


# ------------------------------------------------------------------------------------------------
# reading: bounded, regular files only


def read_bounded(path: Path, budget: int, shown: str, too_big: str, fix: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``budget`` of them; else a one-line DatasetError naming
    data.root and ``shown`` (``too_big``: what is wrong when it is longer; ``fix``: what to do). The kind is
    checked before opening: opening a FIFO would block until something writes to it."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DatasetError(f"data.root: {shown} is not a regular file (a device or a pipe?); {fix}")
        with open(path, "rb") as fh:
            data = fh.read(budget + 1)
    except OSError as exc:
        raise DatasetError(f"data.root: {shown} cannot be read ({exc.strerror or exc}); {fix}") from None
    if len(data) > budget:
        raise DatasetError(f"data.root: {too_big}; {fix}")
    return data


def _read_text_file(path: Path, budget: int) -> bytes:
    return read_bounded(path, budget, str(path), f"the text is over {MAX_TEXT_BYTES >> 20} MiB (at {path})",
                        "use a smaller corpus")


def read_text_files(root: str | None) -> tuple[list[tuple[str, bytes]], str]:
    """``(name, bytes)`` of the ``text`` dataset's files in order, and the root's absolute path."""
    if root is None:
        raise DatasetError("data.root: dataset text needs data.root: a UTF-8 text file or a folder of .txt files")
    path = Path(os.path.expanduser(root))
    if not path.exists():
        raise DatasetError(f"data.root: {root} does not exist; point it at a UTF-8 text file or a folder of "
                           ".txt files")
    if not path.is_dir():
        return [(path.name, _read_text_file(path, MAX_TEXT_BYTES))], str(path.resolve())
    names = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.endswith(".txt") and entry.is_file():
                names.append(entry.name)
                if len(names) > MAX_FILES:
                    raise DatasetError(f"data.root: {root} holds over {MAX_FILES} .txt files; "
                                       "join them into fewer files")
    if not names:
        raise DatasetError(f"data.root: {root} holds no .txt files (sub-folders are not read); put UTF-8 "
                           ".txt files in it or point data.root at one file")
    parts, left = [], MAX_TEXT_BYTES
    for name in sorted(names):
        data = _read_text_file(path / name, left)
        parts.append((name, data))
        left -= len(data)
    return parts, str(path.resolve())


# ------------------------------------------------------------------------------------------------
# tokens, split, datasets


def _tokens(parts: list[tuple[str, bytes]], raw: bytes, kind: str, where: str) -> tuple[torch.Tensor, Tokenizer]:
    """The joined text ``raw`` as int32 tokens, and the tokenizer; under char every file must be UTF-8."""
    if kind == "byte":
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return data.to(torch.int32), Tokenizer("byte")
    texts = []
    for name, data in parts:       # each file on its own, so that the message names the file and its offset
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"data.root: {where}{name} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                               "re-encode it as UTF-8 or use data.tokenizer=byte") from None
    codes = code_points("\n".join(texts))     # the files decoded once: their join is ``raw`` decoded
    tokenizer = char_tokenizer(codes)
    return ids_of(codes, tokenizer.chars, "data.root"), tokenizer


def language_model_datasets(name: str, parts: list[tuple[str, bytes]], tokenizer: str, block_size: int,
                            source: dict, where: str = "") -> tuple[Dataset, Dataset, DatasetInfo]:
    """(train windows, validation windows, info) of the corpus ``parts`` (``(file name, bytes)``, any
    order): joined, tokenized, split. ``source`` goes into the corpus record (where it was read);
    ``where`` prefixes file names in messages (their folder or archive)."""
    kind = check_kind(tokenizer)
    positive_int("data.block_size", block_size)
    if block_size > MAX_BLOCK_SIZE:
        raise DatasetError(f"data.block_size: must be at most {MAX_BLOCK_SIZE}, got {block_size}")
    parts = sorted(parts)
    raw = b"\n".join(data for _, data in parts)
    tokens, tok = _tokens(parts, raw, kind, where)
    n_train = int(len(tokens) * TRAIN_FRACTION)
    train, val = tokens[:n_train], tokens[n_train:]
    for split, held in (("training", train), ("validation", val)):
        if len(held) < block_size + 1:
            raise DatasetError(f"data.root: the text is too short for data.block_size={block_size}: its {split} "
                               f"split has {len(held)} tokens and one block needs {block_size + 1}; give a longer "
                               "text or a smaller data.block_size")
    corpus = {"name": name, **source, "files": [n for n, _ in parts], "sha256": hashlib.sha256(raw).hexdigest(),
              "bytes": len(raw), "characters": len(tokens) if kind == "char" else _characters(raw), "tokens": len(tokens),
              "train_tokens": len(train), "val_tokens": len(val), "split": SPLIT_RULE}
    train_ds, val_ds = TokenWindows(train, block_size, 1), TokenWindows(val, block_size, block_size)
    info = DatasetInfo(name, num_classes=tok.vocab_size, in_channels=1, image_size=block_size,
                       train_size=len(train_ds), test_size=len(val_ds), task="language_model",
                       vocab_size=tok.vocab_size, block_size=block_size, tokenizer=tok.record(), corpus=corpus)
    return train_ds, val_ds, info


def _characters(raw: bytes) -> int | None:
    """How many characters the joined text has; None when it is not UTF-8 (fine under the byte tokenizer)."""
    try:
        return len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


@register_dataset("text", task="language_model")
def text(root: str | None, *, augment: bool, download: bool, seed: int, tokenizer: str = "char",
         block_size: int = DEFAULT_BLOCK_SIZE):
    """Your own text for language models: data.root a UTF-8 file or a folder of .txt files; char or byte tokens."""
    del augment, download, seed     # nothing to augment or download; the split is fixed
    check_kind(tokenizer)           # before reading: a typo costs nothing
    parts, where = read_text_files(root)
    folder = where if Path(where).is_dir() else str(Path(where).parent)
    return language_model_datasets("text", parts, tokenizer, block_size, {"root": where}, folder + os.sep)
