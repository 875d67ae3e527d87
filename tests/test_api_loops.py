"""`nmtrain.sparsify` in loops people write: DistributedDataParallel, gradient accumulation, gradient
clipping, AMP, a model nmtrain has never seen, and torch.compile.

The method's per-step work runs from hooks (experiments/sparsify.py): ``before_step`` at the first training
forward of a step, ``after_backward`` in ``optimizer.step()``'s pre-hook, ``after_step`` in its post-hook.
Each test below puts one thing a real loop does between those hooks and checks the numbers that come out.
"""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import nmtrain
from nmtrain.experiments.sparsify import COMPILE_REFUSED
from nmtrain.masks import Pattern, nm_mask, nm_violation, parse_pattern


def _mlp() -> nn.Sequential:
    """8 -> 16 -> 16 -> 16 -> 3: the two middle Linears are sparse (the first and the last stay dense)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def _batches(steps: int, seed: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(steps)]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grad_norm(params) -> float:
    """The gradients' total 2-norm, as clip_grad_norm_ measures it."""
    return _grad_norm_of(p.grad for p in params if p.grad is not None)


def _grad_norm_of(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _assert_patterns_hold(model: nn.Module, report: dict) -> None:
    """Every weight `remove()` reports satisfies its pattern, with exactly N of every M kept."""
    assert report
    for name, entry in report.items():
        weight = model.get_parameter(name)
        assert nm_violation(weight, parse_pattern(entry["pattern"]), exact=True) is None, name
        assert float((weight != 0).float().mean()) == entry["density"] == 0.5, name


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel: two CPU processes (gloo), the user's loop in each


DDP_STEPS = 4
DDP_RUNS = {          # scenario -> (method, its params, which comes first)
    "srste, sparsify then DDP": ("srste", {}, "sparsify"),
    "srste, sparsify(ddp_model)": ("srste", {}, "ddp"),
    "bimask, sparsify then DDP": ("bimask", {"iter": 2}, "sparsify"),       # permutations drawn at steps 0 and 2
    "bimask, sparsify(ddp_model)": ("bimask", {"iter": 2}, "ddp"),
    "srste mvue_dw, sparsify then DDP": ("srste", {"mvue_dw": True}, "sparsify"),   # random draws in every backward
    "srste mvue_dw, sparsify(ddp_model)": ("srste", {"mvue_dw": True}, "ddp"),
}
SEED = 3            # the method's own draws (Bi-Mask's permutations, the MVUE samples): the same on every rank


def _rank_batches(rank: int) -> list:
    # each rank its own half of the global batch: the local gradients differ, DDP's all-reduce makes them one
    return _batches(DDP_STEPS, seed=100 + rank)


def _ddp_scenario(rank: int, method: str, params: dict, first: str) -> dict:
    model = _mlp()
    if first == "ddp":
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        handle = nmtrain.sparsify(ddp, method, "2:4", opt, seed=SEED, **params)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        handle = nmtrain.sparsify(model, method, "2:4", opt, seed=SEED, **params)
        ddp = DDP(model)
    losses = []
    for x, y in _rank_batches(rank):
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    handle.check_ranks()            # all-gathers every mask's checksum; raises if a rank differs
    return {"masks": handle.masks(), "weights": _weights(model), "step": handle.step, "losses": losses,
            "layers": sorted(handle.layers)}


def _ddp_tampered(rank: int) -> dict:
    """`fixed` holds its masks: flip one entry on rank 1 and ask check_ranks."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "fixed", "2:4", opt)
    ddp = DDP(model)
    for x, y in _rank_batches(rank)[:2]:
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    handle.check_ranks()            # the same masks so far
    layer = sorted(handle.layers)[-1]
    if rank == 1:
        mask = handle.method._masks[layer]
        mask[0, 0] = ~mask[0, 0]
    try:
        handle.check_ranks()
    except RuntimeError as exc:
        return {"layer": layer, "error": str(exc)}
    return {"layer": layer, "error": None}


def _ddp_compiled() -> str | None:
    try:
        nmtrain.sparsify(DDP(torch.compile(_mlp())), "srste", "2:4", torch.optim.SGD(_mlp().parameters(), lr=0.1))
    except nmtrain.ExperimentError as exc:
        return str(exc)
    return None


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {name: _ddp_scenario(rank, *run) for name, run in DDP_RUNS.items()}
        results["tampered"] = _ddp_tampered(rank)
        results["compiled"] = _ddp_compiled()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results of every DDP scenario: one pair of processes runs them all (about a second:
    fork, where the platform has it, saves each child re-importing torch)."""
    out = tmp_path_factory.mktemp("ddp")
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    procs = mp.start_processes(_ddp_worker, args=(_free_port(), str(out)), nprocs=2, join=False, start_method=start)
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):           # raises, with the child's traceback, if a rank failed
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish in 120 s")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("scenario", list(DDP_RUNS))
def test_ddp_every_rank_ends_with_the_same_masks_and_weights(ranks, scenario):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["layers"] == r1["layers"] == ["2", "4"]
    assert r0["step"] == r1["step"] == DDP_STEPS
    assert r0["losses"] != r1["losses"]                 # each rank trained on its own data
    for layer, mask in r0["masks"].items():
        assert torch.equal(mask, r1["masks"][layer]), layer
        assert nm_violation(mask, Pattern(2, 4), exact=True) is None, layer
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    assert not torch.equal(r0["weights"]["2.weight"], _mlp()[2].weight)       # it did train


