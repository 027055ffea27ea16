#!/bin/bash
# The objective lever alone, at 500 training steps (the schedule fitted to 500), then two samplers on each base.
# One thread each, two side by side (OMP_NUM_THREADS=1): the durations in the files are not speed figures.
set -euo pipefail
for run in "A_eps500" "B_v500 --objective v"; do
    set -- $run
    OMP_NUM_THREADS=1 python train.py --out-dir "$1" --max-steps 500 --precision fp32 --sample-every 0 "${@:2}"
done
for run in A_eps500 B_v500; do
    OMP_NUM_THREADS=1 python evaluate.py --ckpt $run/ckpt.pt --n-per-label 50 --precision fp32 --sampler ddim --steps 50 \
        --out-dir $run/eval_ddim50
    OMP_NUM_THREADS=1 python evaluate.py --ckpt $run/ckpt.pt --n-per-label 50 --precision fp32 --sampler dpmpp-2m \
        --steps 10 --out-dir $run/eval_dpm10
done
# the italic adapter (every default) on the v base
OMP_NUM_THREADS=1 python lora_finetune.py --ckpt B_v500/ckpt.pt --out B_v500_italic --precision fp32 --preview-every 0
OMP_NUM_THREADS=1 python evaluate.py --ckpt B_v500/ckpt.pt --lora B_v500_italic --n-per-label 50 --precision fp32 \
    --out-dir B_v500/eval_italic_ddim50
# EDM's recipe as a whole: the preconditioned denoiser, log-normal noise levels, its own loss weight
OMP_NUM_THREADS=1 python train.py --out-dir C_edm500 --max-steps 500 --precision fp32 --sample-every 0 \
    --objective edm --t-sampling lognormal --min-snr-gamma 0
OMP_NUM_THREADS=1 python evaluate.py --ckpt C_edm500/ckpt.pt --n-per-label 50 --precision fp32 --sampler dpmpp-2m \
    --steps 10 --out-dir C_edm500/eval_dpm10
OMP_NUM_THREADS=1 python evaluate.py --ckpt C_edm500/ckpt.pt --n-per-label 50 --precision fp32 --sampler ddim \
    --steps 50 --out-dir C_edm500/eval_ddim50

# each lever alone at 500 steps of 64 (the default batch by then), beside its own v baseline G; same two samplers
for run in "G_v500b64 --objective v" "D_vlognormal500 --objective v --t-sampling lognormal" \
           "E_edmuniform500 --objective edm" "F_vztsnr500 --objective v --zero-terminal-snr"; do
    set -- $run
    OMP_NUM_THREADS=1 python train.py --out-dir "$1" --max-steps 500 --precision fp32 --sample-every 0 "${@:2}"
    OMP_NUM_THREADS=1 python evaluate.py --ckpt $1/ckpt.pt --n-per-label 50 --precision fp32 --sampler ddim --steps 50 \
        --out-dir $1/eval_ddim50
    OMP_NUM_THREADS=1 python evaluate.py --ckpt $1/ckpt.pt --n-per-label 50 --precision fp32 --sampler dpmpp-2m \
        --steps 10 --out-dir $1/eval_dpm10
done
# samplers on B_v500: Heun at 5 and 10 steps, dynamic thresholding at p 0.995 and 0.9
for n in 5 10; do
    OMP_NUM_THREADS=1 python evaluate.py --ckpt B_v500/ckpt.pt --n-per-label 50 --precision fp32 --sampler heun \
        --steps $n --out-dir B_v500/eval_heun$n
done
for p in 0.995 0.9; do
    OMP_NUM_THREADS=1 python evaluate.py --ckpt B_v500/ckpt.pt --n-per-label 50 --precision fp32 --sampler dpmpp-2m \
        --steps 10 --threshold $p --out-dir B_v500/eval_dpm10_thr$p
done
