"""The public API (`import nmtrain`): a plain loop through `nmtrain.sparsify` is `nmtrain train`, bit for bit,
for every method; the handle resumes bit-exactly; `prune`, `oneshot` and `masks` are the engine's; bad
arguments raise one type per layer with the CLI's one-line messages."""

import random

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import nmtrain
from helpers import QUICK, run_cli
from nmtrain.data.loaders import set_epoch
from nmtrain.experiments.build import build
from nmtrain.experiments.compressed import read_compressed
from nmtrain.experiments.methods import build_params, get_method, params_dict
from nmtrain.experiments.spec import Spec, from_dict

# Per method, what makes its state move within the 16 steps of the run (as tests/test_resume.py).
EXTRA = {"bimask": {"iter": 4}, "bame": {"interval": 2}, "maskdecay": {"mask_interval": 4},
         "step": {"window": 4, "t_min": 0.25, "t_max": 0.5}}


def _adamw_only(method: str) -> bool:
    return "adamw" in get_method(method).caps.optimizers


def _cli_run(out, method):
    params = [f"method.params.{k}={v}" for k, v in EXTRA.get(method, {}).items()]
    optim = ["optim.name=adamw", "optim.lr=0.005"] if _adamw_only(method) else []
    result = run_cli("train", *QUICK, "schedule.name=constant", *optim, *params, "--method", method,
                     "--pattern", "2:4", "--out", out)
    assert result.exit_code == 0, result.output
    return from_dict(Spec, yaml.safe_load((out / "config.yaml").read_text()))


def _optimizer(spec: Spec, model: nn.Module) -> torch.optim.Optimizer:
    o = spec.optim
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def _own_loop(spec: Spec, method: str):
    """The same model, data and seed as the run, trained by a plain loop through nmtrain.sparsify."""
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    built = build(spec, augment=spec.data.augment, holdout=None)       # the run's model (its init) and batches
    model, loader, epochs = built.model, built.train_loader, spec.train.epochs
    # ---- a user's own loop: 15 lines -------------------------------------------------------------
    opt = _optimizer(spec, model)
    handle = nmtrain.sparsify(model, method, "2:4", opt, total_steps=epochs * len(loader), seed=spec.seed,
                              **EXTRA.get(method, {}))
    model.train()
    for epoch in range(epochs):
        set_epoch(loader, epoch)                    # the run's order of the batches
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    flops = handle.flops()
    handle.remove()
    return model, handle, flops


@pytest.mark.parametrize("method", nmtrain.METHODS)
def test_a_plain_loop_through_sparsify_is_nmtrain_train_bit_for_bit(tmp_path, method):
    spec = _cli_run(tmp_path / "run", method)
    model, handle, flops = _own_loop(spec, method)
    trained = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    mine = model.state_dict()
    assert mine.keys() == trained.keys()
    for key in trained:
        assert torch.equal(mine[key], trained[key]), f"{method}: {key} differs"
    summary = yaml.safe_load((tmp_path / "run" / "summary.json").read_text())
    assert handle.step == summary["steps"] == 16
    # the handle measures the FLOPs on the loop's own forwards; the runner counts samples x MACs per sample
    for key in ("forward", "backward_data", "backward_weight", "dense_total"):
        assert flops[key] == summary["train_flops"][key], key


