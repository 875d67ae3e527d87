"""`accel: semi_structured` (experiments/accel.py): spec checks, the constraint table, the custom autograd
Function's mathematics on CPU (with a dense stand-in for compression), the compression cache, the
masked-dense fallback (bit-identical to accel none, one warning), and, with CUDA, the real 2:4 kernels."""

import json
import time
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nmtrain.cli.main import app
from nmtrain.experiments import accel
from nmtrain.experiments.layers import gemm
from nmtrain.experiments.methods import Context, attach, build_params, get_method
from nmtrain.experiments.methods.ste import ste_mask
from nmtrain.experiments.runner import validate
from nmtrain.experiments.spec import SpecError, load_spec
from nmtrain.sparsity import Pattern, nm_violation, transposable_mask

from helpers import ROOT, assert_refused, cli, quick_train

TRANSPOSABLE = ["--method", "transposable", "--pattern", "2:4-T"]


def _rel(a, b):
    """Relative error in the Frobenius norm."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- the spec ---------------------------------------------------------------------------------


def test_accel_defaults_to_none_and_reads_from_yaml_and_overrides(tmp_path):
    assert load_spec(None).accel == "none"
    path = tmp_path / "spec.yaml"
    path.write_text("accel: semi_structured\nmethod:\n  name: transposable\n")
    spec = load_spec(path)
    assert spec.accel == "semi_structured"
    validate(spec)                                        # 2:4 default pattern, transposable forced
    spec = load_spec(None, ["accel=semi_structured", "method.name=transposable"])
    assert spec.accel == "semi_structured"
    validate(spec)


@pytest.mark.parametrize("args,needle", [
    (["accel=fast", *TRANSPOSABLE], "accel: 'fast' is unknown; use one of: none, semi_structured"),
    (["accel=Semi_Structured", *TRANSPOSABLE], "accel: 'Semi_Structured' is unknown"),
    (["accel=semi_structured", "--method", "srste", "--pattern", "2:4"],
     "accel: semi_structured runs only with method transposable"),
    (["accel=semi_structured", "--method", "dense"], "use --method transposable --pattern 2:4-T"),
    (["accel=semi_structured", "--method", "transposable", "--pattern", "4:8-T"],
     "accel: semi_structured needs pattern 2:4 (the sparse tensor cores' only pattern), not 4:8-T"),
    (["accel=semi_structured", "--method", "transposable", "--pattern", "1:4"], "not 1:4-T; use --pattern 2:4-T"),
])
def test_bad_accel_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "run"
    assert_refused(quick_train(out, *args), needle)
    assert not out.exists()


def test_check_spec_directly():
    accel.check_spec("none", get_method("srste"), Pattern(4, 8))      # accel none never constrains method or pattern
    accel.check_spec("semi_structured", get_method("transposable"), Pattern(2, 4, True))
    with pytest.raises(SpecError, match=r"^accel: semi_structured needs pattern 2:4"):
        accel.check_spec("semi_structured", get_method("transposable"), Pattern(2, 8, True))


# --- the constraint table ---------------------------------------------------------------------


@pytest.mark.parametrize("backend,cls", [("cusparselt", "SparseSemiStructuredTensorCUSPARSELT"),
                                         ("cutlass", "SparseSemiStructuredTensorCUTLASS")])
def test_table_matches_the_installed_torch(backend, cls):
    torch_table = getattr(torch.sparse, cls)._DTYPE_SHAPE_CONSTRAINTS
    for dtype, (rows, cols) in accel.BACKENDS[backend].shapes.items():
        assert (torch_table[dtype].sparse_min_rows, torch_table[dtype].sparse_min_cols) == (rows, cols), dtype


@pytest.mark.parametrize("backend,out_f,in_f,dtype,reason", [
    ("cusparselt", 64, 128, torch.bfloat16, None),
    ("cusparselt", 16, 16, torch.float16, None),
    ("cusparselt", 64, 100, torch.bfloat16, "in_features=100 not a multiple of 16"),
    ("cusparselt", 8, 64, torch.bfloat16, "out_features=8 not a multiple of 16"),
    ("cusparselt", 24, 40, torch.bfloat16, "in_features=40 and out_features=24 not a multiple of 16"),
    ("cutlass", 128, 256, torch.bfloat16, None),
    # CUTLASS compresses 32 x 64 blocks; as W~ and W~^T are both compressed, each side needs 64
    ("cutlass", 96, 256, torch.bfloat16, "out_features=96 not a multiple of 64 (cutlass bfloat16 needs 32 x 64"),
    ("cusparselt", 96, 256, torch.bfloat16, None),
    ("cusparselt", 64, 64, torch.float32, "dtype float32: the 2:4 kernels compute in bfloat16, float16"),
])
def test_shape_and_dtype_reasons(backend, out_f, in_f, dtype, reason):
    got = accel.shape_reason(out_f, in_f, dtype, accel.BACKENDS[backend])
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_no_cuda_reason_on_cpu():
    reason = accel.linear_unsupported(256, 256, "cpu")
    assert reason == "no CUDA: the layer is on cpu (2:4 sparse kernels run on NVIDIA GPUs only)"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device of a chosen compute capability exists (the checks before any kernel runs)."""
    def set_capability(major, minor):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    return set_capability