@pytest.mark.parametrize("scenario", [s for s, (_, params, _) in DDP_RUNS.items() if not params.get("mvue_dw")])
def test_ddp_trains_as_one_process_on_the_global_batch(ranks, scenario):
    """Equal halves of a batch, gradients averaged: the run of one process on the whole batch, up to the
    order of float sums (MVUE's weight gradient samples each rank's own dY, so not for it)."""
    method, params, _ = DDP_RUNS[scenario]
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = nmtrain.sparsify(model, method, "2:4", opt, seed=SEED, **params)
    for (x0, y0), (x1, y1) in zip(_rank_batches(0), _rank_batches(1)):
        opt.zero_grad()
        F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    for layer, mask in handle.masks().items():
        assert torch.equal(mask, ranks[0][scenario]["masks"][layer]), layer
    for key, value in _weights(model).items():
        torch.testing.assert_close(value, ranks[0][scenario]["weights"][key], rtol=1e-5, atol=1e-6)


def test_check_ranks_names_the_layer_whose_mask_one_rank_changed(ranks):
    for rank in (0, 1):             # every rank compares the gathered checksums, so every rank raises
        tampered = ranks[rank]["tampered"]
        assert tampered["error"] == (f"masks diverged across processes at step 2: layer {tampered['layer']} "
                                     "differs between rank 0 and rank 1")


def test_ddp_over_a_compiled_model_is_refused(ranks):
    for rank in (0, 1):
        assert ranks[rank]["compiled"] == ("model: a torch.compile'd model cannot be sparsified; sparsify the "
                                           "model itself, then compile it (docs/api.md#torchcompile)")


# ------------------------------------------------------------------------------------------------
# Gradient accumulation and gradient clipping


def _spy(method, hook: str) -> list[int]:
    """Record the steps at which ``method.<hook>`` runs (an instance attribute shadows the method)."""
    calls: list[int] = []
    original = getattr(method, hook)

    def spy(step):
        calls.append(step)
        return original(step)

    setattr(method, hook, spy)
    return calls