def _train(model, opt, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("method", nmtrain.METHODS)
def test_the_handle_state_resumes_bit_exactly(method):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(12)]
    params = {"mvue_dw": True} if "mvue_dw" in params_dict(build_params(get_method(method), {})) else {}
    params.update(EXTRA.get(method, {}))
    make_opt = ((lambda m: torch.optim.AdamW(m.parameters(), lr=0.01)) if _adamw_only(method)
                else (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)))

    def start(state=None):
        torch.manual_seed(0)
        model = _mlp()
        opt = make_opt(model)
        handle = nmtrain.sparsify(model, method, "2:4", opt, total_steps=12, seed=3, **params)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            handle.load_state_dict(state["handle"])
        return model, opt, handle

    model, opt, handle = start()
    _train(model, opt, batches)
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    whole_masks = handle.masks()

    model, opt, handle = start()
    _train(model, opt, batches[:5])
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
             "handle": handle.state_dict()}
    saved = torch.load(_roundtrip(saved), weights_only=True)            # through a file, as a checkpoint goes
    model, opt, handle = start(saved)
    assert handle.step == 5
    _train(model, opt, batches[5:])
    for key, value in model.state_dict().items():
        assert torch.equal(value, whole[key]), f"{method}: {key}"
    for name, mask in handle.masks().items():
        assert torch.equal(mask, whole_masks[name]), f"{method}: mask of {name}"


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_evaluation_between_steps_does_not_run_the_methods_step():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "transposable", "2:4", opt, mask_interval=1)
    calls = []
    before = handle.method.before_step
    handle.method.before_step = lambda step: (calls.append(step), before(step))[1]
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    _train(model, opt, [(x, y)] * 3)
    with torch.no_grad():
        model(x)                                    # an evaluation under no_grad
    model.eval()
    model(x)                                        # and one in eval mode
    model.train()
    assert calls == [0, 1, 2] and handle.step == 3


def test_export_writes_the_convert_format_with_the_deployed_weights(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "transposable", "4:8", opt)
    _train(model, opt, [(torch.randn(8, 16), torch.randint(0, 4, (8,)))] * 2)
    path = handle.export(tmp_path / "model.safetensors")
    report = handle.remove()
    loaded = read_compressed(path)
    assert loaded.kind == "compressed"
    state = nmtrain.load_compressed(path)                                   # the public reader: dense
    assert state.keys() == loaded.state.keys() and all(torch.equal(state[k], loaded.state[k]) for k in state)
    with pytest.raises(nmtrain.ExperimentError, match="^path: .* does not exist"):
        nmtrain.load_compressed(tmp_path / "missing.safetensors")
    assert set(loaded.layers) == set(report) == {"3.weight", "5.weight"}
    assert all(str(fmt.pattern) == "4:8-T" for fmt in loaded.layers.values())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state[key], value), key
    with pytest.raises(nmtrain.ExperimentError, match="^export: the method was already removed"):
        handle.export(tmp_path / "again.safetensors")


def test_summary_and_flops_of_a_handle():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "srste", "2:4", opt)
    _train(model, opt, [(torch.randn(8, 16), torch.randint(0, 4, (8,)))] * 2)
    s = handle.summary()
    assert s["method"] == handle.method.name and s["pattern"] == "2:4" and s["density"] == 0.5 and s["step"] == 2
    assert set(s["sparse_layers"]) == {"3", "5"} and set(s["skipped_layers"]) == {"1", "7"}
    assert all(v["density"] == 0.5 for v in s["sparse_layers"].values())
    # SR-STE: forward at density 1/2 on the sparse layers, both backward GEMMs dense (docs/methods.md)
    sparse = 2 * 8 * (32 * 32) * 2                  # steps x batch x MACs per sample x layers
    dense = 2 * 8 * (16 * 32 + 32 * 4)
    f = s["flops"]
    assert f["forward"] == sparse // 2 + dense and f["backward_data"] == f["backward_weight"] == sparse + dense
    assert f["dense_total"] == 3 * (sparse + dense)


def test_prune_is_the_engines_mask_in_place():
    torch.manual_seed(0)
    model = _mlp()
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in ("3", "5")}
    masks = nmtrain.prune(model, pattern="4:8", transposable=True)
    assert set(masks) == {"3", "5"}
    for name, mask in masks.items():
        assert torch.equal(mask, nmtrain.masks.transposable_mask(weights[name], 4, 8))
        w = model.get_submodule(name).weight
        assert nmtrain.masks.nm_violation(w, nmtrain.masks.parse_pattern("4:8-T")) is None
        assert torch.equal(w[mask], weights[name][mask]) and bool((w[~mask] == 0).all())
    assert not bool((model.get_submodule("1").weight == 0).any())      # the first layer stays dense


