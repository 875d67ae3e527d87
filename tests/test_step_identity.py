"""Speed work changes no number: every method's weights and masks after a few steps, bit for bit, against
the digests recorded before the step optimisations (tests/golden/step_identity.json).

Each variant trains a small conv + MLP model through `nmtrain.sparsify` for 12 steps on one thread, with
the method's schedule shortened so that its mask updates, regrowth or switch happen inside them; the
SHA-256 of every weight, buffer and mask is compared with the recorded one. A change that moves any of
them by one ulp fails here.

The digests belong to the torch and the CPU they were made with: the same code gives other bits on
another CPU (MKL and oneDNN pick their kernels by vendor and instruction set; an Intel Xeon and an AMD
EPYC, both AVX-512, differ in every variant, dense included). So the file holds one record per
platform, told apart by the weights of the same 12 steps in plain torch (`platform`): the dense
variant's own weights, since `dense` adds nothing to the step. On a platform with no record, or under
another torch, the test skips and says so. A record is made from the code before the step optimisations
(commit 1b82f93), not from the code it checks; this file, run with that package on the path, adds (or
replaces) this platform's record:

    git worktree add /tmp/before 1b82f93
    .venv/bin/pip install --no-deps --no-build-isolation --target /tmp/before-pkg /tmp/before
    PYTHONPATH=/tmp/before-pkg .venv/bin/python tests/test_step_identity.py --write
"""

from __future__ import annotations

import hashlib
import json
import platform as host
import sys
from contextlib import contextmanager
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


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 8, 4, 4, generator=g), torch.randint(0, 8, (16,), generator=g)) for _ in range(STEPS)]


def _adamw() -> type:
    """The AdamW ``nmtrain train`` builds (experiments/optim.py), or torch's under a code that had none (the
    records' 1b82f93): the digests then show that it is torch's AdamW, bit for bit, in every method's step."""
    try:
        from nmtrain.experiments.optim import AdamW
    except ImportError:
        return torch.optim.AdamW
    return AdamW


def setup_variant(name: str, variants: dict = VARIANTS, device: str = "cpu") -> tuple:
    """(model, optimizer, handle, batches) of variant ``name`` of ``variants`` on ``device``: sparsified, before
    its first step (also tests/test_compile.py's and tests/test_gpu.py's runs)."""
    method, pattern, params = variants[name]
    batches = [(x.to(device), y.to(device)) for x, y in _batches()]
    torch.manual_seed(0)
    model = _model().to(device)
    if "adamw" in get_method(method).caps.optimizers:
        opt = _adamw()(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    handle = nmtrain.sparsify(model, method, pattern, opt, total_steps=STEPS, seed=3, **params)
    return model, opt, handle, batches


@contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def run_variant(name: str) -> dict[str, str]:
    with _one_thread():
        model, opt, handle, batches = setup_variant(name)
        _train(model, opt, batches)
        out = {f"weight/{k}": _digest(v) for k, v in model.state_dict().items()}
        out.update({f"mask/{k}": _digest(v) for k, v in handle.masks().items()})
        return out


def platform_key(weights: dict[str, str]) -> str:
    """The platform's name in the golden file: a digest of the weight digests of the 12 steps in plain torch."""
    return hashlib.sha256(json.dumps(sorted(weights.items())).encode()).hexdigest()[:16]


def plain_torch_weights() -> dict[str, str]:
    """The dense variant's steps without nmtrain (the same model, batches and SGD): its ``weight/`` digests."""
    with _one_thread():
        batches = _batches()        # setup_variant's batches, model and optimizer, without nmtrain
        torch.manual_seed(0)
        model = _model()
        _train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4), batches)
        return {f"weight/{k}": _digest(v) for k, v in model.state_dict().items()}


def _cpu() -> str:
    name = host.processor() or host.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def _golden() -> dict:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: record it with `python {Path(__file__).name} --write`")
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def record() -> dict:
    """This platform's record under this torch; skips when there is none."""
    key = platform_key(plain_torch_weights())
    for rec in _golden()["records"]:
        if rec["torch"] == torch.__version__ and rec["platform"] == key:
            return rec
    pytest.skip(f"no digests recorded for this platform ({_cpu()}, platform {key}) under torch "
                f"{torch.__version__}: record them as the module docstring says")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weights_and_masks_are_bit_identical_to_the_recorded_run(name, record):
    now = run_variant(name)
    assert now.keys() == record["runs"][name].keys()
    changed = [key for key in now if now[key] != record["runs"][name][key]]
    assert not changed, f"{name}: {changed} differ from the recorded run ({record['cpu']})"


def test_every_method_has_a_recorded_variant_on_every_platform():
    assert {method for method, _, _ in VARIANTS.values()} == set(nmtrain.METHODS)
    records = _golden()["records"]
    assert records and len({(r["torch"], r["platform"]) for r in records}) == len(records)
    for rec in records:
        assert set(rec["runs"]) == set(VARIANTS), rec["cpu"]
        # the key is the dense variant's weights: dense adds nothing to plain torch's step
        dense = {k: v for k, v in rec["runs"]["dense"].items() if k.startswith("weight/")}
        assert platform_key(dense) == rec["platform"], rec["cpu"]


def test_dense_through_nmtrain_is_plain_torch():
    """What makes the dense variant's weights a name for the platform."""
    assert {k: v for k, v in run_variant("dense").items() if k.startswith("weight/")} == plain_torch_weights()


def test_a_one_ulp_change_is_caught():
    """The digest sees the smallest change a speed edit could make."""
    w = torch.randn(16)
    nudged = w.clone()
    nudged[3] = torch.nextafter(w[3], torch.tensor(float("inf")))
    assert _digest(w) != _digest(nudged) and _digest(w) == _digest(w.clone())


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.parent.mkdir(exist_ok=True)
    runs = {name: run_variant(name) for name in VARIANTS}
    key = platform_key(plain_torch_weights())
    records = [r for r in (json.loads(GOLDEN.read_text())["records"] if GOLDEN.exists() else [])
               if (r["torch"], r["platform"]) != (torch.__version__, key)]
    records.append({"torch": torch.__version__, "platform": key, "cpu": _cpu(), "steps": STEPS, "runs": runs})
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text(json.dumps({"records": records}, indent=1, sort_keys=True) + "\n")
    tmp.replace(GOLDEN)
    print(f"wrote {GOLDEN}: {len(records)} platform record(s), this one {key} ({_cpu()})")
