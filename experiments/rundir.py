"""The run directory: what `nmtrain train` and `nmtrain adaprune` write, and the rules for reusing one.

One place names every file of a run and every key of a checkpoint, so the runner, AdaPrune,
compare, convert and the CLI agree on them by construction::

    DIR/config.yaml      the resolved spec (every default filled in)
    DIR/metrics.jsonl    one JSON line per eval
    DIR/checkpoint.pt    a `Checkpoint` (the run's `Counters` in it): everything a resumed run needs
    DIR/model.pt         the final state_dict with masks folded in
    DIR/summary.json     what the run did (a training run's is a `Summary`); written last, so its
                         presence means "finished"
    DIR/tokenizer.json   a language-model run's tokenizer record ({"kind": "char", "chars": ...} or
                         {"kind": "byte"}), written at run start: `nmtrain sample` reads it

Every file is written to a temporary name and renamed (`io.atomic_write`), so a killed run never
leaves half a file. The rules for an output directory: a directory holding a run (a checkpoint, a
model or a summary) is refused unless ``--overwrite`` (which removes the run files, and only those) or
``--resume`` (which needs a checkpoint there); the two flags together are refused. A writer holds the
directory (`RunDir.writing`, `RunDir.holding`): a second writer is refused, and a new run that fails
before its first checkpoint removes what it wrote, so a directory holds a resumable run or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .errors import ExperimentError
from .io import (CheckpointError, check_output_dir, check_output_file, load_state_dict, make_dirs, read_json_file,
                 remove_dirs, safe_load, save_state_dict, save_text)

try:
    import fcntl
except ImportError:         # Windows
    fcntl = None

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
SUMMARY = "summary.json"
TOKENIZER = "tokenizer.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, MODEL, SUMMARY, TOKENIZER)
PROGRESS_FILES = (CHECKPOINT, MODEL, SUMMARY)     # a run with one of these has something to resume or keep


class RunError(ExperimentError):
    """The run cannot start or continue (bad output directory, diverged loss); one-line message."""


@dataclass
class Checkpoint:
    """A training checkpoint. The field names are the keys of the saved dict, in the order they are
    saved, so checkpoints written before this class existed load unchanged."""
    model: dict                 # the model's state_dict
    optimizer: dict             # optimizer.state_dict()
    scheduler: dict             # scheduler.state_dict()
    method: dict                # the sparse method's state (masks, and whatever else it keeps)
    step: int                   # steps done; the data position is this step's place in its epoch
    epoch: int = 0              # step // steps_per_epoch, for a reader
    run: dict = field(default_factory=dict)   # the run's counters so far: `Counters.to_dict()`
    rng: dict = field(default_factory=dict)   # torch, python, python_gauss, cuda

    REQUIRED = ("model", "optimizer", "scheduler", "method", "step", "rng")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, obj: dict) -> "Checkpoint":
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})

    def counters(self) -> "Counters":
        return Counters.from_dict(self.run)


@dataclass
class Counters:
    """The run's counters at a checkpoint, saved as its ``run`` dict: the field names are the keys. Older
    checkpoints lack some (the oldest all): a missing key reads as the default, and None means the
    runner starts that counter afresh."""
    best: float = -1.0                  # the best eval of the task's best_metric so far (accuracy, val_loss)
    running_loss: float = 0.0           # train loss summed since the last eval, over running_n targets
    running_n: int = 0
    wall: float = 0.0                   # seconds trained so far
    metrics_lines: int | None = None    # lines of metrics.jsonl that belong to this checkpoint (None: all)
    flops: dict[str, int] = field(default_factory=dict)   # FlopCounter's totals by attribute (empty: from 0)
    last_masks: dict | None = None      # the masks at the last eval (None: the method's current masks)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, run: dict) -> "Counters":
        """The counters a checkpoint's ``run`` dict holds; a value of the wrong type raises ValueError,
        TypeError or AttributeError (the caller names the checkpoint)."""
        keys = run.keys()           # not a mapping: AttributeError
        return cls(**{name: read(run[name]) for name, read in _COUNTER_READERS.items() if name in keys})


# How each saved counter is read back: the cast the file's plain values need.
_COUNTER_READERS = {
    "best": float, "running_loss": float, "running_n": int, "wall": float, "metrics_lines": int,
    "flops": lambda flops: {key: int(value) for key, value in flops.items()},
    "last_masks": lambda masks: dict(masks.items()),
}


@dataclass
class Summary:
    """summary.json of a training run: the field names are its keys, in the order written (compare,
    convert and the CLI read them back from the file as a plain dict), with the task's keys
    (``results``) after ``builder``, then the method's own, ``processes``, ``task`` and ``corpus``."""
    name: str
    method: str
    method_params: dict
    pattern: str | None                 # None exactly for a method that masks nothing
    density: float
    model: str
    dataset: str
    seed: int
    device: str
    builder: dict                       # models.builder_record: model.name, its source, its arguments
    eval_split: str
    epochs: float
    steps: int
    wall_seconds: float
    sparse_layers: dict                 # weight name -> pattern, density, transposable, layout
    skipped_layers: dict                # layer name -> why it stayed dense
    train_flops: dict
    accel: dict
    # The task's keys (tasks/*.py summary_fields): final_accuracy, best_accuracy, final_test_loss of an
    # image classifier; final_val_loss, final_perplexity, final_bpc, best_val_loss of a language model.
    results: dict = field(default_factory=dict)
    method_fields: dict = field(default_factory=dict)   # the method's own (summary_fields), after these
    processes: int | None = None        # a multi-process run's process count; absent from a single process's
    task: str | None = None             # the run's task (tasks/); absent when None
    corpus: dict | None = None          # a language model's corpus record (DatasetInfo.corpus); absent when None

    _HEAD = ("name", "method", "method_params", "pattern", "density", "model", "dataset", "seed", "device", "builder")
    _TAIL = ("eval_split", "epochs", "steps", "wall_seconds", "sparse_layers", "skipped_layers", "train_flops", "accel")

    def to_dict(self) -> dict:
        summary = {name: getattr(self, name) for name in self._HEAD}
        summary.update(self.results)
        summary.update({name: getattr(self, name) for name in self._TAIL})
        summary.update(self.method_fields)
        for name in ("processes", "task", "corpus"):
            if getattr(self, name) is not None:
                summary[name] = getattr(self, name)
        return summary


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)            # closing the descriptor drops its flock


