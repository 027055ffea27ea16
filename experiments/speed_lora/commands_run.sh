#!/bin/bash
# What ran for notes.md's figures, from the repository root, on the default base and italic adapter of the quick start
# (out/ckpt.pt, out/lora). Timings ran alone; the quality runs shared the CPU, one thread each.
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
E="python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --precision fp32"

# the default speed adapter (240 steps of 64), alone and timed, with the consistency loss before it read its ends
# clipped (commit 639687f); scored as data/old_loss/
/usr/bin/time -f "wall %e s" python lora_finetune.py --distill lcm --out out/lcm --precision fp32
export OMP_NUM_THREADS=1
for n in 4 2 8 1; do $E --lora out/lcm --sampler lcm --steps $n --out-dir out/eval_lcm$n; done   # data/old_loss/lcmN.json
for w in 3 2; do $E --lora out/lcm --sampler lcm --steps 4 --guidance $w --out-dir out/eval_lcm4_w$w; done
$E --lora out/lcm --lora out/lora --style italic --sampler lcm --steps 4 --out-dir out/eval_lcm4_italic
# the same distillation with the loss as committed (its ends clipped): timed alone, then again one thread beside
# other work, the scored one
/usr/bin/time -f "wall %e s" python lora_finetune.py --distill lcm --out out/lcm_t --precision fp32
python lora_finetune.py --distill lcm --out out/lcm_b --precision fp32     # data/lcm_loss.csv, lcm_adapter_config.json
for n in 4 2 8 1; do $E --lora out/lcm_b --sampler lcm --steps $n --out-dir out/eval_b_lcm$n; done   # data/lcmN.json
for w in 2 1 1.25; do   # data/lcm4_wW.json
    $E --lora out/lcm_b --sampler lcm --steps 4 --guidance $w --out-dir out/eval_b_lcm4_w$w
done
for n in 4 8; do $E --sampler lcm --steps $n --out-dir out/eval_base_lcm$n; done    # the base alone: data/base_lcmN.json
$E --lora out/lcm_b --lora out/lora --style italic --sampler lcm --steps 4 --out-dir out/eval_b_lcm4_italic
python lora_tools.py render-style "font:DejaVu Serif Bold" --per-label 20 --out my_digits
python lora_tools.py render-style "font:DejaVu Serif Bold" --seed 1 --out held_out
python lora_finetune.py --data my_digits --targets all --r 2 --alpha 2 --lora-lr 3e-3 --out out/serif --precision fp32
$E --lora out/serif --style-data held_out --out-dir out/eval_serif                             # data/serif_default.json
$E --lora out/lcm_b --lora out/serif --style-data held_out --sampler lcm --steps 4 --out-dir out/eval_b_lcm4_serif
for m in "" "--merge"; do   # merged against unmerged: the same uint8 images
    python denoise.py --lora out/lcm_b --lora out/lora --sampler lcm --steps 4 --precision fp32 $m --out-dir out/mb$m
done

# on the previous default base (plain MSE, guidance 2), with the loss before its clipping:
# the budget's levers (data/budget/): two at a time, one thread each; for skip k = 50 and 100, diffusion.py's
# LCM_SKIP = 50 was edited to 20 and 10 in a copy of the code (sampling with that copy too); these ran before
# --distill-steps and --distill-batch-size existed, as --lora-steps and --lora-batch-size, the same settings
python lora_finetune.py --distill lcm --distill-steps 275 --out out/V1 --precision fp32               # LCM_SKIP 20
python lora_finetune.py --distill lcm --distill-steps 275 --out out/P1 --precision fp32               # LCM_SKIP 10
python lora_finetune.py --distill lcm --distill-steps 275 --lora-lr 2e-2 --out out/P2 --precision fp32   # LCM_SKIP 20
python lora_finetune.py --distill lcm --distill-steps 560 --distill-batch-size 32 --out out/V2 --precision fp32
python lora_finetune.py --distill lcm --distill-steps 275 --distill-ema 0 --out out/V3 --precision fp32
python lora_finetune.py --distill lcm --distill-steps 275 --distill-ema 0 --out out/V4 --precision fp32 # LCM_SKIP 20
python lora_finetune.py --distill lcm --distill-steps 300 --distill-batch-size 128 --out out/d300 --precision fp32
for a in V1 P1 P2 V2 V3 V4 d300; do $E --lora out/$a --sampler lcm --steps 4 --out-dir out/eval_$a; done

# times, alone: a grid of ten digits per setting (timing.json), the page's fast redraw (the adapter's values do not
# change the time: the timed one was out/lcm); then the picture again with the scored adapter (speed_lora.png -> docs/)
unset OMP_NUM_THREADS
python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm --style out/lora --out experiments/speed_lora
mkdir -p out/page && cp -r out/lcm out/lora out/page/
python app.py --bench --out-dir out/page --precision fp32 > experiments/speed_lora/page_bench.json
python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm_b --style out/lora --out /tmp/sp --repeats 1
cp /tmp/sp/speed_lora.png experiments/speed_lora/speed_lora.png