def test_gpu_reasons_in_order(fake_gpu, monkeypatch):
    fake_gpu(7, 5)
    assert accel.linear_unsupported(256, 256, "cuda", probe=False) == \
        "compute capability 7.5 < 8.0 (sparse tensor cores need Ampere or newer)"
    fake_gpu(9, 0)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert accel.linear_unsupported(256, 256, "cuda", probe=False) is None
    assert "dtype float32" in accel.linear_unsupported(256, 256, "cuda", dtype=torch.float32, probe=False)
    assert "in_features=40" in accel.linear_unsupported(256, 40, "cuda", probe=False)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "this torch build has no cuSPARSELt" in accel.linear_unsupported(256, 256, "cuda", probe=False)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    assert accel.backend_name() == "cutlass"
    assert "cutlass 2:4 kernels are built for compute capability 8.x only, this GPU is 9.0" in \
        accel.linear_unsupported(256, 256, "cuda", probe=False)
    fake_gpu(8, 6)
    assert accel.linear_unsupported(256, 256, "cuda", probe=False) is None
    assert "not a multiple of 64" in accel.linear_unsupported(256, 96, "cuda", probe=False)


def test_probe_failure_is_a_reason():
    def broken(t):
        raise RuntimeError("CUDA error: architecture mismatch when calling `cusparseLtInit(&handle)`\nmore")
    # the probe itself is device-agnostic: run it on CPU with stand-ins for compress
    reason = accel._probe(torch.device("cpu"), torch.bfloat16, accel.BACKENDS["cusparselt"], broken)
    assert reason == ("a cusparselt probe product failed: CUDA error: architecture mismatch when calling "
                      "`cusparseLtInit(&handle)`")
    wrong = accel._probe(torch.device("cpu"), torch.bfloat16, accel.BACKENDS["cusparselt"], torch.zeros_like)
    assert wrong.startswith("a cusparselt probe product was off by 1 (relative)")
    assert accel._probe(torch.device("cpu"), torch.bfloat16, accel.BACKENDS["cusparselt"], _identity) is None


def test_missing_torch_api_is_a_reason(monkeypatch):
    monkeypatch.delattr(torch.sparse, "to_sparse_semi_structured")
    assert accel.linear_unsupported(256, 256, "cuda") == \
        f"torch {torch.__version__} lacks torch.sparse.to_sparse_semi_structured"


# --- the autograd Function, with a dense stand-in for compress --------------------------------


def _identity(t):
    return t


class _Recorder:
    """A dense 'compress' that checks its operand is 2:4 along rows, as the hardware needs, and keeps it."""

    def __init__(self):
        self.calls = []

    def __call__(self, t):
        assert t.is_contiguous() and t.dim() == 2
        assert nm_violation(t, Pattern(2, 4)) is None
        self.calls.append(t.clone())
        return t


