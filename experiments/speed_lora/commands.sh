#!/bin/bash
# The speed adapter (LCM-LoRA, lora_finetune.py --distill lcm) on the default base, as notes.md measures it: distil
# it (three seeds), score it at 1, 2, 4 and 8 steps against the base, stack it with the italic adapter and with an
# own style, merged against unmerged, time a grid of ten digits and the page's fast redraw.
# From the repository root, fp32 under the AVX2 setting (the README's laptop setting); time alone on the machine.
# Quality: evaluate.py, 1,000 samples (100 a label), seed 0, the default guidance 1.75 (with --sampler lcm: the
# adapter's input w). What actually ran, with the files it wrote: commands_run.sh, data/.
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
E=out/speed_lora   # the files the scripts write (data/ holds those that ran)
EVAL="python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --precision fp32"
mkdir -p $E

# the default base and the italic adapter, as the quick start makes them (kept when out/ holds them)
[ -f out/ckpt.pt ] || python train.py --precision fp32
[ -d out/lora ] || python lora_finetune.py --precision fp32

# 1. the speed adapter, timed (the Goal: at most 5 minutes), and two more seeds
/usr/bin/time -f "wall %e s" python lora_finetune.py --distill lcm --out out/lcm --precision fp32 --overwrite
for s in 1 2; do python lora_finetune.py --distill lcm --seed $s --out out/lcm_s$s --precision fp32 --overwrite; done

# 2. accuracy and distance against steps: the base at the default sampler (20 network evaluations an image), the
#    base alone under lcm (no adapter, so unguided), the speed adapter; seeds 1 and 2 at 4 steps
$EVAL --out-dir $E/base_default
for n in 4 8; do $EVAL --sampler lcm --steps $n --out-dir $E/base_lcm$n; done
for n in 1 2 4 8; do $EVAL --lora out/lcm --sampler lcm --steps $n --out-dir $E/lcm$n; done
for s in 1 2; do $EVAL --lora out/lcm_s$s --sampler lcm --steps 4 --out-dir $E/lcm4_seed$s; done
for w in 1 1.5 2.5; do $EVAL --lora out/lcm --sampler lcm --steps 4 --guidance $w --out-dir $E/lcm4_w$w; done

# 3. stacked with the italic adapter: its slant at lcm-4 against the italic adapter's at the default sampler
$EVAL --lora out/lora --style italic --out-dir $E/italic_default
$EVAL --lora out/lcm --lora out/lora --style italic --sampler lcm --steps 4 --out-dir $E/lcm4_italic
# ... and with an own style (the README's serif typeface, --data), scored against another render of it
python lora_tools.py render-style "font:DejaVu Serif Bold" --per-label 20 --out $E/my_digits
python lora_tools.py render-style "font:DejaVu Serif Bold" --seed 1 --out $E/held_out
python lora_finetune.py --data $E/my_digits --targets all --r 2 --alpha 2 --lora-lr 3e-3 --out out/serif \
    --precision fp32 --preview-every 0 --overwrite
$EVAL --lora out/serif --style-data $E/held_out --out-dir $E/serif_default
$EVAL --lora out/lcm --lora out/serif --style-data $E/held_out --sampler lcm --steps 4 --out-dir $E/lcm4_serif

# 4. merged against unmerged, both adapters, lcm-4: the same images (denoise.py's .npz)
for m in "" "--merge"; do
    python denoise.py --lora out/lcm --lora out/lora --sampler lcm --steps 4 --precision fp32 $m --out-dir $E/both$m
done
python -c "import numpy as np; a, b = (np.load(f'$E/{d}/lora_samples.npz')['images'].astype(int) for d in ('both', 'both--merge')); \
print('max |merged - unmerged| in grey levels:', abs(a - b).max())"

# 5. time: a grid of ten digits per setting (adapters merged, median of 5) and the picture; the page's fast redraw
python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm --style out/lora --out $E
mkdir -p out/page && cp -r out/lcm out/lora out/page/
python app.py --bench --out-dir out/page --precision fp32 > $E/page_bench.json