def test_oneshot_converts_in_place_as_nmtrain_adaprune_does():
    torch.manual_seed(0)
    model = _mlp().eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]
    magnitude = _mlp()
    magnitude.load_state_dict(model.state_dict())
    nmtrain.prune(magnitude, pattern="2:4")
    result = nmtrain.oneshot(model, [x for x, _ in calib], method="magnitude", pattern="2:4")
    for key, value in magnitude.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key       # magnitude one-shot = prune
    torch.manual_seed(0)
    model = _mlp().eval()
    x = torch.cat([b for b, _ in calib])
    dense_out = model(x).detach()
    result = nmtrain.oneshot(model, calib, method="sparsegpt", pattern="2:4", blocksize=16)
    assert set(result.masks) == {"3", "5"} and result.skipped == {"1": "first layer kept dense",
                                                                   "7": "classifier kept dense"}
    for name, mask in result.masks.items():
        assert nmtrain.masks.is_valid(model.get_submodule(name).weight, nmtrain.masks.parse_pattern("2:4"))
    # SparseGPT compensates: closer to the dense outputs than plain magnitude on the calibration inputs
    err = (model(x) - dense_out).norm() / dense_out.norm()
    err_magnitude = (magnitude(x) - dense_out).norm() / dense_out.norm()
    assert err < err_magnitude


@pytest.mark.parametrize("call, error, message", [
    (lambda m, o: nmtrain.sparsify(m, "nope", "2:4", o), nmtrain.ExperimentError,
     "method.name: 'nope' is unknown; use one of: bame, bimask,"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "4:2", o), nmtrain.SparsityError,
     "sparsity.pattern: N (weights kept) must be smaller than M"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", o, decay=-1), nmtrain.ExperimentError,
     "method.params.decay: "),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", o, bogus=1), nmtrain.ExperimentError,
     "method.params.bogus: unknown key"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", o, transposable=True), nmtrain.ExperimentError,
     "sparsity.transposable: method srste does not use transposable masks"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", o, layout="hwcn"), nmtrain.ExperimentError,
     "sparsity.layout: 'hwcn' is unknown"),
    (lambda m, o: nmtrain.sparsify(m, "transposable", "2:4", o, solver="fast"), nmtrain.ExperimentError,
     "sparsity.solver: "),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", o, include=["nothing*"]), nmtrain.ExperimentError,
     "sparsity.include: 'nothing*' matches no Conv2d/Linear layer"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4"), nmtrain.ExperimentError, "optimizer: pass the optimizer"),
    (lambda m, o: nmtrain.sparsify(m, "srste", "2:4", torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1)),
     nmtrain.ExperimentError, "optimizer: it does not hold 3.weight"),
    (lambda m, o: nmtrain.sparsify(m, "pgf", "2:4", o), nmtrain.ExperimentError,
     "total_steps: method pgf follows the run's length"),
    (lambda m, o: nmtrain.sparsify(m, "step", "2:4", o, total_steps=8), nmtrain.ExperimentError,
     "optim.name: method step needs optim.name adamw, not 'sgd'"),
    (lambda m, o: nmtrain.sparsify(torch.compile(m), "srste", "2:4", o), nmtrain.ExperimentError,
     "model: a torch.compile'd model cannot be sparsified"),
    (lambda m, o: nmtrain.prune(m, "2:4", solver="nope"), nmtrain.ExperimentError, "sparsity.solver: "),
    (lambda m, o: nmtrain.oneshot(m, [torch.randn(4, 16)], method="nope"), nmtrain.ExperimentError,
     "--method: 'nope' is unknown"),
    (lambda m, o: nmtrain.oneshot(m, [torch.randn(4, 16)], method="wanda", blocksize=8), nmtrain.ExperimentError,
     "--blocksize: --method wanda does not use it"),
    (lambda m, o: nmtrain.oneshot(m, [torch.randn(4, 16)], method="learned"), nmtrain.ExperimentError,
     "loss: method learned learns its masks on the task's loss"),
    (lambda m, o: nmtrain.oneshot(m, [], method="wanda"), nmtrain.ExperimentError, "calibration: no batch"),
])
def test_bad_arguments_raise_the_layers_error_in_one_line(call, error, message):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error) as caught:
        call(model, opt)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text
    assert not any("forward" in vars(mod) for mod in model.modules())     # nothing was attached


