#!/bin/bash
# What ran for notes.md, from the repository root. Two or three processes side by side, one thread each
# (OMP_NUM_THREADS=1): the seconds inside data/ are not timings. The quick start's timing ran alone
# (../recipe/time_quick_start.py). Scores: evaluate.py, DPM-Solver++(2M)-10, seed 0, offline set (mnist-5k).
set -euo pipefail
export OMP_NUM_THREADS=1
T="python train.py --precision fp32 --sample-every 0"
E="python evaluate.py --precision fp32"

# the lever alone at 500 steps of 64, beside ../levers_500's baseline G (the same run without it), 500 samples
$T --out-dir H_bounded500 --max-steps 500 --bounded-loss
$E --ckpt H_bounded500/ckpt.pt --n-per-label 50 --guidance 2 --out-dir H_bounded500/eval_dpm10      # data/H_*.json

# the black pixels at each step, the lever against its baseline (G_v500b64: ../levers_500/commands.sh)
python experiments/time_to_quality/bounded_loss/black_by_step.py H_bounded500/ckpt.pt
python experiments/time_to_quality/bounded_loss/black_by_step.py G_v500b64/ckpt.pt

# with the rest of the default recipe (700 steps of 64, v), 1,000 samples; guidance 2, 1.5, 1 and two intervals
$T --out-dir I_bounded700 --max-steps 700 --bounded-loss
for g in 2 1.5 1; do $E --ckpt I_bounded700/ckpt.pt --n-per-label 100 --guidance $g --out-dir I_bounded700/eval_g$g; done
$E --ckpt I_bounded700/ckpt.pt --n-per-label 100 --guidance 2 --guidance-interval 0.5,1 --out-dir I_bounded700/eval_g2_i0.5-1
$E --ckpt I_bounded700/ckpt.pt --n-per-label 100 --guidance 1.5 --guidance-interval 0,0.5 --out-dir I_bounded700/eval_g1.5_i0-0.5

# the old default base (plain MSE; the quick start's of fa95f6d, scored at guidance 2 in ../../default then) at 1.5
$E --ckpt P_plain700/ckpt.pt --n-per-label 100 --guidance 1.5 --out-dir P_plain700/eval_g1.5

# one sweep around the winner (lr 2e-3, warm-up 100, EMA 0.999), one setting at a time; then seeds 1 and 2
for run in "J_lr3e-3 --lr 3e-3" "L_lr1e-3 --lr 1e-3" "M_ema0.98 --ema-decay 0.98" "N_warm50 --warmup-steps 50" \
           "S1_seed1 --seed 1" "S2_seed2 --seed 2" "Q_gamma20 --min-snr-gamma 20"; do
    set -- $run
    $T --out-dir "$1" --max-steps 700 --bounded-loss "${@:2}"
    $E --ckpt "$1/ckpt.pt" --n-per-label 100 --guidance 1.5 --out-dir "$1/eval_g1.5"
done

# the italic adapter (every fine-tune default) at seeds 0, 1, 2 on I_bounded700
for s in 0 1 2; do
    python lora_finetune.py --ckpt I_bounded700/ckpt.pt --out I_italic_s$s --seed $s --precision fp32 --preview-every 0
    $E --ckpt I_bounded700/ckpt.pt --lora I_italic_s$s --n-per-label 100 --guidance 1.5 --out-dir I_bounded700/eval_italic_s$s
done
