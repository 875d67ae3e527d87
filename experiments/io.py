"""Reading state_dicts safely and writing files atomically.

Checkpoints are loaded with ``torch.load(weights_only=True)``: a pickle that would run code, or that
holds anything but tensors and plain containers, is refused. Everything nmtrain writes goes to a
temporary file in the destination's directory first and is renamed over the destination only once
complete, so an interrupted run never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ExperimentError


class CheckpointError(ExperimentError):
    """An input file that is missing, unreadable or not what the command needs; one-line message."""


def _first_line(exc: BaseException) -> str:
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
            raise CheckpointError(f"{field}: {path} is not a readable PyTorch file ({_first_line(ValueError(tail))}; "
                                  "refused by weights-only loading)") from None
        raise CheckpointError(f"{field}: {path} is not a readable PyTorch file ({_first_line(exc)})") from None


def load_state_dict(path: str | os.PathLike, field: str = "INPUT") -> dict[str, torch.Tensor]:
    """A flat ``{name: Tensor}`` state_dict from a ``.pt`` file, or from a run directory's ``model.pt``."""
    from .rundir import MODEL, RunDir     # here: rundir builds on this module

    path = Path(path)
    if path.is_dir():
        if not RunDir(path).model.is_file():
            raise CheckpointError(f"{field}: {path} is a directory without {MODEL}; pass a state_dict file "
                                  "or a finished run directory")
        path = RunDir(path).model
    if not path.is_file():
        raise CheckpointError(f"{field}: {path} does not exist")
    obj = safe_load(path, field)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{field}: {path} holds a {type(obj).__name__}, not a state_dict of named tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{field}: {path} is not a plain tensor state_dict "
                                  f"(entry {key!r} holds a {type(value).__name__})")
    return dict(obj)


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, then rename the finished file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_text(text: str, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)
