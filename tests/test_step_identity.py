"""Speed work changes no number: every method's weights and masks after a few steps, bit for bit, against
the digests recorded before the step optimisations (tests/golden/step_identity.json).

Each variant trains a small conv + MLP model through `nmtrain.sparsify` for 12 steps on one thread, with
the method's schedule shortened so that its mask updates, regrowth or switch happen inside them; the
SHA-256 of every weight, buffer and mask is compared with the recorded one. A change that moves any of
them by one ulp fails here. The digests belong to the torch they were made with: under another version
the test skips and says so.

    python tests/test_step_identity.py --write      # re-record (only for an intended numeric change)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nmtrain
from nmtrain.experiments.methods import get_method

GOLDEN = Path(__file__).parent / "golden" / "step_identity.json"
STEPS = 12

# method -> parameters that make its state move within STEPS (as tests/test_api.py), plus the variants
# whose engine paths differ: the compiled 4:8-T solver, the greedy approximation, MVUE weight gradients.
VARIANTS = {
    "dense": ("dense", "2:4", {}),
    "fixed": ("fixed", "2:4", {}),
    "unstructured": ("unstructured", "2:4", {"gradual": True, "interval": 3}),
    "srste": ("srste", "2:4", {}),
    "srste-mvue": ("srste", "2:4", {"mvue_dw": True}),
    "sste": ("sste", "2:4", {}),
    "transposable": ("transposable", "2:4", {"mask_interval": 3}),
    "transposable-4:8": ("transposable", "4:8", {"mask_interval": 3}),
    "transposable-4:8-approx": ("transposable", "4:8", {"mask_interval": 3, "solver": "approx"}),
    "bimask": ("bimask", "2:4", {"iter": 4}),
    "bame": ("bame", "2:4", {"interval": 2}),
    "maskdecay": ("maskdecay", "2:4", {"mask_interval": 4}),
    "pgf": ("pgf", "2:4", {}),
    "step": ("step", "2:4", {"window": 4, "t_min": 0.25, "t_max": 0.5}),
}


def _model() -> nn.Module:
    # the first conv and the classifier stay dense (the layer rule); a conv, two Linears are sparse
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


def setup_variant(name: str, variants: dict = VARIANTS) -> tuple:
    """(model, optimizer, handle, batches) of variant ``name`` of ``variants``: sparsified, before its first
    step (also tests/test_compile.py's runs)."""
    method, pattern, params = variants[name]
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(16, 8, 4, 4, generator=g), torch.randint(0, 8, (16,), generator=g))
               for _ in range(STEPS)]
    torch.manual_seed(0)
    model = _model()
    if "adamw" in get_method(method).caps.optimizers:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    handle = nmtrain.sparsify(model, method, pattern, opt, total_steps=STEPS, seed=3, **params)
    return model, opt, handle, batches


def run_variant(name: str) -> dict[str, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, opt, handle, batches = setup_variant(name)
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out = {f"weight/{k}": _digest(v) for k, v in model.state_dict().items()}
        out.update({f"mask/{k}": _digest(v) for k, v in handle.masks().items()})
        return out
    finally:
        torch.set_num_threads(threads)


def _golden() -> dict:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: record it with `python {Path(__file__).name} --write`")
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weights_and_masks_are_bit_identical_to_the_recorded_run(name):
    golden = _golden()
    if golden["torch"] != torch.__version__:
        pytest.skip(f"digests recorded under torch {golden['torch']}, this is {torch.__version__}")
    now = run_variant(name)
    assert now.keys() == golden["runs"][name].keys()
    changed = [key for key in now if now[key] != golden["runs"][name][key]]
    assert not changed, f"{name}: {changed} differ from the recorded run"


def test_every_method_has_a_recorded_variant():
    assert {method for method, _, _ in VARIANTS.values()} == set(nmtrain.METHODS)
    assert set(_golden()["runs"]) == set(VARIANTS)


def test_a_one_ulp_change_is_caught():
    """The digest sees the smallest change a speed edit could make."""
    w = torch.randn(16)
    nudged = w.clone()
    nudged[3] = torch.nextafter(w[3], torch.tensor(float("inf")))
    assert _digest(w) != _digest(nudged) and _digest(w) == _digest(w.clone())


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.parent.mkdir(exist_ok=True)
    record = {"torch": torch.__version__, "steps": STEPS, "runs": {name: run_variant(name) for name in VARIANTS}}
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN}")
