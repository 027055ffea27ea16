#!/usr/bin/env bash
# The project's GPU checks, for a machine with one CUDA GPU, in at most 10 minutes.
#
#   bash gpu_check.sh                  # summary on stdout; work files and logs in /tmp/gpu_check
#   OUT=/some/dir bash gpu_check.sh    # the summary also in $OUT/gpu_summary.txt, the stage logs beside it
#   STEPS=1000 WARMUP=100 FAST_STEPS=500 DATASET=auto BUDGET=570 PYTHON=python3 bash gpu_check.sh   # the knobs
#   COMPILE=1 bash gpu_check.sh        # bench.py also times a torch.compile'd fast step (compile time included)
#   DEVICE=cpu BIG=tiny SMALL=tiny STEPS=4 FAST_STEPS=4 TESTS=0 \
#     BENCH_ARGS="--repeats 1 --matmul-size 256 --min-time 0 --ddpm-steps 5" CAP_SCALE=10 BUDGET=6000 \
#     bash gpu_check.sh               # a dry run of the stages on a CPU (CAP_SCALE multiplies every stage's cap)
#
# Stages, each under `timeout` and inside the overall BUDGET (seconds); a failed stage is reported
# in the summary and the next one still runs:
#   1. requirements  pip install -r requirements.txt, only when an import fails; a torch that already
#                    sees the GPU is kept (the pinned wheel might not match this machine's driver)
#   2. data          resolve DATASET once: auto is full MNIST when on disk or downloadable, else the
#                    offline mnist-5k (a hung download counts as offline)
#   3. bench         bench.py on the fast preset: the matmul peak of each precision (8192^3, CUDA
#                    events), the training step in bf16 and fp32 and what precision auto picks, the
#                    LoRA unmerged and merged forward against the base (targets <= 1.10 and <= 1.02)
#   4. speed         images/s of train.fit's loop on the tutorial preset (precision auto, EMA
#                    included, no checkpoint writes), its FLOPs by torch.utils.flop_counter, and that
#                    as a share of the bf16 peak stage 3 measured (goal: at least 35%)
#   5. fast          train.py on the fast preset for FAST_STEPS steps, then evaluate.py (50 samples
#                    per label): accuracy against seconds of training (goal: 99% in 20 s)
#   6. tutorial      train.py --preset tutorial for STEPS steps (warm-up WARMUP: the preset's 1,000
#                    are sized for 30,000), then evaluate.py: accuracy against seconds (goal: 99% in 3 min)
#   7. tests         python -m pytest -q --runslow: the CUDA tests run here instead of skipping
set -uo pipefail  # no -e: every stage reports, pass or fail
cd "$(dirname "$0")" || exit 1

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
DEVICE=${DEVICE:-cuda}
BIG=${BIG:-tutorial}          # the preset of stages 4 and 6
SMALL=${SMALL:-fast}          # the preset of stages 3 and 5
STEPS=${STEPS:-1000}
WARMUP=${WARMUP:-100}
FAST_STEPS=${FAST_STEPS:-500}
DATASET=${DATASET:-auto}
COMPILE=${COMPILE:-0}
BENCH_ARGS=${BENCH_ARGS:-}    # more bench.py flags (word-split)
TESTS=${TESTS:-1}
BUDGET=${BUDGET:-570}        # the whole script stays under 10 minutes
TEST_RESERVE=${TEST_RESERVE:-200}  # seconds kept back for the test suite
CAP_SCALE=${CAP_SCALE:-1}    # multiplies each stage's cap (a CPU dry run needs more)
((TESTS)) || TEST_RESERVE=0
WORK=${WORK:-/tmp/gpu_check}
LOGS=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGS"
SUMMARY=()
FAILED=0

note() { SUMMARY+=("$1"); echo "== $1"; }
fail() { note "$1"; FAILED=1; }
# seconds a stage may take: its cap, or what is left of the budget after `reserve`
limit() {
    local cap=$(($1 * CAP_SCALE)) reserve=${2:-0}
    local left=$((BUDGET - SECONDS - reserve))
    ((left < cap)) && cap=$left
    ((cap < 10)) && cap=10
    echo "$cap"
}
tail_of() { tail -c "${2:-300}" "$1" | tr '\r\n' '  '; }

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
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
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

# ------------------------------------------------------- 3., 4. bench.py
# bench_digest JSON: one line of what a bench.py JSON holds, section by section
bench_digest() {
    "$PY" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
c, parts = r["config"], []
if "train" in r:
    pk, tr = r["peak"], r["train"]
    peaks = ", ".join(f"{k} {pk[k + '_gflops'] / 1e3:,.1f}" for k in ("fp32", "tf32", "bf16", "fp16")
                      if pk.get(k + "_gflops") is not None)
    parts.append(f"matmul peak {pk['matmul_size']}^3 (TFLOP/s): {peaks}")
    steps = "; ".join(f"{name} {run['step_ms']:.1f} ms = {run['images_per_s']:,.0f} images/s, "
                      f"{run['achieved_gflops'] / 1e3:,.2f} TFLOP/s = {100 * run['peak_fraction']:.1f}% of the "
                      f"{run['peak_key']} peak, memory {run['mem_peak_mb']:,.0f} MB"
                      for name, run in tr["runs"].items())
    compiled = ""
    if tr["compile"]:
        cc = tr["compile"]
        compiled = f"; torch.compile {cc['speedup']:.2f}x eager, first call {cc['first_call_s']:.0f} s"
    parts.append(f"{c['preset']} train step ({c['parameters'] / 1e6:.2f} M parameters, batch {tr['batch_size']}, "
                 f"{tr['flops_per_step'] / tr['batch_size'] / 1e9:.2f} GFLOP per image, {c['dataset']}): {steps}; "
                 f"precision auto -> {c['precision_auto']}{compiled}")
if "inference" in r:
    inf = r["inference"]
    parts.append(f"LoRA forward (batch {inf['batch_size']}, {inf['precision']}): unmerged "
                 f"{inf['unmerged_over_base']:.3f}x base (target <= 1.10), merged {inf['merged_over_base']:.3f}x "
                 "(target <= 1.02)")
print(" | ".join(parts))
EOF
}

