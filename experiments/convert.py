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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..sparsity import (LAYOUTS, Pattern, fold_mask, from_matrix, nm_violation, parse_pattern, shape_violation,
                        to_matrix)
from .errors import ExperimentError
from .io import atomic_write, check_output_file, load_state_dict
from .rundir import MODEL, SUMMARY, RunDir

FORMAT = "nmtrain-nm-compressed"
VERSION = 1
SEP = "::"
TARGETS = ("compressed", "dense", "semi-structured")


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
    if pattern.m > 256:
        raise ConvertError(f"{name}: M={pattern.m} does not fit uint8 indices (M <= 256)")
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
    rows = shape[0]
    k = int(torch.Size(shape).numel()) // rows
    n, m = pattern.n, pattern.m
    want = (rows, k * n // m)
    if tuple(values.shape) != want or tuple(indices.shape) != want:
        raise ConvertError(f"compressed entry has values {tuple(values.shape)} / indices {tuple(indices.shape)}, "
                           f"want {want} for shape {shape} and {pattern}")
    idx = indices.to(torch.int64).reshape(rows, k // m, n)
    if bool((idx >= m).any()):
        raise ConvertError(f"compressed entry has in-group indices >= M={m}")
    groups = torch.zeros(rows, k // m, m, dtype=values.dtype)
    groups.scatter_(-1, idx, values.reshape(rows, k // m, n))
    return from_matrix(groups.reshape(rows, k), shape, layout)


# ------------------------------------------------------------------------------------------------
# Reading sources


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def read_compressed(path: Path) -> Loaded:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # SafetensorError, OSError, ... for truncated or corrupt files
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConvertError(f"SOURCE: {path} is not a readable safetensors file ({line})") from None
    if "nmtrain" not in metadata:  # a plain safetensors state_dict: nothing declared
        return Loaded(tensors, {}, "state_dict")
    try:
        meta = json.loads(metadata["nmtrain"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        state = {}
        layers = {}
        for key in meta["order"]:
            info = meta["layers"].get(key)
            if info is None:
                state[key] = tensors[key]
                continue
            pattern = parse_pattern(info["pattern"])
            dtype = getattr(torch, info["dtype"].replace("torch.", ""))
            values, indices = tensors[key + SEP + "values"], tensors[key + SEP + "indices"]
            if values.dtype != dtype or indices.dtype != torch.uint8:
                raise ValueError(f"{key}: dtypes {values.dtype}/{indices.dtype}, want {dtype}/uint8")
            state[key] = decompress_tensor(values, indices, pattern, info["layout"], tuple(info["shape"]))
            layers[key] = LayerFormat(pattern, info["layout"])
    except ConvertError as exc:
        raise ConvertError(f"SOURCE: {path}: {exc}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ConvertError(f"SOURCE: {path} has inconsistent nmtrain metadata ({exc})") from None
    return Loaded(state, layers, "compressed")


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
        state = load_state_dict(source, field="SOURCE")
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
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
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
        state = load_state_dict(source, field="SOURCE")
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
    if path.is_dir():
        model = RunDir(path).model
        return model.stat().st_size if model.is_file() else 0
    return path.stat().st_size


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
    if out.exists() and out.resolve() == (RunDir(source).model if source.is_dir() else source).resolve():
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
