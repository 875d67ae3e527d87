"""Reading state_dicts safely and writing files atomically.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a pickle that would run code, or that
holds anything but tensors and plain containers, is refused. Everything nmtrain writes goes to a
temporary file in the destination's directory first and is renamed over the destination only once
complete, so an interrupted run never leaves a half-written file in place of a good one; and only a
regular file is ever replaced (see "output targets" below).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import ExperimentError


class CheckpointError(ExperimentError):
    """An input file that is missing, unreadable or not what the command needs; one-line message."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def safe_load(path: Path, field: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or unsafe files raise many types
        text = str(exc)
        if "Unsupported global" in text or "unsupported GLOBAL" in text:
            raise CheckpointError(f"{field}: {path} holds Python objects beyond tensors; refused by "
                                  "weights-only loading (nmtrain never unpickles code)") from None
        if "Weights only load failed" in text:    # not a torch.save zip file: raw bytes or a bare pickle
            tail = text.split("WeightsUnpickler error:", 1)[-1].split("trusted source.", 1)[-1]
            raise CheckpointError(f"{field}: {path} is not a readable PyTorch file ({first_line(ValueError(tail))}; "
                                  "refused by weights-only loading)") from None
        raise CheckpointError(f"{field}: {path} is not a readable PyTorch file ({first_line(exc)})") from None


def _require_file(path: Path, field: str) -> None:
    """An input that must be a regular file: one that is missing, or a FIFO or directory, is named for what it is."""
    if not path.is_file():
        raise CheckpointError(f"{field}: {path} " + (f"is {what_is(path)}, not a file" if path.exists()
                                                    else "does not exist"))


def load_state_dict(path: str | os.PathLike, field: str = "INPUT") -> dict[str, torch.Tensor]:
    """A flat ``{name: Tensor}`` state_dict from a ``.pt`` file (a run directory's is `rundir.load_weights`)."""
    path = Path(path)
    _require_file(path, field)
    obj = safe_load(path, field)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{field}: {path} holds a {type(obj).__name__}, not a state_dict of named tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{field}: {path} is not a plain tensor state_dict "
                                  f"(entry {key!r} holds a {type(value).__name__})")
    return dict(obj)


# The run directory's JSON files are read back (resume, compare --reuse, convert): bounded, text, and the
# shape nmtrain writes, or one CheckpointError naming the file. The bounds are far above what a run writes
# (a ResNet-50 summary is ~60 KB; a metrics line per eval), and below what would exhaust memory.
MAX_JSON_BYTES = 64 << 20


def read_json_file(path: Path, field: str, lines: bool = False) -> Any:
    """The JSON object in ``path`` or, with ``lines``, the list of JSON objects one per line (JSON Lines)."""
    _require_file(path, field)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{field}: {path} holds {path.stat().st_size} bytes, more than nmtrain writes there "
                              f"(at most {MAX_JSON_BYTES >> 20} MiB read); it is not a run file of nmtrain")
    try:
        text = path.read_bytes().decode("utf-8")
        objects = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else [json.loads(text)]
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{field}: {path} is not the JSON nmtrain writes ({first_line(exc)})") from None
    bad = next((i for i, obj in enumerate(objects) if not isinstance(obj, dict)), None)
    if bad is not None:
        where = f"line {bad + 1} holds" if lines else "holds"
        raise CheckpointError(f"{field}: {path} {where} a {type(objects[bad]).__name__}, not a JSON object")
    return objects if lines else objects[0]


