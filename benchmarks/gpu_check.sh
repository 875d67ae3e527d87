#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run (about 5 minutes on an H100/H200):
#   1. the GPU tests (pytest -m gpu: accel's sparse path against masked dense, semi-structured convert,
#      solvers on CUDA) and the CPU tests of the accel/convert/solver files on the GPU machine's torch;
#   2. benchmarks/sparse_training.py: forward+backward per Linear layer, MLP block, ViT step, sparse vs dense;
#   3. benchmarks/masks.py --device cuda: the transposable solvers on the GPU (2:4, 4:8, 8:16);
#   4. nmtrain convert --to semi-structured on a pruned Linear checkpoint (latency vs dense);
#   5. the shipped ViT spec (fmnist_vit.yaml) through `nmtrain train` with and without the 2:4 kernels.
#
#   bash benchmarks/gpu_check.sh                  # logs, JSON and CSV under $RESULTS (default bench-results/gpu)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Through the device tool (which brings back at most 8 files from its $OUT), one call:
#   RESULTS=/tmp/gc bash benchmarks/gpu_check.sh; tar -czf $OUT/gpu_check.tgz -C /tmp gc
#
# It does not install anything: PYTHON must already have torch, numba, networkx, typer, rich, pyyaml,
# safetensors, matplotlib, pytest and hypothesis (a GPU machine's image usually does). nmtrain itself is
# put on the import path through links, so no build step is needed. Each step runs even if one before
# failed; the exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench-results/gpu}
mkdir -p "$RESULTS"

# `import nmtrain.sparsity` etc. from this checkout, as the installed package would (pyproject's package-dir)
site=$(mktemp -d)
mkdir "$site/nmtrain"
for d in cli experiments sparsity data; do ln -s "$PWD/$d" "$site/nmtrain/$d"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=0
step() {   # step NAME COMMAND...: run, log to $RESULTS/NAME.log, count a failure
    local name=$1; shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}

step env "$PY" -c "import torch, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'numba', numba.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', \
torch.cuda.get_device_capability() if torch.cuda.is_available() else '', \
'cusparselt', torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)"
step tests "$PY" -m pytest -o addopts= -q -p no:cacheprovider -rs -m "not gpu" \
    tests/test_accel.py tests/test_convert.py tests/test_transposable.py tests/test_solvers_fast.py
step gpu_tests "$PY" -m pytest -o addopts= -q -p no:cacheprovider -rs -m gpu tests
step sparse_training "$PY" benchmarks/sparse_training.py --out "$RESULTS"
step masks "$PY" benchmarks/masks.py --device cuda --patterns 2:4,4:8,8:16 --flow-tiles 50 --out "$RESULTS"

# A 2:4-pruned checkpoint of Linear layers (shapes of a transformer MLP), then its semi-structured latency.
step convert_semi "$PY" - "$RESULTS" <<'EOF'
import sys, torch
from typer.testing import CliRunner
from nmtrain.cli.main import app
from nmtrain.sparsity import make_mask, parse_pattern
out = sys.argv[1]
gen = torch.Generator().manual_seed(0)
state = {}
for name, (o, i) in {"mlp.fc1": (16384, 4096), "mlp.fc2": (4096, 16384), "proj": (4096, 4096)}.items():
    w = torch.randn(o, i, generator=gen)
    state[f"{name}.weight"] = w * make_mask(w, parse_pattern("2:4"))
    state[f"{name}.bias"] = torch.zeros(o)
torch.save(state, f"{out}/mlp24.pt")
result = CliRunner().invoke(app, ["convert", f"{out}/mlp24.pt", "--to", "semi-structured", "--pattern", "2:4",
                                  "--out", f"{out}/semi_structured.json"])
print(result.output)
sys.exit(result.exit_code)
EOF
rm -f "$RESULTS/mlp24.pt"

# The shipped ViT spec through the CLI on the GPU (synthetic data of Fashion-MNIST's shape: the machine
# has no Debian dataset), with the 2:4 kernels and as masked dense: every block layer must run sparse.
step vit_accel "$PY" - "$RESULTS" <<'EOF'
import json, sys
from typer.testing import CliRunner
from nmtrain.cli.main import app
out = sys.argv[1]
for mode in ("semi_structured", "none"):
    result = CliRunner().invoke(app, ["train", "experiments/specs/fmnist_vit.yaml", "data.dataset=synthetic",
                                      "data.batch_size=32", "train.epochs=3", "schedule.warmup_epochs=0.5",
                                      "device=cuda", f"accel={mode}", "--out", f"{out}/vit-{mode}", "--no-progress"])
    print(result.output)
    if result.exit_code:
        sys.exit(result.exit_code)
    s = json.load(open(f"{out}/vit-{mode}/summary.json"))
    print(mode, "accuracy", s["final_accuracy"], "wall", round(s["wall_seconds"], 1), "accel", s["accel"])
    if mode == "semi_structured" and len(s["accel"]["sparse_layers"]) != 24:
        sys.exit("vit_accel: expected 24 sparse layers, got " + str(s["accel"]))
EOF
rm -f "$RESULTS"/vit-*/checkpoint.pt "$RESULTS"/vit-*/model.pt
rm -rf "$site"
echo "=== gpu_check: $failed failed step(s); results in $RESULTS"
exit "$failed"
