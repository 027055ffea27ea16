#!/usr/bin/env bash
# The project's GPU checks, for a machine with one CUDA GPU, in at most 10 minutes.
#
#   bash gpu_check.sh                  # summary on stdout; work files and logs in /tmp/gpu_check
#   OUT=/some/dir bash gpu_check.sh    # the summary also in $OUT/gpu_summary.txt, the stage logs beside it
#   STEPS=300 WARMUP=100 DATASET=auto BUDGET=570 PYTHON=python3 bash gpu_check.sh   # the knobs and their defaults
#
# Stages, each under `timeout` and inside the overall BUDGET (seconds); a failed stage is reported
# in the summary and the next one still runs:
#   1. requirements  pip install -r requirements.txt, only when an import fails; a torch that already
#                    sees the GPU is kept (the pinned wheel might not match this machine's driver)
#   2. data          resolve DATASET once: auto is full MNIST when on disk or downloadable, else the
#                    offline mnist-5k (a hung download counts as offline)
#   3. train         train.py --preset tutorial on CUDA (bf16 autocast, TF32) for STEPS steps, with
#                    the warm-up shortened to WARMUP steps (the preset's 1,000 are sized for 30,000)
#   4. speed         images/s of train.fit's loop (the same step, EMA included) on the tutorial
#                    model and data, without the checkpoint writes that train.py makes at every
#                    epoch end (2.8 GB each at this size; mnist-5k has an epoch every 11 steps)
#   5. evaluate      python evaluate.py on the checkpoint, when evaluate.py exists: sample accuracy
#   6. tests         python -m pytest -q --runslow: the CUDA tests run here instead of skipping
set -uo pipefail  # no -e: every stage reports, pass or fail
cd "$(dirname "$0")" || exit 1

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-100}
DATASET=${DATASET:-auto}
BUDGET=${BUDGET:-570}        # the whole script stays under 10 minutes
TEST_RESERVE=${TEST_RESERVE:-200}  # seconds kept back for the test suite
WORK=${WORK:-/tmp/gpu_check}
LOGS=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGS"
SUMMARY=()
FAILED=0

note() { SUMMARY+=("$1"); echo "== $1"; }
fail() { note "$1"; FAILED=1; }
# seconds a stage may take: its cap, or what is left of the budget after `reserve`
limit() {
    local cap=$1 reserve=${2:-0}
    local left=$((BUDGET - SECONDS - reserve))
    ((left < cap)) && cap=$left
    ((cap < 10)) && cap=10
    echo "$cap"
}

# ---------------------------------------------------------------- 0. the GPU
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
note "gpu: ${GPU:-nvidia-smi not found}"

# ------------------------------------------------------- 1. requirements
IMPORTS="import torch, torchvision, numpy, matplotlib, PIL, tqdm, mlxtend, pytest"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    REQ=requirements.txt
    if "$PY" -c "import torch, torchvision; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        REQ="$WORK/requirements-keep-torch.txt"
        grep -vE '^(torch|torchvision)([=<>~ ]|$)' requirements.txt >"$REQ"
    fi
    timeout "$(limit 180 "$TEST_RESERVE")" "$PY" -m pip install -q -r "$REQ" >"$LOGS/pip.log" 2>&1 \
        && note "requirements: installed from $REQ" \
        || fail "requirements: pip install -r $REQ failed (see pip.log)"
else
    note "requirements: already importable"
