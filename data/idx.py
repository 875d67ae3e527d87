"""A reader for gzip-compressed IDX files, the format of (Fashion-)MNIST.

An IDX file is a big-endian header followed by raw values::

    magic: 0x00 0x00 <dtype code> <ndim>     (4 bytes; images are 0x00000803, labels 0x00000801)
    dims:  ndim x uint32                     (e.g. 60000, 28, 28)
    data:  prod(dims) values                 (dtype code 0x08 = unsigned byte, the only one used here)

The file is read whole (gzip), the header checked, and the payload wrapped with ``torch.frombuffer``
without a copy. A missing, non-gzip, truncated or otherwise inconsistent file is a one-line
`DatasetError` that names the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import torch

from .registry import DatasetError

UBYTE = 0x08
IMAGES_MAGIC = 0x00000803   # ubyte, 3 dims
LABELS_MAGIC = 0x00000801   # ubyte, 1 dim
MAX_IDX_BYTES = 1 << 30     # uncompressed; Fashion-MNIST's train images are 47 MB


def read_idx(path: str | os.PathLike, magic: int | None = None, field: str = "data.root") -> torch.Tensor:
    """The uint8 tensor stored in the gzip IDX file ``path``; ``magic`` is checked when given."""
    path = os.fspath(path)
    try:
        with gzip.open(path, "rb") as fh:
            # Bounded: a small gzip can expand to any size ("gzip bomb"); read one byte past the cap to tell.
            raw = bytearray(fh.read(MAX_IDX_BYTES + 1))  # writable: torch.frombuffer shares it without a warning
    except FileNotFoundError:
        raise DatasetError(f"{field}: {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut stream is EOFError
        raise DatasetError(f"{field}: {path} is not a complete gzip file ({exc}); "
                           "the file is corrupt or truncated, replace it") from None

    if len(raw) > MAX_IDX_BYTES:
        raise DatasetError(f"{field}: {path} expands to more than {MAX_IDX_BYTES >> 20} MiB, the most an IDX file "
                           "is read to (EMNIST's largest is 640 MB); it is not a dataset file")
    if len(raw) < 4:
        raise DatasetError(f"{field}: {path} is truncated: {len(raw)} bytes, shorter than the IDX header")
    found_magic = struct.unpack(">I", raw[:4])[0]
    zero, dtype_code, ndim = found_magic >> 16, (found_magic >> 8) & 0xFF, found_magic & 0xFF
    if zero != 0 or dtype_code != UBYTE or ndim == 0 or (magic is not None and found_magic != magic):
        want = f"0x{magic:08x}" if magic is not None else "an unsigned-byte IDX header"
        raise DatasetError(f"{field}: {path} has magic number 0x{found_magic:08x}, expected {want}; "
                           "it is not the IDX file its name says")

    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{field}: {path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    if len(raw) - header != count:
        raise DatasetError(f"{field}: {path} holds {len(raw) - header} data bytes but its header "
                           f"announces {'x'.join(map(str, dims))} = {count}; the file is truncated or corrupt")
    if count == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(raw, dtype=torch.uint8, count=count, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, tensor: torch.Tensor) -> None:
    """Write a uint8 tensor as a gzip IDX file (the inverse of `read_idx`; used by the tests)."""
    values = tensor.to(torch.uint8).contiguous()
    header = struct.pack(">I", (UBYTE << 8) | values.dim()) + struct.pack(f">{values.dim()}I", *values.shape)
    with gzip.open(os.fspath(path), "wb") as fh:
        fh.write(header + values.numpy().tobytes())