def _layer(out_f=16, in_f=32, dtype=torch.float64, bias=True):
    torch.manual_seed(1)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    mask = transposable_mask(lin.weight, 2, 4)
    return lin, mask


def _masked_dense(lin, mask, x, decay):
    """What the transposable method does without accel: autograd through ste_mask and the layer's GEMM."""
    lin.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = gemm(lin, x, ste_mask(lin.weight, mask, decay))
    return y, x


@pytest.mark.parametrize("decay", [0.0, 0.05])
@pytest.mark.parametrize("bias", [True, False])
def test_function_matches_masked_dense_autograd_exactly_in_float64(decay, bias):
    lin, mask = _layer(bias=bias)
    x = torch.randn(3, 5, 32, dtype=torch.float64)                 # leading batch dims get flattened
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    y_ref, x_ref = _masked_dense(lin, mask, x, decay)
    y_ref.backward(g)
    ref = {"y": y_ref.detach(), "dx": x_ref.grad, "dw": lin.weight.grad.clone(),
           "db": None if lin.bias is None else lin.bias.grad.clone()}

    rec = _Recorder()
    layer = accel.SparseLinear(torch.float64, rec)
    lin.zero_grad(set_to_none=True)
    xs = x.detach().clone().requires_grad_(True)
    y = layer(xs, lin.weight, lin.bias, mask, decay)
    y.backward(g)
    assert y.shape == (3, 5, 16) and y.dtype == torch.float64
    assert torch.allclose(y, ref["y"], rtol=0, atol=1e-12)
    assert torch.allclose(xs.grad, ref["dx"], rtol=0, atol=1e-12)
    assert torch.allclose(lin.weight.grad, ref["dw"], rtol=0, atol=1e-12)
    if bias:
        assert torch.allclose(lin.bias.grad, ref["db"], rtol=0, atol=1e-12)
    # the pruned weights' gradient is the dense dY^T X plus the decay term (not zero: straight through)
    dense_dw = g.reshape(-1, 16).t() @ x.reshape(-1, 32)
    assert torch.allclose(lin.weight.grad, dense_dw + decay * (~mask) * lin.weight.detach(), atol=1e-12)
    # forward compressed W~, backward compressed W~^T: both 2:4 along their rows (checked by the recorder)
    w_tilde = lin.weight.detach() * mask
    assert len(rec.calls) == 2
    assert torch.equal(rec.calls[0], w_tilde) and torch.equal(rec.calls[1], w_tilde.t().contiguous())


def test_function_in_bfloat16_is_within_bf16_tolerance_of_float32_masked_dense():
    lin, mask = _layer(64, 128, torch.float32)
    x = torch.randn(48, 128)
    g = torch.randn(48, 64)
    y_ref, x_ref = _masked_dense(lin, mask, x, 2e-4)
    y_ref.backward(g)
    dw_ref, db_ref = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    y = accel.SparseLinear(torch.bfloat16, _identity)(xs, lin.weight, lin.bias, mask, 2e-4)
    assert y.dtype == torch.float32                      # computed in bf16, handed back in x's dtype
    y.backward(g)
    assert xs.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    for got, want in ((y, y_ref), (xs.grad, x_ref.grad), (lin.weight.grad, dw_ref)):
        err = _rel(got, want)
        assert 0 < err < 1e-2, err                       # bf16 rounding is there, and small
    assert torch.allclose(lin.bias.grad, db_ref, rtol=1e-6, atol=1e-6)   # dY summed in x's dtype
    assert _rel(y, y_ref) > 1e-5                         # the product really ran in bf16


