#!/bin/bash
# The new default recipe, and the two ways to spend the same compute on it, on the offline set (mnist-5k).
# Runs went two or more at a time on a shared 2-core CPU, one thread each: the seconds in the files are not timings.
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1
EVAL="python evaluate.py --n-per-label 100 --precision fp32"   # 1,000 samples, DPM-Solver++(2M)-10, guidance 2, seed 0

# v-prediction, the same 51,200 training images seen two ways: 400 steps of 128, 800 steps of 64
python train.py --objective v --max-steps 400 --batch-size 128 --precision fp32 --snapshot-every 2 --sample-every 0 --out-dir v400
python train.py --objective v --max-steps 800 --batch-size 64 --precision fp32 --snapshot-every 2 --sample-every 0 --out-dir v800b64
$EVAL --ckpt v400/ckpt.pt --out-dir v400/eval_dpm10
$EVAL --ckpt v800b64/ckpt.pt --out-dir v800b64/eval_dpm10
# the curve: each copy the 800-step run kept on the way (mid-schedule: the rate had not decayed yet)
for s in 140 280 420 560 700; do $EVAL --ckpt v800b64/ckpt_step000$s.pt --out-dir v800b64/eval_step$s; done

# the italic adapter on it: the fine-tune's defaults (300 steps of 128 at lr 1e-2), then cheaper ones
python lora_finetune.py --ckpt v800b64/ckpt.pt --out v800b64/italic --precision fp32 --preview-every 0
python lora_finetune.py --ckpt v800b64/ckpt.pt --out v800b64/italic200 --lora-steps 200 --precision fp32 --preview-every 0
python lora_finetune.py --ckpt v800b64/ckpt.pt --out v800b64/italic_b64 --lora-batch-size 64 --precision fp32 --preview-every 0
python lora_finetune.py --ckpt v800b64/ckpt.pt --out v800b64/italic_b64_lr2 --lora-batch-size 64 --lora-lr 2e-2 \
    --precision fp32 --preview-every 0
for a in italic italic200 italic_b64 italic_b64_lr2; do
    $EVAL --ckpt v800b64/ckpt.pt --lora v800b64/$a --out-dir v800b64/eval_$a
done

# the italic adapter on the default base (out/ckpt.pt of the quick start), seeds 1 and 2 beside the quick start's seed 0;
# one thread each, side by side
for s in 1 2; do
    OMP_NUM_THREADS=1 python lora_finetune.py --seed $s --out out/italic_s$s --precision fp32 --preview-every 0
    OMP_NUM_THREADS=1 python evaluate.py --ckpt out/ckpt.pt --lora out/italic_s$s --style italic --n-per-label 100 \
        --precision fp32 --out-dir out/eval_italic_s$s      # -> data/default_italic_seed$s.json
done