def _accumulate(micro: int, steps: int = 4, **params):
    """SR-STE 2:4 for ``steps`` optimizer steps of batch 16, each in ``micro`` micro-batches (loss/micro each)."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "srste", "2:4", opt, **params)
    calls = {hook: _spy(handle.method, hook) for hook in ("before_step", "after_backward", "after_step")}
    for x, y in _batches(steps, seed=1, size=16):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (F.cross_entropy(model(xs), ys) / micro).backward()
        opt.step()
    return model, handle, calls


def test_gradient_accumulation_is_one_method_step_per_optimizer_step():
    model, handle, calls = _accumulate(micro=2, decay=0.0)
    assert handle.step == 4
    assert calls == {"before_step": [0, 1, 2, 3], "after_backward": [0, 1, 2, 3], "after_step": [0, 1, 2, 3]}
    full, _, _ = _accumulate(micro=1, decay=0.0)
    for key, value in _weights(full).items():
        torch.testing.assert_close(_weights(model)[key], value, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_adds_sr_stes_decay_once_per_step():
    model, _, _ = _accumulate(micro=2)
    full, _, _ = _accumulate(micro=1)
    for key, value in _weights(full).items():
        torch.testing.assert_close(_weights(model)[key], value, rtol=1e-5, atol=1e-7)


CLIP = 0.02


def _clipped_run(method: str, **params):
    """Three steps with the gradients' norm clipped to CLIP before opt.step(); records, when the method's
    per-step gradient work starts inside opt.step() (SR-STE's decay, then ``after_backward``), the total
    norm it finds, the gradients and weights then, and the norm it leaves."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, method, "2:4", opt, **params)
    seen = []
    original = handle.stepper.before_update

    def before_update():
        seen.append({"in": _grad_norm(model.parameters()),
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                     "weights": {n: p.detach().clone() for n, p in model.named_parameters()}})
        original()
        seen[-1]["out"] = _grad_norm(model.parameters())

    handle.stepper.before_update = before_update
    unclipped = []
    for x, y in _batches(3, seed=2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        unclipped.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return model, handle, seen, unclipped


@pytest.mark.parametrize("method, params, term, mask_of", [
    # SR-STE's decay, lambda_W = 2e-4, on the forward's mask: the magnitude mask of the weights then
    ("srste", {}, lambda w, mask: 2e-4 * w * ~mask, lambda handle, layer, w: nm_mask(w, 2, 4)),
    # maskdecay's masked decay, in after_backward, on its stored mask (recomputed every step here)
    ("maskdecay", {"total_steps": 100, "alpha": 0.05, "mask_interval": 1}, lambda w, mask: 0.05 * w * ~mask,
     lambda handle, layer, w: handle.masks()[layer])])
def test_a_methods_own_gradient_term_is_added_after_the_users_clip(method, params, term, mask_of):
    _, handle, seen, unclipped = _clipped_run(method, **params)
    assert handle.step == 3 and len(seen) == 3
    assert min(unclipped) > 5 * CLIP                           # the clip did cut every step
    for s in seen:
        assert abs(s["in"] - CLIP) < 1e-5 and s["out"] > s["in"]      # clipped in; the term added, unclipped
    last = seen[-1]                                             # the last step's gradients are still in .grad
    for layer, mod in handle.layers.items():
        key = f"{layer}.weight"
        w = last["weights"][key]
        torch.testing.assert_close(mod.weight.grad, last["grads"][key] + term(w, mask_of(handle, layer, w)),
                                   rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# AMP


@pytest.mark.parametrize("method, params", [("srste", {}), ("transposable", {"mask_interval": 2})])
def test_cpu_bfloat16_autocast_trains_to_valid_masks(method, params):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, method, "2:4", opt, **params)
    losses = []
    for x, y in _batches(5, seed=4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        assert logits.dtype == torch.bfloat16                  # the sparse layers ran under autocast
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert handle.step == 5 and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    _assert_patterns_hold(model, handle.remove())


def _scaled_run(device: str, dtype: torch.dtype):
    """SR-STE 2:4 under autocast(dtype) with a GradScaler: 3 steps, then one whose gradient holds an inf."""
    model = _mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "srste", "2:4", opt)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    before_step = _spy(handle.method, "before_step")
    history = []
    for i, (x, y) in enumerate(_batches(4, seed=5)):
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        scaler.scale(loss).backward()
        if i == 3:
            model[2].weight.grad[0, 0] = float("inf")          # an overflow: the scaler skips this step
        weights = _weights(model)
        scaler.step(opt)
        scaler.update()
        history.append({"loss": loss.item(), "step": handle.step, "scale": scaler.get_scale(),
                        "changed": not torch.equal(weights["2.weight"], model[2].weight)})
    return model, handle, history, before_step


def _check_scaled_run(model, handle, history, before_step):
    assert [h["step"] for h in history] == [1, 2, 3, 3]        # the skipped step is no step of the method's
    assert [h["changed"] for h in history] == [True, True, True, False]
    assert history[3]["scale"] == history[2]["scale"] / 2     # and the scaler backed off
    assert before_step == [0, 1, 2, 3]                          # step 3 began; it is retried by the next update
    assert all(math.isfinite(h["loss"]) for h in history)
    _assert_patterns_hold(model, handle.remove())


def test_grad_scaler_skipped_step_does_not_advance_the_handle_on_cpu():
    _check_scaled_run(*_scaled_run("cpu", torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float16_autocast_with_grad_scaler():
    _check_scaled_run(*_scaled_run("cuda", torch.float16))


def test_grad_scaler_leaves_sr_stes_decay_unscaled():
    def one_step(scale):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        nmtrain.sparsify(model, "srste", "2:4", opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale is not None)
        x, y = _batches(1, seed=6)[0]
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        return model

    plain, scaled = one_step(None), one_step(2.0 ** 10)        # a power of two: the scaling itself is exact
    torch.testing.assert_close(scaled[2].weight, plain[2].weight, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# A model nmtrain has never seen: a small transformer language model


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, context: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos[:idx.shape[1]])))


MLP_LAYERS = ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]


@pytest.mark.parametrize("method, params", [("srste", {}), ("transposable", {"mask_interval": 5})])
@pytest.mark.parametrize("with_example", [False, True])
def test_a_transformer_of_the_users_own_trains_sparse(method, params, with_example):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 32, (16, 9), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    handle = nmtrain.sparsify(model, method, "2:4", opt, example_input=x if with_example else None)
    assert sorted(handle.layers) == MLP_LAYERS
    # MHA multiplies by out_proj.weight itself: routing out_proj's forward would change nothing
    for block in ("blocks.0", "blocks.1"):
        assert "never runs" in handle.skipped[f"{block}.attn.out_proj"]
    assert {"tok", "head"} <= set(handle.skipped)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    report = handle.remove()
    assert sorted(report) == [f"{name}.weight" for name in MLP_LAYERS]
    assert {entry["pattern"] for entry in report.values()} == {str(handle.method.export_pattern(MLP_LAYERS[0]))}
    _assert_patterns_hold(model, report)
    assert bool((model.blocks[0].attn.out_proj.weight != 0).all())        # left dense


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    # dynamo caches compiled frames per code object across models: each test starts and ends clean
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _sparsified():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, nmtrain.sparsify(model, "srste", "2:4", opt)


def test_sparsifying_a_compiled_model_is_refused_in_one_line():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = ("model: a torch.compile'd model cannot be sparsified; sparsify the model itself, then compile it "
                "(docs/api.md#torchcompile)")
    with pytest.raises(nmtrain.ExperimentError) as exc:
        nmtrain.sparsify(torch.compile(model), "srste", "2:4", opt)
    assert str(exc.value) == expected
    model.compile()                                             # compiled in place
    with pytest.raises(nmtrain.ExperimentError) as exc:
        nmtrain.sparsify(model, "srste", "2:4", opt)
    assert str(exc.value) == expected


@pytest.mark.parametrize("inplace", [False, True])
def test_a_compiled_training_step_not_begun_is_refused_in_one_line(fresh_dynamo, inplace):
    model, opt, handle = _sparsified()
    if inplace:
        model.compile(backend="aot_eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="aot_eager")
    x, y = _batches(1, seed=7)[0]
    with pytest.raises(nmtrain.ExperimentError) as exc:
        F.cross_entropy(compiled(x), y).backward()
    assert str(exc.value) == COMPILE_REFUSED and "\n" not in COMPILE_REFUSED
    assert handle.step == 0 and not handle.stepper.begun       # the method did nothing
    handle.begin_step()                 # what the message asks: the step begun, the compiled model trains
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    assert handle.step == 1


# inductor's C++ compile of the graph takes ~14 s on a 2-core CPU with a cold cache (under 1 s warm): slow;
# aot_eager captures the same graph (dynamo and AOT autograd) and runs it eagerly
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_evaluation_under_compile_matches_eager_and_follows_new_masks(fresh_dynamo, backend):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = nmtrain.sparsify(model, "transposable", "2:4", opt, mask_interval=1)
    graphs = []
    compile_graph = torch._dynamo.lookup_backend(backend)

    def counting(gm, example_inputs):
        graphs.append(gm)
        return compile_graph(gm, example_inputs)

    compiled = torch.compile(model, backend=counting)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(8))
    batches = iter(_batches(6, seed=9))
    masks_seen = []
    for _ in range(2):
        model.train()
        for _ in range(3):
            xb, yb = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))
        masks_seen.append(handle.masks())
    assert handle.step == 6                                     # the compiled evaluations were no steps
    # one graph, the whole model (no break); the masks are its inputs, so new masks need no recompile
    assert len(graphs) == 1
    assert any(not torch.equal(masks_seen[0][k], masks_seen[1][k]) for k in masks_seen[0])