def test_only_the_needed_gradients_and_operands_are_computed():
    lin, mask = _layer()
    rec = _Recorder()
    layer = accel.SparseLinear(torch.float64, rec)
    lin.weight.requires_grad_(False)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    layer(x, lin.weight, lin.bias, mask).sum().backward()
    assert x.grad is not None and lin.weight.grad is None and lin.bias.grad is not None
    assert len(rec.calls) == 2
    lin.weight.requires_grad_(True)
    x2 = torch.randn(4, 32, dtype=torch.float64)         # an input without grad (the first layer's data)
    layer(x2, lin.weight, lin.bias, mask).sum().backward()
    assert lin.weight.grad is not None
    assert len(rec.calls) == 2                           # nothing changed: no new compression at all


def test_output_allows_an_in_place_activation_and_keeps_batch_dims():
    lin, mask = _layer(dtype=torch.float32)
    x = torch.randn(2, 3, 32, requires_grad=True)
    for bias in (lin.bias, None):
        y = torch.relu_(accel.SparseLinear(torch.float32, _identity)(x, lin.weight, bias, mask))
        y.sum().backward()
        want = torch.relu(F.linear(x.detach(), lin.weight.detach() * mask, None if bias is None else bias.detach()))
        assert y.shape == (2, 3, 16) and torch.allclose(y, want, atol=1e-6)


# --- the compression cache --------------------------------------------------------------------


def test_compression_is_cached_per_weight_and_mask_version():
    lin, mask = _layer(dtype=torch.float32)
    layer = accel.SparseLinear(torch.float32, _identity)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)

    def step(x):
        opt.zero_grad(set_to_none=True)
        layer(x, lin.weight, lin.bias, mask).square().sum().backward()

    x = torch.randn(8, 32, requires_grad=True)          # a hidden layer's input: dX (and W~^T) needed
    step(x)
    assert layer.compressions == 2                       # W~ in forward, W~^T in backward
    with torch.no_grad():
        y_eval = layer(x, lin.weight, lin.bias, mask)    # evaluation reuses the forward operand
    assert layer.compressions == 2
    opt.step()                                           # bumps the weight's version: stale
    with torch.no_grad():
        y_after = layer(x, lin.weight, lin.bias, mask)
    assert layer.compressions == 3
    assert torch.allclose(y_after, F.linear(x, lin.weight.detach() * mask, lin.bias.detach()), atol=1e-6)
    assert not torch.allclose(y_after, y_eval)
    step(x)
    assert layer.compressions == 4                       # forward operand fresh; W~^T rebuilt once
    new_mask = transposable_mask(lin.weight.detach() + 0.1 * torch.randn_like(lin.weight), 2, 4)
    assert not torch.equal(new_mask, mask)
    mask = new_mask                                      # a recomputed mask is a new tensor
    step(x)
    assert layer.compressions == 6
    mask.copy_(transposable_mask(-lin.weight.detach(), 2, 4))   # in place: the mask's version changes
    with torch.no_grad():
        y = layer(x, lin.weight, lin.bias, mask)
    assert layer.compressions == 7
    assert torch.allclose(y, F.linear(x, lin.weight.detach() * mask, lin.bias.detach()), atol=1e-6)
    layer.invalidate()
    with torch.no_grad():
        layer(x, lin.weight, lin.bias, mask)
    assert layer.compressions == 8


def test_changing_the_weight_between_forward_and_backward_is_refused():
    lin, mask = _layer(dtype=torch.float32)
    layer = accel.SparseLinear(torch.float32, _identity)
    y = layer(torch.randn(4, 32), lin.weight, lin.bias, mask)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --- the transposable method and the runner ---------------------------------------------------


def _method(layers, accel_mode="semi_structured", decay=2e-4):
    cls = get_method("transposable")
    ctx = Context(layers=layers, pattern=Pattern(2, 4, True), layout="nhwc", solver="exact", total_steps=10,
                  steps_per_epoch=5, accel=accel_mode)
    return cls(build_params(cls, {"decay": decay}), ctx)


def _attached(layers, accel_mode="semi_structured", decay=2e-4):
    """``_method`` with the layers' forward routed through it until the block ends."""
    return attach("transposable", layers, Pattern(2, 4, True), {"decay": decay}, total_steps=10,
                  steps_per_epoch=5, accel=accel_mode)


