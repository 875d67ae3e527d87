"""`nmtrain convert`: compressed N:M safetensors round trips, imports of masked state_dicts, bad input."""

import json

import pytest
import torch
import torch.nn.utils.prune
from safetensors import safe_open

from nmtrain.experiments.mask_import import import_masks
from nmtrain.sparsity import make_mask, nm_violation, parse_pattern

from helpers import run_cli


def _bits_equal(a: dict, b: dict) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.is_floating_point():
            x, y = x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)
        if not torch.equal(x, y):
            return False
    return True


def _masked(weight, pattern, layout, kept_zeros=True):
    mask = make_mask(weight, pattern, layout)
    out = weight * mask
    out[~mask] = 0
    if kept_zeros:                     # some groups keep fewer than N non-zeros, one of them -0.0
        kept = mask.nonzero()
        out[tuple(kept[0])] = 0.0
        out[tuple(kept[3])] = -0.0
    return out


def _state(pattern, layout, dtype=torch.float32):
    torch.manual_seed(0)
    return {
        "stem.weight": torch.randn(16, 3, 3, 3, dtype=dtype),                   # C_in=3: stays dense
        "conv.weight": _masked(torch.randn(16, 16, 3, 3, dtype=dtype), pattern, layout),
        "conv.bias": torch.randn(16, dtype=dtype),
        "bn.running_mean": torch.randn(16),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": _masked(torch.randn(16, 32, dtype=dtype), pattern, layout),
        "fc.bias": torch.randn(16, dtype=dtype),
    }


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("text", ["2:4", "1:4", "4:8", "2:4-T", "4:8-T"])
def test_compressed_round_trip_is_bit_exact(tmp_path, text, layout):
    pattern = parse_pattern(text)
    state = _state(pattern, layout)
    src = tmp_path / "model.pt"
    torch.save(state, src)
    comp, back = tmp_path / "model.safetensors", tmp_path / "back.pt"
    result = run_cli("convert", src, "--to", "compressed", "--out", comp, "--pattern", text, "--layout", layout)
    assert result.exit_code == 0, result.stderr
    assert "ratio" in result.stdout and "density" in result.stdout
    with safe_open(str(comp), framework="pt") as fh:
        meta = json.loads(fh.metadata()["nmtrain"])
        assert set(meta["layers"]) == {"conv.weight", "fc.weight"}
        assert meta["layers"]["fc.weight"] == {"pattern": str(pattern), "density": pattern.density, "layout": layout,
                                               "shape": [16, 32], "dtype": "float32"}
        values, indices = fh.get_tensor("fc.weight::values"), fh.get_tensor("fc.weight::indices")
        assert values.shape == (16, 32 * pattern.n // pattern.m) and indices.dtype == torch.uint8
        assert int(indices.max()) < pattern.m
        assert fh.get_tensor("conv.weight::values").shape == (16, 16 * 9 * pattern.n // pattern.m)
        assert "stem.weight" in fh.keys()
    assert comp.stat().st_size < src.stat().st_size
    result = run_cli("convert", comp, "--to", "dense", "--out", back)
    assert result.exit_code == 0, result.stderr
    assert _bits_equal(torch.load(back, weights_only=True), state)
    # compressed -> compressed again is identical too
    again = tmp_path / "again.safetensors"
    assert run_cli("convert", back, "--to", "compressed", "--out", again, "--pattern", text,
                "--layout", layout).exit_code == 0
    assert again.read_bytes() == comp.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_keeps_other_dtypes(tmp_path, dtype):
    pattern = parse_pattern("2:4")
    state = _state(pattern, "nhwc", dtype)
    torch.save(state, tmp_path / "m.pt")
    assert run_cli("convert", tmp_path / "m.pt", "--to", "compressed", "--pattern", "2:4",
                "--out", tmp_path / "m.safetensors").exit_code == 0
    assert run_cli("convert", tmp_path / "m.safetensors", "--to", "dense", "--out", tmp_path / "b.pt").exit_code == 0
    assert _bits_equal(torch.load(tmp_path / "b.pt", weights_only=True), state)


def test_pruned_negative_zero_comes_back_as_positive_zero(tmp_path):
    w = torch.randn(8, 16)
    mask = make_mask(w, parse_pattern("2:4"))
    state = {"fc.weight": w * mask}                  # pruned negatives become -0.0
    assert torch.signbit(state["fc.weight"][~mask]).any()
    torch.save(state, tmp_path / "m.pt")
    result = run_cli("convert", tmp_path / "m.pt", "--to", "compressed", "--pattern", "2:4", "--out", tmp_path / "c.safetensors")
    assert result.exit_code == 0 and "-0.0" in result.stdout
    run_cli("convert", tmp_path / "c.safetensors", "--to", "dense", "--out", tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)["fc.weight"]
    assert torch.equal(back, state["fc.weight"]) and not torch.signbit(back[~mask]).any()


def _run_dir(tmp_path, state, layers):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "model.pt")
    (run / "summary.json").write_text(json.dumps({"sparse_layers": layers}))
    return run


def test_run_directory_uses_its_summary_and_a_violation_is_an_error(tmp_path):
    pattern = parse_pattern("2:4-T")
    state = _state(pattern, "flatten")
    info = {"pattern": "2:4-T", "density": 0.5, "transposable": True, "layout": "flatten"}
    run = _run_dir(tmp_path, state, {"conv.weight": info, "fc.weight": info})
    result = run_cli("convert", run, "--to", "compressed", "--out", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.stderr
    assert run_cli("convert", tmp_path / "c.safetensors", "--to", "dense", "--out", tmp_path / "b.pt").exit_code == 0
    assert _bits_equal(torch.load(tmp_path / "b.pt", weights_only=True), state)

    bad = dict(state, **{"fc.weight": torch.randn(16, 32)})          # declared N:M, but dense
    (run / "model.pt").unlink()
    torch.save(bad, run / "model.pt")
    for to in ("compressed", "dense"):
        out = tmp_path / f"bad-{to}"
        result = run_cli("convert", run, "--to", to, "--out", out)
        assert result.exit_code == 2 and "fc.weight breaks its declared pattern 2:4-T" in result.stderr
        assert result.stderr.count("\n") == 1 and not out.exists()
        assert not list(tmp_path.glob(".*.tmp"))


def test_torch_prune_pairs_import(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    mask = make_mask(net[0].weight.detach(), parse_pattern("2:4"))
    torch.nn.utils.prune.custom_from_mask(net[0], "weight", mask)
    state = net.state_dict()
    assert "0.weight_orig" in state and "0.weight_mask" in state
    torch.save(state, tmp_path / "p.pt")
    result = run_cli("convert", tmp_path / "p.pt", "--to", "dense", "--out", tmp_path / "d.pt")
    assert result.exit_code == 0, result.stderr
    assert "torch.nn.utils.prune" in result.stdout
    plain = torch.load(tmp_path / "d.pt", weights_only=True)
    assert list(plain) == ["0.bias", "0.weight", "2.weight", "2.bias"]   # the weight where weight_orig was
    assert torch.equal(plain["0.weight"], net[0].weight.detach())
    assert nm_violation(plain["0.weight"], parse_pattern("2:4")) is None
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    fresh.load_state_dict(plain)
    # ... and straight to compressed, declaring the pattern
    result = run_cli("convert", tmp_path / "p.pt", "--to", "compressed", "--pattern", "2:4", "--out", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.stderr


def test_mask_buffer_imports():
    w1, w2, w3 = torch.randn(8, 16), torch.randn(8, 8, 3, 3), torch.randn(8, 8)
    m1, m2, m3 = (make_mask(w, parse_pattern("2:4")) for w in (w1, w2, w3))
    state = {"a.weight": w1, "a.weight_mask": m1.float(), "b.weight": w2, "b.mask": m2,
             "c.weight": w3, "c.__weight_mma_mask": m3, "c.bias": torch.zeros(8)}
    out, notes = import_masks(state)
    assert list(out) == ["a.weight", "b.weight", "c.weight", "c.bias"] and len(notes) == 3
    for name, w, m in (("a.weight", w1, m1), ("b.weight", w2, m2), ("c.weight", w3, m3)):
        assert torch.equal(out[name], w * m) and not torch.signbit(out[name][~m]).any()


def test_truncated_safetensors_is_one_line_exit_2(tmp_path):
    state = _state(parse_pattern("2:4"), "nhwc")
    torch.save(state, tmp_path / "m.pt")
    comp = tmp_path / "c.safetensors"
    assert run_cli("convert", tmp_path / "m.pt", "--to", "compressed", "--pattern", "2:4", "--out", comp).exit_code == 0
    data = comp.read_bytes()
    for cut in (len(data) // 2, 5):
        comp.write_bytes(data[:cut])
        out = tmp_path / "b.pt"
        result = run_cli("convert", comp, "--to", "dense", "--out", out)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--to", "compressed", "--pattern", "1:8"], "no tensor of SOURCE holds 1:8"),
    (["--to", "compressed", "--pattern", "2:5"], "no tensor of SOURCE holds 2:5"),
    (["--to", "compressed", "--pattern", "4:2"], "smaller than M"),
    (["--to", "sparse"], "--to 'sparse' is unknown"),
    (["--to", "dense", "--layout", "nchw"], "--layout 'nchw' is unknown"),
])
def test_bad_options(tmp_path, args, needle):
    torch.save(_state(parse_pattern("2:4"), "nhwc"), tmp_path / "m.pt")
    out = tmp_path / "out.bin"
    result = run_cli("convert", tmp_path / "m.pt", *args, "--out", out)
    assert result.exit_code == 2 and needle in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_semi_structured_without_cuda_says_why(tmp_path):
    torch.save(_state(parse_pattern("2:4"), "nhwc"), tmp_path / "m.pt")
    result = run_cli("convert", tmp_path / "m.pt", "--to", "semi-structured", "--pattern", "2:4")
    assert result.exit_code == 2 and "compute capability >= 8.0" in result.stderr and "no CUDA" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.gpu
def test_semi_structured_on_gpu(tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs compute capability >= 8.0")
    w = torch.randn(256, 512)
    state = {"fc.weight": w * make_mask(w, parse_pattern("2:4")), "fc.bias": torch.zeros(256)}
    torch.save(state, tmp_path / "m.pt")
    out = tmp_path / "lat.json"
    result = run_cli("convert", tmp_path / "m.pt", "--to", "semi-structured", "--pattern", "2:4", "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    report = json.loads(out.read_text())
    row = report["layers"]["fc.weight"]
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and row["max_abs_diff"] < 1e-1