def check_flags(overwrite: bool, resume: bool) -> None:
    """``--resume`` continues the run in a directory and ``--overwrite`` replaces it: never both."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite: choose one (resume continues the run, overwrite replaces it)")


class RunDir:
    """A run directory at ``path``; the properties are the paths of its files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    # -- the rules for an output directory ---------------------------------------------------------

    def check_target(self, overwrite: bool, resume: bool = False) -> None:
        """Refuse a directory that already holds a run, unless ``overwrite``; with ``resume`` the run
        is meant to be there (`load_checkpoint` then says when its checkpoint is not). Every run file's
        path is checked as an output (a directory or a device there is never replaced), and a directory
        another nmtrain process is writing is refused whatever the flags."""
        check_flags(overwrite, resume)
        field = "--resume" if resume else "--out"
        check_output_dir(self.path, field)
        for name in RUN_FILES:                  # a resumed run rewrites them too
            check_output_file(self.path / name, field)
        if resume:
            return
        present = [f for f in RUN_FILES if (self.path / f).exists()]
        if present:
            _unlock(self._lock())       # refused here, with _lock's message, while another process holds it
        # A run that stopped before its first checkpoint (killed, or a crash before its cleanup) left only
        # config.yaml / metrics.jsonl: nothing to resume and nothing finished, so a new run replaces it.
        if any(f in PROGRESS_FILES for f in present) and not overwrite:
            raise RunError(f"--out: {self.path} already holds a run ({', '.join(present)}); choose another --out "
                           "or pass --overwrite")

    # -- holding the directory while writing -------------------------------------------------------
    # An advisory lock (flock) on the directory itself, held by the one process that writes: a second
    # writer is refused, and the kernel drops the lock when the holder dies, even by SIGKILL.

    def _lock(self) -> int | None:
        if fcntl is None:               # no flock (Windows): no protection against a second writer
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"--out: {self.path} is in use by another nmtrain process; wait for it to end or "
                           "choose another --out") from None
        return fd

    @contextlib.contextmanager
    def holding(self):
        """Hold the directory of an existing run (``--resume``) while it is written."""
        fd = self._lock()
        try:
            self.remove_stale_tmp()
            yield self
        finally:
            _unlock(fd)

    @contextlib.contextmanager
    def writing(self):
        """Create the directory of a new run (after `check_target` allowed it) and hold it; the previous
        run files go first. If the block fails before a checkpoint exists, everything it wrote is removed,
        and the directory too when this created it: the directory then holds a resumable run or nothing."""
        created = make_dirs(self.path, "--out")
        try:
            with self.holding():
                self._remove_run_files()
                yield self
        except BaseException:
            if not self.checkpoint.is_file():
                self._remove_run_files()
                self.remove_stale_tmp()
                remove_dirs(created)
            raise

    def _remove_run_files(self) -> None:
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)

    def remove_stale_tmp(self) -> None:
        """Temporary files left by a write that a kill interrupted."""
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def is_finished(self) -> bool:
        """A finished run: summary.json (written last) and config.yaml are there."""
        return self.summary.is_file() and self.config.is_file()

    # -- reading and writing -----------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        save_text(text, self.config, "--out")

    def read_metrics(self, field: str = "--resume") -> list[dict]:
        """The records of metrics.jsonl, one per eval ([] when there is none)."""
        return read_json_file(self.metrics, field, lines=True) if os.path.lexists(self.metrics) else []

    def write_metrics(self, records: list[dict]) -> None:
        """All records so far, one JSON line each, rewritten at once: a resumed run drops the lines past
        its checkpoint."""
        save_text("".join(json.dumps(r) + "\n" for r in records), self.metrics, "--out")

    def write_model(self, state: dict[str, torch.Tensor]) -> None:
        save_state_dict(state, self.model, "--out")

    def write_summary(self, summary: dict) -> None:
        """``summary``: a `Summary`'s dict, or AdaPrune's (experiments/adaprune.py)."""
        save_text(json.dumps(summary, indent=2) + "\n", self.summary, "--out")

    def write_tokenizer(self, record: dict) -> None:
        save_text(json.dumps(record, indent=2) + "\n", self.tokenizer, "--out")

    def read_summary(self, field: str = "SOURCE") -> dict:
        return read_json_file(self.summary, field)

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        save_checkpoint(self.checkpoint, ckpt)

    def load_checkpoint(self, field: str = "--resume") -> Checkpoint:
        return load_checkpoint(self.checkpoint, field)


