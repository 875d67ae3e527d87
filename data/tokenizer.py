"""Text to token ids and back: the two tokenizers of the text datasets, and their JSON record.

- ``char``: one token per Unicode character. The vocabulary is the sorted set of the characters of the
  whole corpus text, training and validation splits together, as nanoGPT's shakespeare_char builds it:
  every validation character then has an id (no unknown token is needed), at the price that which
  characters occur, though not how often, is read from the validation text too. Ids follow code-point order.
- ``byte``: one token per UTF-8 byte, 256 symbols, the same for every text: any bytes train, valid
  UTF-8 or not, and any prompt encodes.

A tokenizer's record (``{"kind": "char", "chars": "<the vocabulary in id order>"}`` or ``{"kind":
"byte"}``) is what `DatasetInfo.tokenizer` holds and a run saves as tokenizer.json; `from_record`
rebuilds the tokenizer from it, checking it, since a run directory is input like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import DatasetError

TOKENIZERS = ("char", "byte")
MAX_VOCAB = 1 << 20     # a char vocabulary can hold at most every Unicode code point (0x110000 of them)


def check_kind(kind: object) -> str:
    """``kind`` when it is one of `TOKENIZERS`; else a one-line DatasetError naming data.tokenizer."""
    if kind not in TOKENIZERS:
        raise DatasetError(f"data.tokenizer: {kind!r} is unknown; use char (one token per character, the "
                           "vocabulary from the text) or byte (256 symbols, any text)")
    return kind  # type: ignore[return-value]


def code_points(text: str) -> torch.Tensor:
    """The Unicode code points of ``text`` as an int32 tensor (through UTF-32: no Python loop over 5M characters)."""
    raw = bytearray(text.encode("utf-32-le"))
    return torch.frombuffer(raw, dtype=torch.int32) if raw else torch.zeros(0, dtype=torch.int32)


@dataclass(frozen=True)
class Tokenizer:
    """``kind`` char (``chars``: the vocabulary in id order) or byte (``chars`` empty)."""
    kind: str
    chars: str = ""

    @property
    def vocab_size(self) -> int:
        return 256 if self.kind == "byte" else len(self.chars)

    def record(self) -> dict:
        return {"kind": "byte"} if self.kind == "byte" else {"kind": "char", "chars": self.chars}

    def encode(self, text: str, field: str = "--prompt") -> torch.Tensor:
        """``text`` as a 1-D long tensor of ids; a character outside a char vocabulary is a one-line
        DatasetError naming ``field`` (the caller's input: a prompt, say)."""
        try:
            raw = bytearray(text.encode("utf-8"))
        except UnicodeEncodeError as exc:       # a lone surrogate (a command line's undecodable byte)
            raise DatasetError(f"{field}: not valid text ({exc.reason} at character {exc.start})") from None
        if self.kind == "byte":
            return torch.frombuffer(raw, dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
        return ids_of(code_points(text), self.chars, field).long()

    def decode(self, ids) -> str:
        """The text of ``ids`` (a sequence or 1-D tensor); bytes that are not UTF-8 become U+FFFD."""
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)


def ids_of(codes: torch.Tensor, chars: str, field: str) -> torch.Tensor:
    """The id of every code point of ``codes`` in the sorted vocabulary ``chars`` (int32)."""
    vocab = code_points(chars)
    if codes.numel() == 0:
        return torch.zeros(0, dtype=torch.int32)
    ids = torch.searchsorted(vocab, codes).clamp_(max=max(len(chars) - 1, 0))
    missing = vocab[ids] != codes if len(chars) else torch.ones_like(codes, dtype=torch.bool)
    if bool(missing.any()):
        first = chr(int(codes[missing.nonzero()[0, 0]]))
        raise DatasetError(f"{field}: the character {first!r} is not in the vocabulary of the run's char tokenizer; "
                           "use characters of its training text")
    return ids.to(torch.int32)


def char_tokenizer(codes: torch.Tensor) -> Tokenizer:
    """The char tokenizer of a corpus given as code points: its vocabulary is their sorted set."""
    vocab = torch.unique(codes, sorted=True)
    return Tokenizer("char", "".join(map(chr, vocab.tolist())))


def from_record(record: object, where: str = "tokenizer.json") -> Tokenizer:
    """The tokenizer a record describes (a run's tokenizer.json, read back); anything else is a one-line
    DatasetError naming ``where``."""
    if not isinstance(record, dict) or record.get("kind") not in TOKENIZERS:
        raise DatasetError(f"{where}: not a tokenizer record ({{\"kind\": \"char\" or \"byte\", ...}}); "
                           "use the file the run wrote")
    if record["kind"] == "byte":
        return Tokenizer("byte")
    chars = record.get("chars")
    if (not isinstance(chars, str) or not 1 <= len(chars) <= MAX_VOCAB
            or list(chars) != sorted(set(chars))):
        raise DatasetError(f"{where}: a char tokenizer's \"chars\" must be its vocabulary, distinct characters in "
                           "code-point order; use the file the run wrote")
    return Tokenizer("char", chars)