@pytest.fixture
def dense_stand_in(monkeypatch):
    """Make every Linear 'supported' and compress with the identity: the method's sparse branch on CPU."""
    monkeypatch.setattr(accel, "linear_unsupported", lambda *a, **k: None)
    monkeypatch.setattr(accel, "compress_semi_structured", _identity)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(),
                         nn.Linear(64, 32)).double()


def test_method_routes_linear_layers_sparse_and_conv_masked_dense(dense_stand_in):
    x = torch.randn(6, 4, 4, 4, dtype=torch.float64)
    grads = {}
    for mode in ("none", "semi_structured"):
        net = _net()
        layers = {"0": net[0], "2": net[2], "4": net[4]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _attached(layers, mode) as method:
                if mode == "semi_structured":
                    for layer in method.accel.sparse.values():
                        layer.dtype = torch.float64              # exact comparison; the real path computes in bf16
                    report = method.accel_report()
                    assert report["sparse_layers"] == ["2", "4"] and report["fallback"] == {"0": accel.CONV_REASON}
                    assert [str(w.message) for w in caught if w.category is accel.AccelFallbackWarning] == [
                        f"accel semi_structured: 1 of 3 sparse layers run masked dense instead of the 2:4 kernels "
                        f"(0: {accel.CONV_REASON})"]
                else:
                    assert method.accel_report() is None and not caught
                method.before_step(0)
                net(x).square().sum().backward()
                grads[mode] = {k: p.grad.clone() for k, p in net.named_parameters()}
                if mode == "semi_structured":
                    assert sum(layer.compressions for layer in method.accel.sparse.values()) == 4
    for k in grads["none"]:
        assert torch.allclose(grads["semi_structured"][k], grads["none"][k], rtol=0, atol=1e-10), k


def test_cpu_fallback_is_bit_identical_to_accel_none_and_warns_once(tmp_path):
    runs = {}
    for mode in ("none", "semi_structured"):
        out = tmp_path / mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = quick_train(out, *TRANSPOSABLE, "device=cpu", f"accel={mode}")
        assert result.exit_code == 0, result.stderr + result.stdout
        fallback = [w for w in caught if w.category is accel.AccelFallbackWarning]
        runs[mode] = (out, fallback)
    (none, w_none), (semi, w_semi) = runs["none"], runs["semi_structured"]
    assert w_none == [] and len(w_semi) == 1             # once per run, not once per step
    assert "3: no CUDA" in str(w_semi[0].message)
    a = torch.load(none / "model.pt", weights_only=True)
    b = torch.load(semi / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (none / "metrics.jsonl").read_text() == (semi / "metrics.jsonl").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (none, semi))
    assert sa["accel"] == {"mode": "none", "sparse_layers": [], "fallback": {}}
    assert sb["accel"]["mode"] == "semi_structured" and sb["accel"]["sparse_layers"] == []
    assert sb["accel"]["fallback"] == {"3": "no CUDA: the layer is on cpu (2:4 sparse kernels run on NVIDIA GPUs only)"}
    for key in ("final_accuracy", "sparse_layers", "skipped_layers", "train_flops", "steps"):
        assert sa[key] == sb[key], key


def test_sparse_branch_trains_through_the_runner_on_cpu(tmp_path, dense_stand_in):
    """With the dense stand-in the runner's whole loop goes through the custom Function (bf16 compute)."""
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = quick_train(out, *TRANSPOSABLE, "device=cpu", "accel=semi_structured")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert not [w for w in caught if w.category is accel.AccelFallbackWarning]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accel"]["sparse_layers"] == ["3"] and summary["accel"]["fallback"] == {}
    assert summary["accel"]["compute_dtype"] == "bfloat16"
    assert summary["final_accuracy"] > 30.0
    model = torch.load(out / "model.pt", weights_only=True)
    assert nm_violation(model["3.weight"], Pattern(2, 4, True)) is None


# --- the real kernels (CUDA) ------------------------------------------------------------------


def _require_sparse_gpu(out_f=128, in_f=128):
    reason = accel.linear_unsupported(out_f, in_f, "cuda")
    if reason is not None:
        pytest.skip(f"no 2:4 kernels here: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("out_f,in_f,tokens", [(128, 128, 64), (256, 512, 100), (1024, 256, 333),
                                               (512, 1024, 256), (1024, 1024, 1000)])