# after the default sampler became projected guidance 1.75 (41e57b4): the same base and adapters, the guidance input
# w now 1.75 by default (data/*_w1.75.json, data/*_projected.json); two more seeds of the distillation, one thread
# each beside each other (out/lcm_s1, out/lcm_s2; data/seeds/)
export OMP_NUM_THREADS=1
$E --out-dir out/eval_pg_base                                                          # data/base_default_projected.json
$E --lora out/lora --out-dir out/eval_pg_lora                                          # data/italic_default_projected.json
$E --lora out/serif --style-data held_out --out-dir out/eval_pg_serif                  # data/serif_default_projected.json
for n in 1 2 4 8; do $E --lora out/lcm_b --sampler lcm --steps $n --out-dir out/eval_b_lcm${n}_w1.75; done
$E --lora out/lcm_b --lora out/lora --style italic --sampler lcm --steps 4 --out-dir out/eval_b_lcm4_italic_w1.75
$E --lora out/lcm_b --lora out/serif --style-data held_out --sampler lcm --steps 4 --out-dir out/eval_b_lcm4_serif_w1.75
for s in 1 2; do
    python lora_finetune.py --distill lcm --seed $s --out out/lcm_s$s --precision fp32
    for w in 1.75 1.5; do $E --lora out/lcm_s$s --sampler lcm --steps 4 --guidance $w --out-dir out/eval_s${s}_lcm4_w$w; done
done
# times, alone
unset OMP_NUM_THREADS
python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm_b --style out/lora --out experiments/speed_lora
python app.py --bench --out-dir out/page --precision fp32 > experiments/speed_lora/page_bench.json
# tried on this base and not kept (data/tried/), lcm-4 at w 1.5 (the default guidance then)
for t in all attn-all; do
    python lora_finetune.py --distill lcm --targets $t --out out/x_$t --precision fp32
    $E --lora out/x_$t --sampler lcm --steps 4 --guidance 1.5 --out-dir out/e_$t
done
python lora_finetune.py --distill lcm --distill-w 1,2 --out out/y_w12 --precision fp32
$E --lora out/y_w12 --sampler lcm --steps 4 --guidance 1.5 --out-dir out/e_w12
for s in 0 1; do   # 300 steps instead of 240, at the default input w (1.75)
    python lora_finetune.py --distill lcm --distill-steps 300 --seed $s --out out/lcm300_s$s --precision fp32
    $E --lora out/lcm300_s$s --sampler lcm --steps 4 --out-dir out/eval_300_s${s}_w1.75
done

# the teacher's w drawn from 1..5 (the default from here on; out/lcm_w15 is the scored adapter), 1..7 and the levers
# that were not kept; one thread each, two at a time
export OMP_NUM_THREADS=1
python lora_finetune.py --distill lcm --distill-w 1,5 --out out/lcm_w15 --precision fp32                  # seed 0
for w in 1.75 1.5; do $E --lora out/lcm_w15 --sampler lcm --steps 4 --guidance $w --out-dir out/ev_w15_g$w; done  # data/lcm4_wW.json
for s in 1 2; do   # data/seeds/
    python lora_finetune.py --distill lcm --distill-w 1,5 --seed $s --out out/lcm_w15_s$s --precision fp32
    for w in 1.75 1.5; do $E --lora out/lcm_w15_s$s --sampler lcm --steps 4 --guidance $w --out-dir out/ev_w15_s${s}_g$w; done
done
for n in 1 2 8; do $E --lora out/lcm_w15 --sampler lcm --steps $n --out-dir out/ev_w15_lcm$n; done       # data/lcmN_w1.75.json
for w in 1 2.5; do $E --lora out/lcm_w15 --sampler lcm --steps 4 --guidance $w --out-dir out/ev_w15_g$w; done  # data/lcm4_wW.json
$E --lora out/lcm_w15 --lora out/lora --style italic --sampler lcm --steps 4 --out-dir out/ev_w15_italic      # lcm4_italic_w1.75
$E --lora out/lcm_w15 --lora out/serif --style-data held_out --sampler lcm --steps 4 --out-dir out/ev_w15_serif  # lcm4_serif_w1.75
for s in 0 1; do   # data/w_range/w1-7_*
    python lora_finetune.py --distill lcm --distill-w 1,7 --seed $s --out out/lcm_w17_s$s --precision fp32
    $E --lora out/lcm_w17_s$s --sampler lcm --steps 4 --out-dir out/ev_w17_s$s
done
for w in 2.5 3; do $E --lora out/lcm_b --sampler lcm --steps 4 --guidance $w --out-dir out/ev_b_w$w; done  # w_range/w1-3_seed0_*
python lora_finetune.py --distill lcm --distill-w 1,3 --distill-guidance-parallel 0.5 --out out/lcm_p05 --precision fp32
python lora_finetune.py --distill lcm --distill-w 1,3 --distill-huber-c 0.015 --out out/lcm_c015 --precision fp32
python lora_finetune.py --distill lcm --distill-w 1,3 --distill-loss l2 --out out/lcm_l2 --precision fp32
for a in p05 c015 l2; do $E --lora out/lcm_$a --sampler lcm --steps 4 --out-dir out/ev_$a; done        # data/tried/
export OMP_NUM_THREADS=1   # the three adapters and the base drawn again with other noise: data/draw1/
for a in w15 w15_s1 w15_s2; do
    python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --precision fp32 --seed 1 --lora out/lcm_$a --sampler lcm --steps 4 --out-dir out/ev_${a}_seed1draw
done
python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --precision fp32 --seed 1 --out-dir out/ev_base_seed1draw
# alone: the distillation's time, the picture, merged against unmerged
unset OMP_NUM_THREADS
/usr/bin/time -f "wall %e s" python lora_finetune.py --distill lcm --out out/lcm_t15 --precision fp32    # wall 208.81 s
python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm_w15 --style out/lora --out /tmp/sp --repeats 1
cp /tmp/sp/speed_lora.png experiments/speed_lora/speed_lora.png; cp /tmp/sp/speed_lora.png docs/speed_lora.png
for m in "" "--merge"; do   # the same uint8 images (max difference 0)
    python denoise.py --lora out/lcm_w15 --lora out/lora --sampler lcm --steps 4 --precision fp32 $m --out-dir out/mb15$m
done