fi
TORCH=$("$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tail -n 1)
note "torch: $TORCH"
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
    fail "no CUDA GPU visible to torch: nothing to check here"
    printf '%s\n' "${SUMMARY[@]}" | tee ${OUT:+"$OUT/gpu_summary.txt"}
    exit 1
fi

# --------------------------------------------------------------- 2. data
DS=$(timeout "$(limit 60 "$TEST_RESERVE")" "$PY" -c "
import sys
from dataset import resolve_dataset
print(resolve_dataset(sys.argv[1], 'data', True, lambda m: print(m, file=sys.stderr)))" "$DATASET" \
    2>"$LOGS/data.log" | tail -n 1)
if [ -z "$DS" ]; then
    DS=mnist-5k
    note "data: $DATASET did not resolve in time (offline?): using mnist-5k"
else
    note "data: $DATASET -> $DS"
fi

# -------------------------------------------------------------- 3. train
CKPT="$WORK/tutorial/ckpt.pt"
rm -rf "$WORK/tutorial"
T0=$SECONDS
timeout "$(limit 240 $((TEST_RESERVE + 90)))" "$PY" train.py --preset tutorial --device cuda --dataset "$DS" \
    --max-steps "$STEPS" --warmup-steps "$WARMUP" --sample-every 0 --out-dir "$WORK/tutorial" >"$LOGS/train.log" 2>&1
RC=$?
WALL=$((SECONDS - T0))
HEAD=$(grep -m 1 '^train: .*device' "$LOGS/train.log" | sed 's/^train: //')
if [ "$RC" -eq 0 ] && [ -f "$CKPT" ]; then
    note "train: tutorial preset, $STEPS steps (warm-up $WARMUP) in ${WALL}s wall (start-up, data and checkpoint writes included): $HEAD"
else
    fail "train: exit $RC after ${WALL}s (124: timed out); last lines of train.log: $(tail -c 400 "$LOGS/train.log" | tr '\r\n' '  ')"
fi

# -------------------------------------------------------------- 4. speed
timeout "$(limit 90 $((TEST_RESERVE + 60)))" "$PY" - "$DS" >"$LOGS/speed.log" 2>&1 <<'EOF'
import copy, sys, time
import torch
from config import DiffusionConfig, ModelConfig, TrainConfig, preset_config
from dataset import load_dataset, to_model_range
from diffusion import Diffusion
from runtime import Dist, enable_tf32, resolve_precision
from trainer import Hooks, Loop, TrainData, ema_update, fit, make_optimizer
from unet import UNet

dev = torch.device("cuda")
enable_tf32(dev)  # as train.py does
mc, dc, tc = (preset_config(c, "tutorial") for c in (ModelConfig, DiffusionConfig, TrainConfig))
precision = resolve_precision("auto", dev)
data = load_dataset(sys.argv[1], "train", "data", download=False, log=lambda *a: None)
torch.manual_seed(0)
model = UNet(mc).to(dev)
ema = copy.deepcopy(model).requires_grad_(False)
diffusion = Diffusion.from_config(dc).to(dev)
opt = make_optimizer(model.parameters(), tc.lr, tc.weight_decay, dev)
train_data = TrainData(to_model_range(data.images, mc.img_size).to(dev), data.labels.to(dev), tc.batch_size, tc.seed,
                       tc.label_drop, mc.num_classes, Dist(), torch.Generator().manual_seed(1))
hooks = Hooks(on_epoch_end=lambda e, s, last: None, on_interrupt=lambda e, s: None,
              after_step=lambda s: ema_update(ema, model, tc.ema_decay, s))

def steps(a, b):  # train.py's loop, with the per-epoch checkpoint and samples left out
    fit(model, opt, diffusion, train_data, Loop(b, lambda s: tc.lr, tc.grad_clip, dev, precision, desc="speed"), a, hooks)

warm, timed = 10, 50
steps(0, warm)
torch.cuda.synchronize()
t0 = time.perf_counter()
steps(warm, warm + timed)
torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(f"{timed * tc.batch_size / dt:.0f} images/s ({1000 * dt / timed:.1f} ms per step of batch {tc.batch_size}, "
      f"{precision}, {data.name}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
EOF
RC=$?
SPEED=$(grep 'images/s' "$LOGS/speed.log" | tail -n 1)
if [ "$RC" -eq 0 ] && [ -n "$SPEED" ]; then
    note "speed: $SPEED"
else
    fail "speed: exit $RC (124: timed out); see speed.log: $(tail -c 300 "$LOGS/speed.log" | tr '\r\n' '  ')"
fi

# ----------------------------------------------------------- 5. evaluate
if [ -f evaluate.py ] && [ -f "$CKPT" ]; then
    rm -rf "$WORK/eval"
    timeout "$(limit 120 "$TEST_RESERVE")" "$PY" evaluate.py --ckpt "$CKPT" --n-per-label 50 \
        --out-dir "$WORK/eval" >"$LOGS/eval.log" 2>&1
    RC=$?
    ACC=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['accuracy'])" "$WORK/eval/eval.json" 2>/dev/null)
    if [ "$RC" -eq 0 ] && [ -n "$ACC" ]; then
        note "evaluate: accuracy $ACC (50 samples per label, after $STEPS steps)"
    else
        fail "evaluate: exit $RC (124: timed out); see eval.log: $(tail -c 300 "$LOGS/eval.log" | tr '\r\n' '  ')"
    fi
elif [ ! -f evaluate.py ]; then
    note "evaluate: skipped (no evaluate.py)"
else
    note "evaluate: skipped (no checkpoint)"
fi

# -------------------------------------------------------------- 6. tests
T0=$SECONDS
timeout "$(limit 600 5)" "$PY" -m pytest -q --runslow -p no:cacheprovider >"$LOGS/pytest.log" 2>&1
RC=$?
RESULT=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran' "$LOGS/pytest.log" | tail -n 1)
if [ "$RC" -eq 0 ]; then
    note "tests: $RESULT ($((SECONDS - T0))s)"
else
    fail "tests: exit $RC (124: timed out) after $((SECONDS - T0))s: ${RESULT:-no summary line}; see pytest.log"
fi

note "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/gpu_summary.txt"
fi
echo
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