def test_gpu_sparse_matches_masked_dense(out_f, in_f, tokens):
    _require_sparse_gpu(out_f, in_f)
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f).cuda()
    mask = transposable_mask(lin.weight, 2, 4)
    x = torch.randn(tokens, in_f, device="cuda")
    g = torch.randn(tokens, out_f, device="cuda")
    y_ref, x_ref = _masked_dense(lin, mask, x, 2e-4)
    y_ref.backward(g)
    ref = (y_ref.detach(), x_ref.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    layer = accel.SparseLinear()
    y = layer(xs, lin.weight, lin.bias, mask, 2e-4)
    y.backward(g)
    for what, got, want in zip(("y", "dX", "dW", "db"), (y, xs.grad, lin.weight.grad, lin.bias.grad), ref):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        assert _rel(got, want) < 1e-2, (what, _rel(got, want))
    assert layer.compressions == 2
    # the compressed operands are real semi-structured tensors
    assert isinstance(layer._s, torch.sparse.SparseSemiStructuredTensor)
    assert isinstance(layer._s_t, torch.sparse.SparseSemiStructuredTensor)


@pytest.mark.gpu
def test_gpu_cache_follows_optimizer_steps():
    _require_sparse_gpu(256, 256)
    lin = nn.Linear(256, 256).cuda()
    mask = transposable_mask(lin.weight, 2, 4)
    layer = accel.SparseLinear()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)   # foreach on CUDA
    x = torch.randn(64, 256, device="cuda", requires_grad=True)      # dX needed: W~^T compressed too
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        layer(x, lin.weight, lin.bias, mask).square().mean().backward()
        opt.step()
        assert layer.compressions == 2 * (i + 1)
    with torch.no_grad():
        y = layer(x, lin.weight, lin.bias, mask)
        want = F.linear(x, lin.weight * mask, lin.bias)
    assert _rel(y, want) < 1e-2


@pytest.mark.gpu
def test_gpu_training_run_reports_sparse_layers(tmp_path):
    _require_sparse_gpu(256, 256)
    out = tmp_path / "run"
    result = quick_train(out, *TRANSPOSABLE, "device=cuda", "accel=semi_structured")
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accel"]["sparse_layers"] == ["3"] and summary["accel"]["fallback"] == {}
    assert summary["accel"]["backend"] in ("cusparselt", "cutlass")
    assert summary["final_accuracy"] > 30.0
    model = torch.load(out / "model.pt", weights_only=True)
    assert nm_violation(model["3.weight"], Pattern(2, 4, True)) is None


# --- benchmarks/sparse_training.py ------------------------------------------------------------