def test_the_cli_prints_the_same_line(tmp_path):
    result = run_cli("train", *QUICK, "--method", "nope", "--out", tmp_path / "run")
    assert result.exit_code == 2
    with pytest.raises(nmtrain.ExperimentError) as caught:
        nmtrain.sparsify(_mlp(), "nope", "2:4", torch.optim.SGD(_mlp().parameters(), lr=1))
    assert f"error: {caught.value}" in result.output


def test_import_nmtrain_is_light_and_lists_its_names():
    import subprocess
    import sys
    code = "import sys, nmtrain; assert 'torch' not in sys.modules; print(sorted(nmtrain.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sparsify" in out
    for name in nmtrain.__all__:
        assert getattr(nmtrain, name) is not None
    for name in nmtrain.masks.__all__:
        assert getattr(nmtrain.masks, name).__doc__ or name in ("SparsityError",), name


@pytest.mark.parametrize("method, options", [("sparsegpt", []), ("adaprune", ["--iters", "20", "--batch", "32"])])
def test_oneshot_is_what_nmtrain_adaprune_runs(tmp_path, method, options):
    from nmtrain.experiments.oneshot.calibration import calibration_set
    assert run_cli("train", *QUICK, "--method", "dense", "--out", tmp_path / "dense").exit_code == 0
    result = run_cli("adaprune", tmp_path / "dense", "--pattern", "2:4", "--method", method, "--calib-samples", 300,
                     "--calib-seed", 5, *options, "--out", tmp_path / "cli", "--no-progress")
    assert result.exit_code == 0, result.output
    spec = from_dict(Spec, yaml.safe_load((tmp_path / "dense" / "config.yaml").read_text()))
    torch.manual_seed(spec.seed)
    built = build(spec, augment=False, holdout=None)
    model = built.model
    model.load_state_dict(torch.load(tmp_path / "dense" / "model.pt", weights_only=True))
    calib = calibration_set(built.train_ds, 300, 5)           # the sample the CLI draws from the training split
    batches = [(calib.inputs[i:i + calib.batch], calib.targets[i:i + calib.batch])
               for i in range(0, len(calib), calib.batch)]
    api_options = {o.lstrip("-"): int(v) for o, v in zip(options[::2], options[1::2])}
    nmtrain.oneshot(model, batches, method=method, pattern="2:4", seed=5, **api_options)
    converted = torch.load(tmp_path / "cli" / "model.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, converted[key]), key


def test_sparsify_twice_and_odd_arguments_are_refused_or_read_as_meant():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = nmtrain.sparsify(model, "srste", "2:4", opt, include="3")          # one glob string: one glob
    assert list(handle.layers) == ["3"]
    with pytest.raises(nmtrain.ExperimentError, match="^model: it is already sparsified \\(layer 3"):
        nmtrain.sparsify(model, "srste", "2:4", opt)
    handle.remove()
    for seed in (-1, "a", 2 ** 63, True):
        with pytest.raises(nmtrain.ExperimentError, match="^seed: must be an integer"):
            nmtrain.sparsify(model, "srste", "2:4", opt, seed=seed)
    nmtrain.sparsify(model, "srste", "2:4", opt).remove()        # removed handles leave the model free


def test_the_mask_functions_raise_the_engines_error():
    w = torch.randn(8, 8)
    assert nmtrain.masks.is_valid(nmtrain.masks.nm_mask(w, 2, 4), "2:4")     # a pattern string is read
    assert nmtrain.masks.make_mask(w, "2:4-T").sum() == 32
    assert nmtrain.masks.pattern_diversity(4, 8, "2:4").count == 6 ** 8
    for call, message in [(lambda: nmtrain.masks.transposable_mask(w, 2, 4, solver="nope"), "solver 'nope' is unknown"),
                          (lambda: nmtrain.masks.unstructured_mask(w, 1.5), "density: must be in (0, 1]"),
                          (lambda: nmtrain.masks.kept_share(w, w[:4] > 0), "mask: shape (4, 8)"),
                          (lambda: nmtrain.masks.nm_violation(w, 24), "pattern: expected a Pattern")]:
        with pytest.raises(nmtrain.SparsityError, match=message.replace("(", "\\(").replace(")", "\\)")
                           .replace("[", "\\[").replace("]", "\\]")):
            call()
