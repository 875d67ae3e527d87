"""benchmarks/claims.py: the papers' claims judged by paired tests on a seeded grid's rows."""

import importlib.util
from pathlib import Path

from nmtrain.experiments.compare import aggregate

spec = importlib.util.spec_from_file_location("claims", Path(__file__).resolve().parents[1] / "benchmarks" / "claims.py")
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def _run(method, pattern, seed, acc, flops):
    return {"method": method, "pattern": pattern, "density": 0.5, "final_accuracy": acc, "best_accuracy": acc,
            "epochs": 1, "seed": seed, "flops_ratio": flops, "wall_seconds": 1.0, "mask_change_rate": None,
            "run_dir": "x", "accel": "none"}


def test_claims_hold_or_fail_by_the_paired_test():
    rows = []
    for seed, base in ((0, 89.0), (1, 88.0), (2, 90.0)):
        rows += [_run("srste", "2:4", seed, base, 0.88),
                 _run("transposable", "4:8-T", seed, base + (0.2, -0.3, 0.05)[seed], 0.76),   # within noise
                 _run("transposable", "2:4-T", seed, base - 0.5, 0.76),
                 _run("bimask", "2:4", seed, base - 1.0 + (0.01, 0.02, 0.0)[seed], 0.76),     # clearly below
                 _run("bame", "2:4", seed, base + 0.1 * seed, 0.70)]
    out = {v["claim"]: v for v in claims.verdicts(aggregate(rows))}
    assert len(out) == 3                                    # the 1:4 claims have no cells here
    first = out["4:8-T about as accurate as 2:4 (Hubara et al.)"]
    assert first["holds"] and first["verdict"] == "holds (within noise)"
    bimask = out["Bi-Mask ≥ transposable at 2:4 (Zhang et al.)"]
    assert not bimask["holds"] and bimask["verdict"] == "does not hold (below)" and bimask["p_value"] < 0.05
    bame = out["BAME ≈ SR-STE at 2:4, fewer FLOPs (Yang et al.)"]
    assert bame["holds"] and "0.80x of srste" in bame["verdict"]
