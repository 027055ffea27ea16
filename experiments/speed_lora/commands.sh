#!/bin/bash
# The speed adapter (LCM-LoRA, lora_finetune.py --distill lcm) on the default base: distil it, score it at 1, 2, 4
# and 8 steps against the base, stack it with the italic adapter and with an own style, time a grid of ten digits.
# From the repository root, alone on the machine, fp32 under the AVX2 setting (the README's laptop setting).
# Quality: evaluate.py, 1,000 samples (100 a label), seed 0, guidance 2 (with --sampler lcm: the adapter's input w).
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
E=experiments/speed_lora
EVAL="python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --precision fp32"

# the default base and the italic adapter, as the quick start makes them (kept when out/ holds them)
[ -f out/ckpt.pt ] || python train.py --precision fp32
[ -d out/lora ] || python lora_finetune.py --precision fp32 --preview-every 0

# 1. the speed adapter; its log's last line gives the minutes (the Goal: at most 5). A: the adapter defaults
#    (Wq, Wk, Wv at r 4); B: every layer at r 8, the size LCM-LoRA adapts (SD's attention, feed-forward and convs)
python lora_finetune.py --distill lcm --out out/lcm --precision fp32 --overwrite 2>&1 | tee $E/distill_A.log
python lora_finetune.py --distill lcm --out out/lcm_all --targets all --r 8 --alpha 8 --lora-lr 3e-3 \
    --precision fp32 --overwrite 2>&1 | tee $E/distill_B.log
python lora_tools.py info out/lcm > $E/info_A.txt

# 2. accuracy and distance against steps: the base at the default sampler (dpmpp-2m, 10 steps, guided: 20 network
#    evaluations an image), the base alone under lcm (unguided, no adapter), and each speed adapter
$EVAL --out-dir $E/base_default
for n in 1 2 4 8; do
    $EVAL --sampler lcm --steps $n --out-dir $E/base_lcm$n
    $EVAL --lora out/lcm --sampler lcm --steps $n --out-dir $E/A_lcm$n
    $EVAL --lora out/lcm_all --sampler lcm --steps $n --out-dir $E/B_lcm$n
done

# 3. stacked with the italic adapter: the slant at lcm-4 against the italic adapter's at the default sampler
$EVAL --lora out/lora --style italic --out-dir $E/italic_default
for n in 2 4 8; do
    $EVAL --lora out/lcm --lora out/lora --style italic --sampler lcm --steps $n --out-dir $E/A_italic_lcm$n
    $EVAL --lora out/lcm_all --lora out/lora --style italic --sampler lcm --steps $n --out-dir $E/B_italic_lcm$n
done
# ... and with an own style (the README's serif typeface, --data), scored against another render of it
python lora_tools.py render-style "font:DejaVu Serif Bold" --per-label 20 --out $E/my_digits
python lora_tools.py render-style "font:DejaVu Serif Bold" --seed 1 --out $E/held_out
python lora_finetune.py --data $E/my_digits --targets all --r 2 --alpha 2 --lora-lr 3e-3 --out out/serif \
    --precision fp32 --preview-every 0 --overwrite
$EVAL --lora out/serif --style-data $E/held_out --out-dir $E/serif_default
$EVAL --lora out/lcm --lora out/serif --style-data $E/held_out --sampler lcm --steps 4 --out-dir $E/A_serif_lcm4

# 4. merged against unmerged, both adapters, lcm-4: the same images within tolerance (denoise.py's .npz)
python denoise.py --lora out/lcm --lora out/lora --sampler lcm --steps 4 --precision fp32 --out-dir $E/unmerged
python denoise.py --lora out/lcm --lora out/lora --sampler lcm --steps 4 --precision fp32 --merge --out-dir $E/merged
python -c "import numpy as np; a, b = (np.load(f'$E/{d}/lora_samples.npz')['images'].astype(int) for d in ('unmerged', 'merged')); \
print('max |merged - unmerged| in grey levels:', abs(a - b).max(), 'share of pixels differing:', (a != b).mean())" \
    | tee $E/merge_check.txt

# 5. time: a grid of ten digits, each setting (adapters merged), median of 5 rounds; and the picture for the README
python $E/speed.py --ckpt out/ckpt.pt --lcm out/lcm --style out/lora --out $E
cp $E/speed_lora.png docs/speed_lora.png
