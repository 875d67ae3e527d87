"""Converting N:M models between masked-dense state_dicts, a compressed safetensors file, and
PyTorch's semi-structured (2:4 sparse tensor core) tensors.

**Compressed format** (one ``.safetensors`` file). Per N:M layer ``NAME`` (seen as the GEMM operand
``C_out x K`` under its layout, see ``sparsity/layout.py``):

- ``NAME::values``  ``C_out x K*N/M``, the weight's dtype: the N kept values of every group of M along K,
  in ascending position order;
- ``NAME::indices`` ``C_out x K*N/M``, uint8: each value's position inside its group (0..M-1). This is
  the metadata sparse tensor cores use for 2:4 (there packed as 2-bit indices), one byte per index
  and generalised to any N:M with M <= 256.

Groups holding fewer than N non-zeros store zeros in the free slots (their positions are recorded
too), so every group has exactly N entries and ``--to dense`` rebuilds the tensor exactly. Every other
tensor is stored as it is under its own name. The header metadata key ``nmtrain`` holds JSON:
format/version, the original key order, and per N:M layer its pattern, layout, shape and dtype.
Reading trusts none of it: every size is checked against what the file stores before anything is
allocated, and only the canonical form the writer produces is read (see "Reading compressed files").

Round trip: ``dense -> compressed -> dense`` returns the same tensors bit for bit, with one documented
exception: a pruned entry holding ``-0.0`` comes back as ``+0.0`` (the two compare equal; nmtrain's
own writers store ``+0.0``). Where a group has room, zeros with the sign bit set are kept as stored
values, so they survive too; the count of canonicalised ``-0.0`` is reported.

**Imports.** A state_dict from ``torch.nn.utils.prune`` (``X.weight_orig`` + ``X.weight_mask``) or with
mask buffers beside the weight (``X.weight`` + ``X.weight_mask``, ``X.mask``, or apex ASP's
``X.__weight_mma_mask``) is turned into nmtrain's form: ``X.weight = W * mask`` (pruned entries +0.0)
and the mask entries dropped.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..sparsity import (LAYOUTS, Pattern, PatternError, fold_mask, from_matrix, nm_violation, parse_pattern,
                        shape_violation, to_matrix)
from .errors import ExperimentError
from .io import first_line, atomic_write, check_output_file
from .rundir import MODEL, SUMMARY, RunDir, load_weights, weights_path

FORMAT = "nmtrain-nm-compressed"
VERSION = 1
SEP = "::"
TARGETS = ("compressed", "dense", "semi-structured")
MAX_M = 256                      # in-group positions are stored as uint8


class ConvertError(ExperimentError):
    """Input `nmtrain convert` cannot use; one-line message, nothing written."""


@dataclass
class LayerFormat:
    pattern: Pattern
    layout: str = "nhwc"


@dataclass
class Loaded:
    """A source read into memory: a plain (masks folded in) state_dict and its N:M layers."""

    state: dict[str, torch.Tensor]
    layers: dict[str, LayerFormat]          # tensor name -> declared/detected pattern and layout
    kind: str                               # run | compressed | state_dict
    imported: list[str] = field(default_factory=list)   # "X.weight (torch.nn.utils.prune)", ...
    skipped: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Imports of masked state_dicts


def _mask_owner(key: str, state: dict) -> tuple[str, str, str] | None:
    """(weight key, key holding the raw weight, style) for a mask entry ``key``, or None."""
    if key.endswith("_orig"):
        return None
    if key.endswith("_mask"):
        base = key[:-len("_mask")]
        head, _, last = base.rpartition(".")
        if last.startswith("__") and last.endswith("_mma"):                # apex ASP: X.__weight_mma_mask
            name = f"{head}.{last[2:-4]}" if head else last[2:-4]
            if name in state:
                return name, name, "ASP mask buffer"
            return None
        if base + "_orig" in state:
            return base, base + "_orig", "torch.nn.utils.prune"
        if base in state:
            return base, base, "mask buffer"
    if key == "mask" or key.endswith(".mask"):
        head = key[:-len("mask")]
        if head + "weight" in state:
            return head + "weight", head + "weight", "mask buffer"
    return None


def import_masks(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fold mask entries into their weights (see the module docstring); returns (state, notes)."""
    folds: dict[str, tuple[str, str, str]] = {}
    for key in state:
        owner = _mask_owner(key, state)
        if owner is not None:
            folds[key] = owner
    if not folds:
        return dict(state), []
    drop = set(folds) | {raw for (_n, raw, _s) in folds.values() if raw.endswith("_orig")}
    new_values: dict[str, torch.Tensor] = {}
    notes = []
    for mask_key, (name, raw, style) in folds.items():
        weight, mask = state[raw], state[mask_key]
        if mask.shape != weight.shape:
            raise ConvertError(f"SOURCE: mask {mask_key} {tuple(mask.shape)} does not match {raw} {tuple(weight.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ConvertError(f"SOURCE: mask {mask_key} holds values other than 0 and 1")
        new_values[name] = fold_mask(weight, mask.bool())
        notes.append(f"{name} ({style})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in drop:
            if key.endswith("_orig") and key[:-5] in new_values:
                out[key[:-5]] = new_values[key[:-5]]      # keep the weight where its _orig was
            continue
        out[key] = new_values.get(key, value)
    return out, notes


# ------------------------------------------------------------------------------------------------
# Compressing one tensor


def _choose_slots(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m along K, the n positions to store (ascending): non-zeros, then -0.0, then +0.0."""
    groups = matrix.reshape(matrix.shape[0], -1, m)
    nonzero = (groups != 0).to(torch.int32)
    negzero = ((groups == 0) & torch.signbit(groups)).to(torch.int32)
    position = torch.arange(m, device=groups.device).expand_as(groups)
    # Higher key wins; ties broken by lower position (stable, deterministic).
    key = (nonzero * 2 + negzero) * (m + 1) + (m - position)
    return key.topk(n, dim=-1).indices.sort(dim=-1).values


def compress_tensor(weight: torch.Tensor, fmt: LayerFormat, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values, uint8 in-group indices, count of -0.0 made +0.0) of a weight that satisfies ``fmt``."""
    pattern, layout = fmt.pattern, fmt.layout
    problem = shape_violation(weight.shape, pattern, layout)
    if problem is not None:
        raise ConvertError(f"{name} {tuple(weight.shape)} cannot hold {pattern.describe()}: {problem}")
    if pattern.m > MAX_M:
        raise ConvertError(f"{name}: M={pattern.m} does not fit uint8 indices (M <= {MAX_M})")
    problem = nm_violation(weight, pattern, layout)
    if problem is not None:
        raise ConvertError(f"{name} breaks its declared pattern {pattern.describe()}: {problem}; nothing written")
    matrix = to_matrix(weight.detach(), layout).contiguous()
    rows, k = matrix.shape
    slots = _choose_slots(matrix, pattern.n, pattern.m)                       # rows x K/m x n
    groups = matrix.reshape(rows, -1, pattern.m)
    values = groups.gather(-1, slots).reshape(rows, -1).contiguous()
    stored = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, slots, True)
    lost_negzero = int((~stored & torch.signbit(groups) & (groups == 0)).sum())
    return values, slots.reshape(rows, -1).to(torch.uint8).contiguous(), lost_negzero


def decompress_tensor(values: torch.Tensor, indices: torch.Tensor, pattern: Pattern, layout: str,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """The dense weight from its N kept values and in-group positions per group of M.

    Trusts its inputs: `read_compressed` checks them against `_LAYER_CONSTRAINTS` first.
    """
    rows = shape[0]
    k = math.prod(shape) // rows
    n, m = pattern.n, pattern.m
    groups = torch.zeros(rows, k // m, m, dtype=values.dtype)
    groups.scatter_(-1, indices.to(torch.int64).reshape(rows, k // m, n), values.reshape(rows, k // m, n))
    return from_matrix(groups.reshape(rows, k), shape, layout)


# ------------------------------------------------------------------------------------------------
# Reading compressed files: nothing in them is trusted
#
# A compressed file's header says how large each dense tensor is, so a tampered one can ask for any
# size (a 402-byte file asking for 80 GB). Every size the header implies is therefore checked against
# the tensors the file really stores, and against caps, before anything is allocated; and only the
# canonical form the writer produces is read. The checks are three tables, in the style of
# sparsity/pattern.py: the container, the nmtrain metadata, each N:M layer. Each row is a named
# constraint; `_check` applies a table in order and the first failing row is the error, naming the
# file, the layer and the constraint. A row may rely on the rows above it: the shape row runs only
# once the pattern row has parsed the pattern. Shapes and dtypes come from the safetensors header;
# of the data, only a layer's indices are read (bounded by the file's size) once its header rows
# pass, and no dense tensor is allocated until every layer has passed.

MAX_HEADER_BYTES = 64 << 20      # safetensors itself stops at 100 MB; nmtrain's headers are ~200 B per tensor
MAX_METADATA_BYTES = 16 << 20    # the nmtrain JSON, part of the header
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 33           # per dense tensor: above any real weight, far below what a tampered shape asks
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors code -> torch
# Every dtype a stored tensor may have: those torch reads (safetensors knows some it does not, e.g. F6_E2M3).
READABLE_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32", "U16",
                   "U8", "BOOL", "C64")
LAYER_FIELDS = ("pattern", "layout", "shape", "dtype")


def _names(names) -> str:
    """At most three names, for a one-line message."""
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


class _Source:
    """A safetensors file as the rows see it. Each property is read when a row first asks for it, so a
    row never reads what an earlier row has not vouched for (the header is opened only once its length
    is known to be sane)."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.problem = ""            # why the last read failed, for the failing row's message
        self.fh = None

    @cached_property
    def header_length(self) -> int | None:
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(8)
        except OSError as exc:
            self.problem = exc.strerror or type(exc).__name__
            return None
        self.problem = f"{self.size} bytes, fewer than the 8 of the header length"
        return int.from_bytes(head, "little") if len(head) == 8 else None

    @cached_property
    def opened(self) -> bool:
        from safetensors import safe_open
        try:                         # safetensors checks the header's JSON and that the data covers every tensor
            self.fh = safe_open(str(self.path), framework="pt")
        except Exception as exc:     # SafetensorError, OSError, ...
            self.problem = first_line(exc)
            return False
        return True

    @cached_property
    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, safetensors dtype code) of every stored tensor, from the header alone."""
        out = {}
        for key in self.fh.keys():
            part = self.fh.get_slice(key)
            out[key] = (tuple(part.get_shape()), part.get_dtype())
        return out

    @cached_property
    def text(self) -> str | None:
        return (self.fh.metadata() or {}).get("nmtrain")

    @cached_property
    def meta(self):
        try:
            meta = json.loads(self.text)
        except (ValueError, RecursionError) as exc:     # RecursionError: "[[[[..." nested past Python's stack
            self.problem = first_line(exc)
            return None
        self.problem = f"a JSON {type(meta).__name__}"
        return meta

    @property
    def order(self):
        return self.meta.get("order")

    @property
    def layers(self):
        return self.meta.get("layers")

    def expected(self) -> set[str]:
        """The stored tensor names the metadata implies: plain entries, and each layer's two parts."""
        return ({k for k in self.order if k not in self.layers}
                | {k + SEP + part for k in self.layers for part in ("values", "indices")})


_CONTAINER_CONSTRAINTS = (
    ("8-byte header length", lambda s: s.header_length is not None,
     lambda s: f"is not a safetensors file ({s.problem})"),
    ("header length <= 64 MiB", lambda s: s.header_length <= MAX_HEADER_BYTES,
     lambda s: f"is not a safetensors file: its header length field says {s.header_length} bytes, more than the "
               f"{MAX_HEADER_BYTES} nmtrain reads"),
    ("header inside the file", lambda s: 8 + s.header_length <= s.size,
     lambda s: f"is truncated: its header needs {8 + s.header_length} bytes, the file has {s.size}"),
    ("readable safetensors", lambda s: s.opened,
     lambda s: f"is not a readable safetensors file, truncated or damaged ({s.problem})"),
    ("dtypes torch reads", lambda s: all(code in READABLE_DTYPES for _shape, code in s.stored.values()),
     lambda s: f"stores {_names(k for k, (_, code) in s.stored.items() if code not in READABLE_DTYPES)} in a dtype "
               f"nmtrain does not read; it reads {', '.join(READABLE_DTYPES)}"),
)

_METADATA_CONSTRAINTS = (
    ("metadata <= 16 MiB", lambda s: len(s.text) <= MAX_METADATA_BYTES,
     lambda s: f"has {len(s.text)} bytes of nmtrain metadata, more than the {MAX_METADATA_BYTES} nmtrain reads"),
    ("metadata is a JSON object", lambda s: isinstance(s.meta, dict),
     lambda s: f"has nmtrain metadata that is not a JSON object ({s.problem})"),
    ("known format", lambda s: s.meta.get("format") == FORMAT,
     lambda s: f"declares format {s.meta.get('format')!r}; nmtrain reads only {FORMAT!r}"),
    ("known version", lambda s: type(s.meta.get("version")) is int and s.meta["version"] == VERSION,
     lambda s: f"declares format version {s.meta.get('version')!r}; this nmtrain reads version {VERSION} "
               "(convert it to dense with the nmtrain that wrote it)"),
    ("order is a list of names", lambda s: isinstance(s.order, list) and all(isinstance(k, str) for k in s.order),
     lambda s: f"has a key order that is not a list of names ({type(s.order).__name__})"),
    ("layers is an object", lambda s: isinstance(s.layers, dict),
     lambda s: f"has a layers entry that is not a JSON object ({type(s.layers).__name__})"),
    ("no name holds '::'", lambda s: not any(SEP in k for k in s.order),
     lambda s: f"names {_names(k for k in s.order if SEP in k)} in its key order; {SEP!r} is reserved"),
    ("key order without duplicates", lambda s: len(set(s.order)) == len(s.order),
     lambda s: f"lists {_names({k for k in s.order if s.order.count(k) > 1})} more than once in its key order"),
    ("every layer in the key order", lambda s: set(s.layers) <= set(s.order),
     lambda s: f"declares layer {_names(set(s.layers) - set(s.order))}, which its key order does not list"),
    ("every named tensor stored", lambda s: s.expected() <= set(s.stored),
     lambda s: f"does not store {_names(s.expected() - set(s.stored))}, which its metadata names"),
    ("every stored tensor named", lambda s: set(s.stored) <= s.expected(),
     lambda s: f"stores {_names(set(s.stored) - s.expected())}, which its metadata does not name"),
)


class _Layer:
    """One N:M layer's metadata entry beside the two tensors the file stores for it."""

    def __init__(self, src: _Source, key: str):
        self.src, self.key, self.info = src, key, src.layers[key]
        self.values = src.stored[key + SEP + "values"]        # (shape, dtype code)
        self.indices = src.stored[key + SEP + "indices"]
        self.problem = ""

    @cached_property
    def pattern(self) -> Pattern | None:
        text = self.info["pattern"]
        if not isinstance(text, str):
            self.problem = f"pattern {text!r} is not a string such as '2:4'"
            return None
        try:
            return parse_pattern(text)
        except PatternError as exc:
            self.problem = f"pattern {text!r}: {exc}"
            return None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info["shape"])

    def shape_problem(self) -> str | None:
        return shape_violation(self.shape, self.pattern, self.info["layout"])

    @property
    def want(self) -> tuple[int, int]:
        """values/indices shape the dense shape implies: C_out x K*N/M."""
        rows = self.shape[0]
        return rows, math.prod(self.shape) // rows * self.pattern.n // self.pattern.m

    @cached_property
    def positions(self) -> torch.Tensor:
        """The stored in-group positions, rows x groups x N (int16: uint8 cannot be compared with M=256)."""
        stored = self.src.fh.get_tensor(self.key + SEP + "indices")
        return stored.to(torch.int16).reshape(self.want[0], -1, self.pattern.n)


def _is_shape(shape) -> bool:
    return (isinstance(shape, list) and 1 <= len(shape) <= MAX_DIMS
            and all(type(s) is int and 0 < s <= MAX_ELEMENTS for s in shape))


_LAYER_CONSTRAINTS = (
    ("entry has pattern, layout, shape, dtype",
     lambda c: isinstance(c.info, dict) and set(LAYER_FIELDS) <= set(c.info),
     lambda c: f"entry is not an object with {', '.join(LAYER_FIELDS)}"),
    ("pattern is N:M, N < M", lambda c: c.pattern is not None, lambda c: c.problem),
    ("M <= 256", lambda c: c.pattern.m <= MAX_M,
     lambda c: f"pattern {c.pattern} has M={c.pattern.m}; uint8 positions allow M <= {MAX_M}"),
    ("known layout", lambda c: c.info["layout"] in LAYOUTS,
     lambda c: f"layout {c.info['layout']!r} is unknown; nmtrain writes one of: {', '.join(LAYOUTS)}"),
    ("shape is positive ints", lambda c: _is_shape(c.info["shape"]),
     lambda c: f"shape {c.info['shape']!r} is not a list of 1 to {MAX_DIMS} positive integers"),
    ("elements <= 2^33", lambda c: math.prod(c.shape) <= MAX_ELEMENTS,
     lambda c: f"shape {list(c.shape)} asks for {math.prod(c.shape)} elements, more than the {MAX_ELEMENTS} "
               "nmtrain allocates for one tensor"),
    ("shape holds the pattern", lambda c: c.shape_problem() is None,
     lambda c: f"shape {list(c.shape)} cannot hold {c.pattern}: {c.shape_problem()}"),
    ("dtype is floating point", lambda c: c.info["dtype"] in FLOAT_DTYPES.values(),
     lambda c: f"dtype {c.info['dtype']!r} is not one of {', '.join(FLOAT_DTYPES.values())}"),
    ("values dtype = dtype", lambda c: FLOAT_DTYPES.get(c.values[1]) == c.info["dtype"],
     lambda c: f"declares dtype {c.info['dtype']} but its values are stored as {c.values[1]}"),
    ("indices dtype uint8", lambda c: c.indices[1] == "U8",
     lambda c: f"its indices are stored as {c.indices[1]}, not U8 (uint8)"),
    ("elements = values * M/N", lambda c: math.prod(c.shape) * c.pattern.n == math.prod(c.values[0]) * c.pattern.m,
     lambda c: f"shape {list(c.shape)} has {math.prod(c.shape)} elements, but the {math.prod(c.values[0])} stored "
               f"values of {c.pattern} make {math.prod(c.values[0]) * c.pattern.m // c.pattern.n}"),
    ("values shape", lambda c: c.values[0] == c.want,
     lambda c: f"values are {c.values[0]}; shape {list(c.shape)} with {c.pattern} wants {c.want}"),
    ("indices shape", lambda c: c.indices[0] == c.want,
     lambda c: f"indices are {c.indices[0]}; shape {list(c.shape)} with {c.pattern} wants {c.want}"),
    # The two data rows: the canonical form the writer produces, each group's N positions strictly ascending.
    ("positions < M", lambda c: bool((c.positions < c.pattern.m).all()),
     lambda c: f"holds in-group positions >= M={c.pattern.m}"),
    ("positions ascending in group", lambda c: bool((c.positions[..., 1:] > c.positions[..., :-1]).all()),
     lambda c: "holds a group whose positions repeat or are out of order (the writer stores them ascending)"),
)


# What a row raises when the untrusted JSON it reads has a type the row did not expect.
_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError)


def _check(constraints, subject, where: str) -> None:
    """Apply a table of (constraint, check, message) rows in order; the first failing row is the error.

    A check sees untrusted JSON: one that stumbles on a type its row did not expect (a TypeError, ...)
    counts as the row failing, so a tampered file still ends in one line."""
    for name, check, message in constraints:
        try:
            ok = bool(check(subject))
        except _MALFORMED:
            ok = False
        if not ok:
            try:
                text = message(subject)
            except _MALFORMED:
                text = "is malformed"
            line = f"SOURCE: {where} {text} [constraint: {name}]"   # names from the file may hold newlines
            raise ConvertError("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in line))


def read_compressed(path: Path) -> Loaded:
    """A safetensors file: nmtrain's compressed format (checked, see above) or a plain state_dict."""
    src = _Source(path)
    _check(_CONTAINER_CONSTRAINTS, src, str(path))
    if src.text is None:            # a plain safetensors state_dict: nothing declared, nothing inflated
        return Loaded({key: src.fh.get_tensor(key) for key in src.fh.keys()}, {}, "state_dict")
    _check(_METADATA_CONSTRAINTS, src, str(path))
    checked = {}
    for key in src.layers:          # every layer passes before any dense tensor is allocated
        checked[key] = _Layer(src, key)
        _check(_LAYER_CONSTRAINTS, checked[key], f"{path}, layer {key}:")
    state, layers = {}, {}
    for key in src.order:
        if key not in checked:
            state[key] = src.fh.get_tensor(key)
            continue
        c = checked[key]
        values = src.fh.get_tensor(key + SEP + "values")
        state[key] = decompress_tensor(values, c.positions, c.pattern, c.info["layout"], c.shape)
        layers[key] = LayerFormat(c.pattern, c.info["layout"])
    return Loaded(state, layers, "compressed")


# ------------------------------------------------------------------------------------------------
# Reading sources


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def _detect_layers(state: dict[str, torch.Tensor], pattern: Pattern, layout: str) -> tuple[dict, dict]:
    layers, skipped = {}, {}
    for name, value in state.items():
        if not (value.is_floating_point() and value.dim() in (2, 4)):
            continue
        problem = shape_violation(value.shape, pattern, layout) or nm_violation(value, pattern, layout)
        if problem is None:
            layers[name] = LayerFormat(pattern, layout)
        else:
            skipped[name] = problem
    if not layers:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:2]) or "no 2-D or 4-D float tensor"
        raise ConvertError(f"--pattern: no tensor of SOURCE holds {pattern.describe()} ({reasons})")
    return layers, skipped


def load_source(source: str | os.PathLike, pattern: str | None = None, layout: str | None = None) -> Loaded:
    """Read a run directory, a compressed or plain safetensors file, or a (masked) state_dict file."""
    source = Path(source)
    if layout is not None and layout not in LAYOUTS:
        raise ConvertError(f"--layout {layout!r} is unknown; use one of: {', '.join(LAYOUTS)}")
    pat = parse_pattern(pattern) if pattern is not None else None
    run = RunDir(source)
    if source.is_dir() and run.summary.is_file():
        if pat is not None or layout is not None:
            raise ConvertError(f"--pattern/--layout: {source} is a run directory whose {SUMMARY} declares "
                               "each layer's pattern and layout; drop these options")
        state = load_weights(source, field="SOURCE")
        try:
            declared = run.read_summary().get("sparse_layers", {}) or {}
            layers = {}
            for name, info in declared.items():
                if info.get("pattern") is None:
                    continue
                if name not in state:
                    raise ConvertError(f"SOURCE: {SUMMARY} declares {name}, which {MODEL} does not hold")
                layers[name] = LayerFormat(parse_pattern(info["pattern"], info.get("transposable", False)),
                                           info.get("layout", "nhwc"))
        except (AttributeError, TypeError) as exc:     # read_summary has checked the JSON and that it is an object
            raise ConvertError(f"SOURCE: {run.summary} is not a run summary ({exc})") from None
        for name, fmt in layers.items():   # declared N:M that does not hold is an error, not a dense fallback
            problem = nm_violation(state[name], fmt.pattern, fmt.layout) if shape_violation(
                state[name].shape, fmt.pattern, fmt.layout) is None else "shape cannot hold it"
            if problem is not None:
                raise ConvertError(f"{name} breaks its declared pattern {fmt.pattern.describe()}: {problem}; "
                                   "nothing written")
        return Loaded(state, layers, "run")
    if source.is_file() and _is_safetensors(source):
        loaded = read_compressed(source)
        if loaded.kind == "compressed":
            if pat is not None:
                raise ConvertError(f"--pattern: {source} is an nmtrain compressed file that declares its patterns; "
                                   "drop --pattern")
            return loaded
        state = loaded.state
    else:
        state = load_weights(source, field="SOURCE")
    state, notes = import_masks(state)
    if pat is None:
        return Loaded(state, {}, "state_dict", notes)
    layers, skipped = _detect_layers(state, pat, layout or "nhwc")
    return Loaded(state, layers, "state_dict", notes, skipped)


# ------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ConvertReport:
    out: Path
    source_bytes: int
    out_bytes: int
    dense_tensor_bytes: int
    stored_tensor_bytes: int
    layers: dict[str, LayerFormat]
    negzero_canonicalised: int = 0
    imported: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _path_bytes(path: Path) -> int:
    weights = weights_path(path)            # a run directory's model.pt
    return 0 if path.is_dir() and not weights.is_file() else weights.stat().st_size


def to_compressed(loaded: Loaded) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    lost = 0
    for key, value in loaded.state.items():
        if SEP in key:
            raise ConvertError(f"SOURCE: tensor name {key!r} contains {SEP!r}, which the compressed format reserves")
        fmt = loaded.layers.get(key)
        if fmt is None:
            tensors[key] = value.detach().contiguous().clone()
            continue
        values, indices, neg = compress_tensor(value, fmt, key)
        lost += neg
        tensors[key + SEP + "values"] = values
        tensors[key + SEP + "indices"] = indices
        layers_meta[key] = {"pattern": str(fmt.pattern), "density": fmt.pattern.density, "layout": fmt.layout,
                            "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    meta = {"format": FORMAT, "version": VERSION, "order": list(loaded.state),
            "layers": layers_meta,
            "note": "N = weights kept of every M; values C_out x K*N/M, indices uint8 positions within each group"}
    return tensors, {"nmtrain": json.dumps(meta)}, lost


def convert(source: str | os.PathLike, to: str, out: str | os.PathLike | None = None, pattern: str | None = None,
            layout: str | None = None) -> ConvertReport:
    """Convert ``source`` to ``to`` (compressed or dense) at ``out``; errors leave nothing written."""
    if to not in TARGETS:
        raise ConvertError(f"--to {to!r} is unknown; use one of: {', '.join(TARGETS)}")
    if to == "semi-structured":
        raise ConvertError("internal: use semi_structured_benchmark for --to semi-structured")
    source = Path(source)
    if not source.exists():
        raise ConvertError(f"SOURCE: {source} does not exist")
    out = Path(out) if out is not None else default_out(source, to)
    check_output_file(out, "--out")            # before any work: only a regular file is replaced
    if out.exists() and out.resolve() == weights_path(source).resolve():
        raise ConvertError(f"--out: {out} is the source itself; choose another --out")
    loaded = load_source(source, pattern, layout)
    dense_bytes = sum(_nbytes(v) for v in loaded.state.values())
    if to == "compressed":
        tensors, metadata, lost = to_compressed(loaded)
        from safetensors.torch import save
        atomic_write(out, lambda fh: fh.write(save(tensors, metadata=metadata)), "--out")
        stored = sum(_nbytes(v) for v in tensors.values())
    else:
        state = {k: v.detach().contiguous() for k, v in loaded.state.items()}
        atomic_write(out, lambda fh: torch.save(state, fh), "--out")
        lost, stored = 0, dense_bytes
    return ConvertReport(out, _path_bytes(source), out.stat().st_size, dense_bytes, stored, loaded.layers, lost,
                         loaded.imported, loaded.skipped)


def default_out(source: Path, to: str) -> Path:
    suffix = ".safetensors" if to == "compressed" else (".json" if to == "semi-structured" else ".pt")
    if source.is_dir():
        return source / ("model.safetensors" if to == "compressed" else f"model-{to}{suffix}")
    stem = source.with_suffix("")
    if to == "dense" and source.suffix == ".pt":
        return stem.with_name(stem.name + "-dense.pt")
    return stem.with_suffix(suffix)


# ------------------------------------------------------------------------------------------------
# Semi-structured (2:4 sparse tensor cores, CUDA compute capability >= 8.0)


def semi_structured_unavailable() -> str | None:
    """Why ``torch.sparse.to_sparse_semi_structured`` cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return ("--to semi-structured needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores); "
                "this machine has no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"--to semi-structured needs compute capability >= 8.0 (2:4 sparse tensor cores); "
                f"{torch.cuda.get_device_name()} has {major}.{minor}")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "--to semi-structured: this PyTorch build has no torch.sparse.to_sparse_semi_structured"
    return None


def _time_cuda(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def semi_structured_benchmark(source: str | os.PathLike, pattern: str | None = None, layout: str | None = None,
                              dtype: str = "float16", batch: int = 4096, reps: int = 50) -> dict:
    """2:4 Linear weights as semi-structured tensors: latency of ``x @ W^T`` sparse vs dense, same run.

    Every 2-D N:M weight whose mask also satisfies 2:4 (at most 2 of every 4 kept along K) is converted;
    the others are reported as skipped with the reason. Returns a JSON-able report.
    """
    why = semi_structured_unavailable()
    if why is not None:
        raise ConvertError(why)
    from torch.sparse import to_sparse_semi_structured
    from torch.nn import functional as F

    if dtype not in ("float16", "bfloat16"):
        raise ConvertError(f"--dtype {dtype!r}: semi-structured needs float16 or bfloat16")
    dt = getattr(torch, dtype)
    loaded = load_source(source, pattern, layout)
    two_four = Pattern(2, 4)
    rows, skipped = {}, {}
    for name, fmt in loaded.layers.items():
        w = loaded.state[name]
        if w.dim() != 2:
            skipped[name] = "not a Linear weight"
            continue
        problem = shape_violation(w.shape, two_four, "nhwc") or nm_violation(w, two_four, "nhwc")
        if problem is not None:
            skipped[name] = f"not 2:4 ({problem})"
            continue
        dense = w.detach().to("cuda", dt).contiguous()
        try:
            sparse = to_sparse_semi_structured(dense)
        except (RuntimeError, ValueError) as exc:
            skipped[name] = (str(exc).strip().splitlines() or ["unsupported"])[0]
            continue
        x = torch.randn(batch, w.shape[1], device="cuda", dtype=dt)
        with torch.inference_mode():
            ref = F.linear(x, dense)
            got = F.linear(x, sparse)
            err = float((got.float() - ref.float()).abs().max())
            t_dense = _time_cuda(lambda: F.linear(x, dense), reps)
            t_sparse = _time_cuda(lambda: F.linear(x, sparse), reps)
        rows[name] = {"shape": list(w.shape), "pattern": str(fmt.pattern), "dense_ms": t_dense,
                      "sparse_ms": t_sparse, "speedup": t_dense / t_sparse, "max_abs_diff": err}
    if not rows:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:2]) or "no N:M layer declared (pass --pattern)"
        raise ConvertError(f"--to semi-structured: no Linear weight could be converted ({reasons})")
    return {"device": torch.cuda.get_device_name(), "dtype": dtype, "batch": batch, "reps": reps,
            "layers": rows, "skipped": skipped, "torch": torch.__version__, "time": time.time()}