def state_dict_mismatch(model: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """The first difference between a model's state_dict and ``given`` (a missing, extra or differently
    shaped entry), in words; None when ``given`` loads into the model strictly."""
    for key, value in model.items():
        if key not in given:
            return f"{key} is missing from the file"
        if tuple(given[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(given[key].shape)} in the file, {tuple(value.shape)} in the model"
    extra = next((key for key in given if key not in model), None)
    return None if extra is None else f"the file has {extra}, which the model does not"


# -- output targets -------------------------------------------------------------------------------
# One mechanism for every file nmtrain writes: `check_output_file` / `check_output_dir` say before any
# work whether a path can take the output (commands call them on their options first), and
# `atomic_write` applies the same check again at write time, writes a temp file in the destination's
# directory, gives it the mode a plain open() would, and renames it over the destination. A failure
# (full disk, read-only directory) becomes one OutputError naming the path and the cause, with the temp
# file and any directory the write created removed and an existing file at the path untouched.


class OutputError(ExperimentError):
    """An output path nmtrain cannot or must not write; one-line message naming the path and the fix."""


# What sits at a path, in words. An output file replaces only a regular file: replacing anything else
# would turn a device node, a FIFO or a socket into a regular file (as root on /dev/null that breaks
# the machine).
_NOT_A_FILE = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"))


def what_is(path: str | os.PathLike) -> str:
    """What sits at ``path`` (following symlinks), e.g. ``a FIFO (named pipe)``."""
    mode = os.stat(path).st_mode
    return next((name for test, name in _NOT_A_FILE if test(mode)), "an unknown kind of file")


def _existing_ancestor(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, field: str, target: Path) -> None:
    """The directory that will hold ``target`` (or its first existing ancestor, where the rest is to be
    created) must be a directory this process may create files in."""
    anchor = _existing_ancestor(directory)
    if not anchor.is_dir():
        raise OutputError(f"{field}: {target}: {anchor} is {what_is(anchor)}, not a directory; "
                          "give a path under a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_fs(anchor) else "permission denied"
        raise OutputError(f"{field}: {target}: cannot write in {anchor} ({why}); choose another path")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_file(path: str | os.PathLike, field: str) -> Path:
    """Refuse an output file path that is anything but a regular file or nothing (a directory, device,
    FIFO, socket), or that lies in a directory nobody can write; returns the path to write (a symlink's
    target, as open() would write through it)."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if os.path.exists(real) and not os.path.isfile(real):
        shown = path if real == path.absolute() else f"{path} (-> {real})"
        raise OutputError(f"{field}: {shown} is {what_is(real)}; nmtrain writes only regular files: give a file path")
    _check_writable_dir(real.parent, field, path)
    return real


def check_output_dir(path: str | os.PathLike, field: str) -> Path:
    """Refuse an output directory path that exists as anything but a directory, or that cannot be
    created or written in."""
    path = Path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{field}: {path} is {what_is(path)}, not a directory; "
                          "give a directory path")
    _check_writable_dir(path, field, path)
    return path


def make_dirs(path: Path, field: str) -> list[Path]:
    """``mkdir -p path``; returns the directories it created (deepest last), for a failed write to remove."""
    created = []
    for parent in reversed([path, *path.parents]):
        if not os.path.lexists(parent):
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                remove_dirs(created)
                raise write_error(field, path, exc) from None
            created.append(parent)
    return created


def remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()                   # only when empty: never anything another writer put there
        except OSError:
            break


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch and safetensors wrap the one their writer hit)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def write_error(field: str, path: Path, exc: OSError) -> OutputError:
    """One line for a failed write: the path and the cause in words (no space left, permission denied)."""
    cause = (exc.strerror or str(exc)).lower() if exc.errno else str(exc)
    return OutputError(f"{field}: cannot write {path}: {cause}; nothing was written")


def _new_file_mode(real: Path) -> int:
    """What a plain open() gives: an existing file keeps its mode, a new one gets 0o666 less the umask."""
    if os.path.exists(real):
        return stat.S_IMODE(os.stat(real).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], field: str = "output") -> None:
    """Call ``write(fh)`` with a binary file open on a temp file beside ``path``, then rename it onto
    ``path``; the target is checked first, and a failure leaves nothing behind."""
    real = check_output_file(path, field)
    created = make_dirs(real.parent, field)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        remove_dirs(created)
        raise write_error(field, Path(path), exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(real))
        os.replace(tmp, real)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        remove_dirs(created)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise write_error(field, Path(path), cause) from None
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, field: str = "output") -> None:
    atomic_write(path, lambda fh: torch.save(state, fh), field)


def save_text(text: str, path: str | os.PathLike, field: str = "output") -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), field)
