#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run, the most wanted first:
#   1. benchmarks/train_step.py --compile --device cuda on the GPT, then ViT-Tiny (after the tests) and LeNet-5
#      (after the CLI runs): every method eagerly and under torch.compile, interleaved, against dense in the
#      same mode;
#   2. the GPU tests (pytest -m gpu): every method on CUDA against the CPU, compiled against eager with aot_eager
#      (bit for bit) and inductor (close); accel's sparse path against masked dense, semi-structured convert,
#      solvers on CUDA;
#   3. `nmtrain train` of the shipped GPT spec on Shakespeare, 400 steps, dense and SR-STE, train.compile false
#      and true (wall seconds, validation loss), the corpus from DATA_ROOT (default .venv/share/nmtrain, where
#      `make install` puts it);
#   4. benchmarks/masks.py --device cuda: the transposable solvers on the GPU (2:4, 4:8, 8:16);
#   5. benchmarks/sparse_training.py: forward+backward per Linear layer, MLP block, ViT step, sparse vs dense;
#   6. nmtrain convert --to semi-structured on a pruned Linear checkpoint (latency vs dense);
#   7. the shipped ViT spec (fmnist_vit.yaml) through `nmtrain train` with and without the 2:4 kernels;
#   8. the CPU tests of the accel/convert/solver files on the GPU machine's torch.
#
#   bash benchmarks/gpu_check.sh                  # logs, JSON and CSV under $RESULTS (default bench-results/gpu)
#   PYTHON=.venv/bin/python BUDGET=540 ONLY=gpu_tests,compile_gpt bash benchmarks/gpu_check.sh
#
# BUDGET (seconds, default 3600) bounds the whole run: each step runs under `timeout` for the smaller of its
# own cap and what is left, and a step with under 20 s left is skipped (and said so), so that a leased
# machine's limit ends the run between steps, not in one. ONLY (comma-separated step names) picks steps.
#
# Through the device tool (which brings back at most 8 files from its $OUT, and carries no .venv), one call
# with the corpus copied to a folder git ignores (.gpu_data/, named in the call's carry):
#   RESULTS=/tmp/gc DATA_ROOT=.gpu_data BUDGET=545 bash benchmarks/gpu_check.sh; tar -czf $OUT/gpu_check.tgz -C /tmp gc
# On an H100 machine (2026-12-06) that took 425 s, every step but ViT-Tiny's benchmark inside its cap.
#
# It does not install anything: PYTHON must already have torch, numba, networkx, typer, rich, pyyaml,
# safetensors, matplotlib, pytest and hypothesis (a GPU machine's image usually does). nmtrain itself is
# put on the import path through links, so no build step is needed. Each step runs even if one before
# failed; the exit code is the number of failed or skipped steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench-results/gpu}
DATA_ROOT=${DATA_ROOT:-.venv/share/nmtrain}
DEADLINE=$(( $(date +%s) + ${BUDGET:-3600} ))
ONLY=${ONLY:-}
DEVICE=${DEVICE:-cuda}          # DEVICE=cpu BENCH_STEPS=3 TRAIN_STEPS=4: a dry run of the script on a CPU
BENCH_STEPS=${BENCH_STEPS:-100}
TRAIN_STEPS=${TRAIN_STEPS:-400}
mkdir -p "$RESULTS"

# `import nmtrain.sparsity` etc. from this checkout, as the installed package would (pyproject's package-dir)
site=$(mktemp -d)
mkdir "$site/nmtrain"
for f in api/*.py; do ln -s "$PWD/$f" "$site/nmtrain/"; done                  # "nmtrain" = "api"
for d in cli experiments sparsity data; do ln -s "$PWD/$d" "$site/nmtrain/$d"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=0
step() {   # step NAME CAP COMMAND...: run under timeout (CAP, or what is left), log to $RESULTS/NAME.log
    local name=$1 cap=$2; shift 2
    [ -z "$ONLY" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
    local left=$(( DEADLINE - $(date +%s) ))
    (( left < cap )) && cap=$left
    if (( cap < 20 )); then echo "=== $name SKIPPED: ${left}s of the budget left"; failed=$((failed + 1)); return; fi
    echo "=== $name (at most ${cap}s): $*"
    local start=$(date +%s)
    timeout "$cap" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name took $(( $(date +%s) - start ))s"
    [ "$rc" = 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=$((failed + 1)); }
}

step env 30 "$PY" -c "import torch, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'numba', numba.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', \
torch.cuda.get_device_capability() if torch.cuda.is_available() else '', \
'cusparselt', torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None)"
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")     # pytest-xdist where there is one

compile_bench() {   # compile_bench CAP MODEL ARGS...: each method eagerly and compiled, interleaved (train_step.py)
    local cap=$1 model=$2; shift 2
    step "compile_$model" "$cap" "$PY" benchmarks/train_step.py --model "$model" "$@" --steps "$BENCH_STEPS" \
        --device "$DEVICE" --compile --out "$RESULTS/compile_$model" \
        --methods dense,fixed,unstructured,transposable,srste,bame,bimask,sste,step,pgf,maskdecay:no-mvue
}
compile_bench 150 gpt --optim adamw --batch 16
step gpu_tests 130 "$PY" -m pytest -o addopts= -q -p no:cacheprovider -rs --durations=10 $xdist -m gpu tests
compile_bench 130 vit_tiny --optim adamw    # on the H100 it met its cap of 100 s just after writing its JSON

# The shipped GPT spec through the CLI, eager and compiled: wall seconds (the compile included), validation loss.
step train_compile 90 "$PY" - "$RESULTS" "$DATA_ROOT" "$DEVICE" "$TRAIN_STEPS" <<'EOF'
import json, sys
from typer.testing import CliRunner
from nmtrain.cli.main import app
out, root, device, steps = sys.argv[1:]
for method in ("dense", "srste"):
    for compiled in ("false", "true"):
        run = f"{out}/gpt-{method}-compile-{compiled}"
        result = CliRunner().invoke(app, [
            "train", "experiments/specs/shakespeare_gpt.yaml", "--method", method, f"device={device}", f"data.root={root}",
            f"train.max_steps={steps}", f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
            f"train.compile={compiled}", "--out", run, "--no-progress"])
        if result.exit_code:
            print(result.output)
            sys.exit(result.exit_code)
        s = json.load(open(f"{run}/summary.json"))
        print(method, "compile", compiled, "val loss", s["final_val_loss"], "wall s", round(s["wall_seconds"], 1))
EOF
rm -f "$RESULTS"/gpt-*/checkpoint.pt "$RESULTS"/gpt-*/model.pt
compile_bench 70 lenet5

step masks 60 "$PY" benchmarks/masks.py --device "$DEVICE" --patterns 2:4,4:8,8:16 --flow-tiles 50 --out "$RESULTS"
step sparse_training 90 "$PY" benchmarks/sparse_training.py --out "$RESULTS"

# A 2:4-pruned checkpoint of Linear layers (shapes of a transformer MLP), then its semi-structured latency.
step convert_semi 60 "$PY" - "$RESULTS" <<'EOF'
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
step vit_accel 90 "$PY" - "$RESULTS" <<'EOF'
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

step tests 120 "$PY" -m pytest -o addopts= -q -p no:cacheprovider -rs -m "not gpu" $xdist \
    tests/test_accel.py tests/test_convert.py tests/test_transposable.py tests/test_solvers_fast.py
rm -rf "$site"
echo "=== gpu_check: $failed failed or skipped step(s); results in $RESULTS"
exit "$failed"