# run_bench NAME CAP RESERVE [bench.py flags...]: bench.py -> $WORK/NAME.json and NAME.log, noted as one line
read -r -a BENCH_EXTRA <<<"$BENCH_ARGS"
run_bench() {
    local name=$1 cap=$2 reserve=$3 json="$WORK/$1.json" rc digest
    shift 3
    rm -f "$json"
    timeout "$(limit "$cap" "$reserve")" "$PY" bench.py --device "$DEVICE" --dataset "$DS" --repeats 3 --out "$json" \
        "$@" ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} >"$LOGS/$name.log" 2>&1
    rc=$?
    digest=$(bench_digest "$json" 2>>"$LOGS/$name.log")
    if [ "$rc" -eq 0 ] && [ -n "$digest" ]; then
        note "$name: $digest"
    else
        fail "$name: exit $rc (124: timed out); see $name.log: $(tail_of "$LOGS/$name.log")"
    fi
}
COMPILE_FLAG=()
((COMPILE)) && COMPILE_FLAG=(--compile)
run_bench bench 150 $((TEST_RESERVE + 240)) --preset "$SMALL" ${COMPILE_FLAG[@]+"${COMPILE_FLAG[@]}"}
# the training step trainer.fit runs, on the big preset: no copy of the loop here, bench.py times the trainer's own
run_bench speed 120 $((TEST_RESERVE + 200)) --preset "$BIG" --sections train

# ---------------------------------------- 5., 6. train, then evaluate
# train_and_score NAME PRESET STEPS CAP [train.py flags...]: train, evaluate, note accuracy vs seconds
train_and_score() {
    local name=$1 preset=$2 steps=$3 cap=$4
    shift 4
    local dir="$WORK/$name" t0=$SECONDS rc
    rm -rf "$dir"
    timeout "$(limit "$cap" $((TEST_RESERVE + 40)))" "$PY" train.py --preset "$preset" --device "$DEVICE" --dataset "$DS" \
        --max-steps "$steps" --sample-every 0 --save-every 100000 --out-dir "$dir" "$@" >"$LOGS/train_$name.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] || [ ! -f "$dir/ckpt.pt" ]; then
        fail "$name: train.py exit $rc after $((SECONDS - t0))s (124: timed out): $(tail_of "$LOGS/train_$name.log" 400)"
        return
    fi
    if [ ! -f evaluate.py ]; then
        note "$name: trained $steps steps in $((SECONDS - t0))s wall; evaluate skipped (no evaluate.py)"
        return
    fi
    timeout "$(limit 120 "$TEST_RESERVE")" "$PY" evaluate.py --ckpt "$dir/ckpt.pt" --n-per-label 50 --device "$DEVICE" \
        --out-dir "$dir/eval" >"$LOGS/eval_$name.log" 2>&1
    rc=$?
    local res
    res=$("$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"accuracy {100 * r['accuracy']:.1f}% of 500 samples, Frechet {r['frechet_distance']:.1f} (floor \"
      f\"{r['frechet_floor']:.1f}) after {r['step']} steps, {r['train_seconds']:.1f} s of training\")" \
        "$dir/eval/eval.json" 2>/dev/null)
    local head
    head=$(grep -m 1 '^train: .*device' "$LOGS/train_$name.log" | sed 's/^train: //')
    local auto
    auto=$(grep -m 1 'precision auto' "$LOGS/train_$name.log")
    if [ "$rc" -eq 0 ] && [ -n "$res" ]; then
        note "$name: $res ($((SECONDS - t0))s wall with start-up and scoring; ${auto:+$auto; }$head)"
    else
        fail "$name: evaluate.py exit $rc (124: timed out): $(tail_of "$LOGS/eval_$name.log")"
    fi
}
train_and_score fast "$SMALL" "$FAST_STEPS" 90
train_and_score tutorial "$BIG" "$STEPS" 240 --warmup-steps "$WARMUP"

# -------------------------------------------------------------- 7. tests
if ((TESTS)); then
    T0=$SECONDS
    timeout "$(limit 600 5)" "$PY" -m pytest -q --runslow -p no:cacheprovider >"$LOGS/pytest.log" 2>&1
    RC=$?
    RESULT=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran' "$LOGS/pytest.log" | tail -n 1)
    if [ "$RC" -eq 0 ]; then
        note "tests: $RESULT ($((SECONDS - T0))s)"
    else
        fail "tests: exit $RC (124: timed out) after $((SECONDS - T0))s: ${RESULT:-no summary line}; see pytest.log"
    fi
else
    note "tests: skipped (TESTS=0)"
fi

note "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    printf '%s\n' "${SUMMARY[@]}" >"$OUT/gpu_summary.txt"
fi
echo
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
