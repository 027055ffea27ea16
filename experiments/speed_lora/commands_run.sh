#!/bin/bash
# What ran for notes.md's figures: the speed adapter on the 800-step base of ../time_to_quality/recipe (v800b64,
# trained by its commands.sh), from the repository root. The CPU was shared: the seconds in the files are not timings.
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1
python lora_finetune.py --distill lcm --ckpt v800b64/ckpt.pt --out v800b64/lcm --precision fp32 --preview-every 0
E="python evaluate.py --ckpt v800b64/ckpt.pt --n-per-label 100 --precision fp32"
for n in 4 1 2 8; do $E --lora v800b64/lcm --sampler lcm --steps $n --out-dir v800b64/eval_lcm$n; done
$E --lora v800b64/lcm --lora v800b64/italic --sampler lcm --steps 4 --out-dir v800b64/eval_lcm4_italic
