"""``nmtrain convert``: a model read from any source it comes in, written compressed or dense.

A source is a run directory (each layer's pattern and layout from its summary.json), an nmtrain
compressed file or a plain safetensors state_dict, or a state_dict file, also a masked one
(``torch.nn.utils.prune``, mask buffers, apex ASP: `mask_import.py`). It is read into one plain state_dict
with its N:M layers (`compressed.Loaded`) and written as nmtrain's compressed N:M safetensors file
(`compressed.py`: the format, its writer and its untrusting reader) or as a dense ``.pt`` state_dict.
``--to semi-structured`` is `semistructured.py`'s latency benchmark.

Round trip: ``dense -> compressed -> dense`` returns the same tensors bit for bit, but for one exception
that `compressed.py` documents (a pruned ``-0.0`` may come back as ``+0.0``; the count is reported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..sparsity import LAYOUTS, Pattern, nm_violation, parse_pattern, shape_violation
from .compressed import LayerFormat, Loaded, read_compressed, to_compressed
from .errors import ConvertError
from .io import atomic_write, check_output_file
from .mask_import import import_masks
from .rundir import MODEL, SUMMARY, RunDir, load_weights, weights_path

TARGETS = ("compressed", "dense", "semi-structured")


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
        stored, lost = write_compressed(out, loaded, "--out")
    else:
        state = {k: v.detach().contiguous() for k, v in loaded.state.items()}
        atomic_write(out, lambda fh: torch.save(state, fh), "--out")
        lost, stored = 0, dense_bytes
    return ConvertReport(out, _path_bytes(source), out.stat().st_size, dense_bytes, stored, loaded.layers, lost,
                         loaded.imported, loaded.skipped)


def write_compressed(out: Path, loaded: Loaded, field: str) -> tuple[int, int]:
    """Write ``loaded`` as nmtrain's compressed safetensors file at ``out`` (atomically); returns (bytes of
    the stored tensors, count of pruned -0.0 made +0.0). `nmtrain convert` and `Sparsified.export` write here."""
    tensors, metadata, lost = to_compressed(loaded)
    from safetensors.torch import save
    atomic_write(out, lambda fh: fh.write(save(tensors, metadata=metadata)), field)
    return sum(_nbytes(v) for v in tensors.values()), lost


def load_compressed(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state_dict of an nmtrain compressed safetensors file (`Sparsified.export`'s, ``nmtrain
    convert``'s): every N:M layer decompressed, after the untrusting reader has checked the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"path: {path} " + ("is not a file" if path.exists() else "does not exist"))
    loaded = read_compressed(path)
    if loaded.kind != "compressed":
        raise ConvertError(f"path: {path} is a plain safetensors file, not an nmtrain compressed one; "
                           "read it with safetensors.torch.load_file")
    return loaded.state


def default_out(source: Path, to: str) -> Path:
    suffix = ".safetensors" if to == "compressed" else (".json" if to == "semi-structured" else ".pt")
    if source.is_dir():
        return source / ("model.safetensors" if to == "compressed" else f"model-{to}{suffix}")
    stem = source.with_suffix("")
    if to == "dense" and source.suffix == ".pt":
        return stem.with_name(stem.name + "-dense.pt")
    return stem.with_suffix(suffix)
