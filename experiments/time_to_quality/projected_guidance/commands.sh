#!/bin/bash
# What ran for notes.md, from the repository root, on the bases of ../bounded_loss (I_bounded700 = seed 0, the
# default; S1_seed1, S2_seed2). Two processes side by side, one thread each: the seconds inside the eval.json files
# are not timings. Scores: evaluate.py, 1,000 samples, DPM-Solver++(2M)-10, seed 0, offline set (mnist-5k).
set -euo pipefail
export OMP_NUM_THREADS=1
E="python evaluate.py --precision fp32 --n-per-label 100"
D=experiments/time_to_quality/projected_guidance

# plain guidance 1.25 (1, 1.5 and 2 are ../bounded_loss's)
$E --ckpt I_bounded700/ckpt.pt --guidance 1.25 --guidance-parallel 1 --out-dir $D/seed0/plain_g1.25
# guidance rescale (Lin et al. 2024), not kept
python $D/rescale_probe.py 0.7 --ckpt I_bounded700/ckpt.pt --precision fp32 --n-per-label 100 --guidance 2 \
    --guidance-parallel 1 --out-dir $D/seed0/rescale0.7_g2
# projected guidance: the default (guidance 1.75, parallel 0.5) on three seeds, and parallel 0
$E --ckpt I_bounded700/ckpt.pt --out-dir $D/seed0/p0.5_g1.75
$E --ckpt S1_seed1/ckpt.pt --out-dir $D/seed1/p0.5_g1.75
$E --ckpt S2_seed2/ckpt.pt --out-dir $D/seed2/p0.5_g1.75
$E --ckpt I_bounded700/ckpt.pt --guidance-parallel 0 --out-dir $D/seed0/p0_g1.75
# the rows marked (probe) ran before --guidance-parallel existed, with the same formula patched in; today's flags:
for gp in "2 0" "1.5 0.5" "1.75 0.6" "2 0.5"; do
    set -- $gp
    $E --ckpt I_bounded700/ckpt.pt --guidance $1 --guidance-parallel $2 --out-dir $D/seed0/probe_p$2_g$1
done
# the italic adapters of ../bounded_loss (I_italic_s0..2, every fine-tune default) at the default sampler
for s in 0 1 2; do $E --ckpt I_bounded700/ckpt.pt --lora I_italic_s$s --out-dir $D/italic/seed$s; done
python $D/table.py
