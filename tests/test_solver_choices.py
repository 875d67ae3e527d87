"""Where several masks are optimal, the compiled solvers keep choosing the one they chose when recorded.

`flow` checks (tests/test_solvers_fast.py) that every exact mask is an optimum; on a tile with exactly tied
magnitudes there are several, and which one a solver returns depends on the order of its steps: which
augmenting path, which improving cycle, which column among equals. A speed change to the kernels must
not change that choice, or a run's masks, and every weight after them, change with it. Here `exact`
and `approx` (compiled, 2:4 by the same kernel rather than the enumeration) mask weights full of ties,
and the SHA-256 of each mask is compared with tests/golden/solver_choices.json, recorded from the
kernels before the packed-key passes (commit 79886cf). The masks are integers from integer costs
(float64 quantisation is exact IEEE arithmetic), so the record holds on any machine.

    python tests/test_solver_choices.py --write      # re-record (only for an intended change of choice)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from nmtrain.sparsity import transposable_mask
from nmtrain.sparsity.solvers import compiled
from test_step_identity import _digest

GOLDEN = Path(__file__).parent / "golden" / "solver_choices.json"
PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (6, 8), (8, 16), (16, 32), (3, 6), (22, 45)]
KINDS = ("ints0-3", "ints0-1", "half-zero", "fp8", "equal")


def _weight(kind: str, m: int) -> torch.Tensor:
    side = m * (16 if m <= 16 else 6)
    g = torch.Generator().manual_seed(m)
    if kind == "ints0-3":
        return torch.randint(0, 4, (side, side), generator=g).float()
    if kind == "ints0-1":
        return torch.randint(0, 2, (side, side), generator=g).float()
    if kind == "half-zero":
        return torch.randn(side, side, generator=g) * (torch.rand(side, side, generator=g) < 0.5)
    if kind == "fp8":           # float8 e4m3 keeps 3 bits of mantissa: about 20 distinct magnitudes a tile
        return torch.randn(side, side, generator=g).to(torch.float8_e4m3fn).float()
    return torch.ones(side, side)


def masks() -> dict[str, str]:
    out = {}
    for n, m in PATTERNS:
        for kind in KINDS:
            w = _weight(kind, m)
            for solver in ("compiled", "approx"):
                keep = transposable_mask(w, n, m, solver=solver)
                assert compiled.stats["fallback"] == 0
                out[f"{n}:{m}/{kind}/{solver}"] = _digest(keep)
    return out


@pytest.mark.skipif(not compiled.available(), reason="the compiled solvers need numba")
def test_the_solvers_choose_among_equal_optima_as_recorded():
    recorded = json.loads(GOLDEN.read_text())
    now = masks()
    assert now.keys() == recorded.keys()
    changed = [key for key in now if now[key] != recorded[key]]
    assert not changed, f"other optima chosen: {changed}"


def test_the_weights_are_full_of_ties():
    """What makes the record a test of choice: most tiles have many optima."""
    for kind in ("ints0-3", "ints0-1", "half-zero", "fp8"):
        w = _weight(kind, 8)
        tiles = w.abs().reshape(16, 8, 16, 8).permute(0, 2, 1, 3).reshape(-1, 64)
        distinct = torch.tensor([t.unique().numel() for t in tiles]).float().mean()
        assert distinct < 40, (kind, distinct)       # of 64 entries a tile


if __name__ == "__main__" and "--write" in sys.argv:
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text(json.dumps(masks(), indent=1, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN}")