def _load_benchmark():
    import importlib.util
    path = ROOT / "benchmarks" / "sparse_training.py"
    spec = importlib.util.spec_from_file_location("sparse_training_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_without_a_gpu_prints_the_reason_and_exits_0(capsys, tmp_path):
    bench = _load_benchmark()
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == ("sparse_training: the 2:4 sparse path cannot run on cpu: no CUDA: the layer "
                                       "is on cpu (2:4 sparse kernels run on NVIDIA GPUs only); nothing measured\n")
    assert not (tmp_path / "b").exists()


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1000.0


def test_benchmark_runs_end_to_end_with_a_dense_stand_in(monkeypatch, tmp_path, dense_stand_in):
    """Every code path of the benchmark but the kernels: CPU, tiny sizes, the identity for compress."""
    bench = _load_benchmark()
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    out = tmp_path / "b"
    code = bench.main(["--device", "cpu", "--tokens", "32", "--sizes", "64,128", "--mlp-dims", "32",
                       "--vit-dim", "64", "--vit-depth", "1", "--vit-batch", "2", "--warmup", "1", "--repeats", "2",
                       "--out", str(out)])
    assert code == 0
    data = json.loads((out / "sparse_training.json").read_text())
    assert data["device"] == "stand-in" and data["torch"] == torch.__version__
    cases = [(r["case"], r["size"]) for r in data["rows"]]
    assert cases == [("linear fwd+bwd", "64x64"), ("linear fwd+bwd", "128x128"), ("MLP block fwd+bwd", "32-128-32"),
                     ("ViT train step (4 sparse layers)", "d=64 x1")]
    for r in data["rows"]:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    for r in data["rows"][:3]:
        assert 0 <= r["rel_err"] < 2e-2                 # bf16 stand-in against bf16 masked dense (equal on CPU)
    lines = (out / "sparse_training.csv").read_text().splitlines()
    assert lines[0].split(",") == list(bench.COLUMNS) and len(lines) == 5


def test_benchmark_masks_are_transposable():
    bench = _load_benchmark()
    assert len(bench._tile_patterns()) == 90
    mask = bench.random_transposable_mask(16, 32, "cpu")
    assert nm_violation(mask, Pattern(2, 4, True), exact=True) is None


def test_the_shipped_vit_spec_trains_with_accel_and_reports_every_fallback(tmp_path):
    # fmnist_vit.yaml on the synthetic stand-in (same image shape): the ViT's 24 block Linear layers are
    # the accel layers; on CPU each falls back, named in summary.json, and training still learns.
    from nmtrain.experiments.spec import shipped_specs
    spec = next(p for p in shipped_specs() if p.name == "fmnist_vit.yaml")
    out = tmp_path / "vit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli.invoke(app, ["train", str(spec), "data.dataset=synthetic", "data.batch_size=32", "train.epochs=3",
                                  "schedule.warmup_epochs=0.5", "model.width=0.5", "device=cpu", "--out", str(out),
                                  "--no-progress"])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert len([w for w in caught if w.category is accel.AccelFallbackWarning]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accel"]["mode"] == "semi_structured" and summary["accel"]["sparse_layers"] == []
    fallback = summary["accel"]["fallback"]
    assert len(fallback) == 24 and set(fallback.values()) == {
        "no CUDA: the layer is on cpu (2:4 sparse kernels run on NVIDIA GPUs only)"}
    assert "blocks.5.fc2" in fallback and "embed" not in fallback and "head" not in fallback
    # it learns: the train loss falls every epoch and the accuracy is above chance (10 classes; 23% measured
    # after these 48 steps; on Fashion-MNIST one epoch gives 79.7%)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert summary["final_accuracy"] > 15.0
    model = torch.load(out / "model.pt", weights_only=True)
    assert nm_violation(model["blocks.0.attn.qkv.weight"], Pattern(2, 4, True)) is None


def test_the_warning_names_a_few_layers_per_reason_and_counts_the_rest():
    plan = accel.AccelPlan("semi_structured", fallback={f"blocks.{i}.fc1": "no CUDA" for i in range(7)})
    plan.fallback["stem"] = accel.CONV_REASON
    assert plan.warning() == ("accel semi_structured: 8 of 8 sparse layers run masked dense instead of the 2:4 "
                              "kernels (blocks.0.fc1, blocks.1.fc1, blocks.2.fc1, blocks.3.fc1 and 3 more: no CUDA; "
                              f"stem: {accel.CONV_REASON})")
    assert len(plan.report()["fallback"]) == 8


def test_cli_prints_the_fallback_warning_as_one_plain_line(capsys):
    from nmtrain.cli.main import _show_warning
    _show_warning(accel.AccelFallbackWarning("accel semi_structured: 1 of 1 sparse layers run masked dense"),
                  accel.AccelFallbackWarning, "runner.py", 355)
    assert capsys.readouterr().err == "warning: accel semi_structured: 1 of 1 sparse layers run masked dense\n"