# -- "a state_dict file or a run directory" ----------------------------------------------------------
# prune, adaprune, convert and model.init take either; a run directory's weights are its model.pt.


def weights_path(path: str | os.PathLike) -> Path:
    """Where the weights that ``path`` names lie: the file itself, or a run directory's model.pt."""
    path = Path(path)
    return RunDir(path).model if path.is_dir() else path


def load_weights(path: str | os.PathLike, field: str = "INPUT") -> dict[str, torch.Tensor]:
    """The state_dict of a ``.pt`` file or of a finished run directory (`io.load_state_dict`'s checks)."""
    path = Path(path)
    weights = weights_path(path)
    if path.is_dir() and not weights.is_file():
        raise CheckpointError(f"{field}: {path} is a directory without {MODEL}; pass a state_dict file "
                              "or a finished run directory")
    return load_state_dict(weights, field)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    save_state_dict(ckpt.to_dict(), path, "--out")      # torch.save of plain containers and tensors


def load_checkpoint(path: Path, field: str = "--resume") -> Checkpoint:
    """A training checkpoint, loaded weights-only (a pickle that would run code is refused)."""
    if not path.is_file():
        raise CheckpointError(f"{field}: {path} does not exist; there is no checkpoint to resume from")
    obj = safe_load(path, field)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{field}: {path} holds a {type(obj).__name__}, not an nmtrain checkpoint")
    missing = [k for k in Checkpoint.REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{field}: {path} is not an nmtrain training checkpoint (missing {', '.join(missing)})")
    if isinstance(obj["step"], bool) or not isinstance(obj["step"], int) or obj["step"] < 0:
        raise CheckpointError(f"{field}: {path} has step {obj['step']!r}, not a non-negative integer")
    return Checkpoint.from_dict(obj)
