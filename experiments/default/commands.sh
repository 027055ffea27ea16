#!/usr/bin/env bash
# The quick start's defaults run end to end and scored, exactly as for experiments/default/.
# Run from a clone of the repository at the commit named in notes.md. The first three ran alone (timed by
# experiments/time_to_quality/recipe/time_quick_start.py); the evaluations shared the machine, one thread each.
set -euo pipefail
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
python train.py && python lora_finetune.py && python denoise.py --lora --merge
OMP_NUM_THREADS=1 python evaluate.py --ckpt out/ckpt.pt --n-per-label 100 --out-dir out/eval_base
OMP_NUM_THREADS=1 python evaluate.py --ckpt out/ckpt.pt --lora out/lora --n-per-label 100 --out-dir out/eval_lora

# what the scripts wrote, copied as they are
dst=experiments/default
mkdir -p "$dst/eval_base" "$dst/eval_lora" "$dst/lora"
cp out/config.json "$dst/config.json"
cp out/eval_base/eval.json "$dst/eval_base/eval.json"
cp out/eval_lora/eval.json "$dst/eval_lora/eval.json"
cp out/lora/adapter_config.json "$dst/lora/adapter_config.json"
# sizes and how the run trained, for experiments/table.py
python - <<'PY'
import json, os
import torch
from safetensors import safe_open
from runtime import pick_device, resolve_precision
ckpt = torch.load("out/ckpt.pt", weights_only=True, map_location="cpu")
with safe_open("out/lora/adapter_model.safetensors", "pt") as f:
    lora_parameters = sum(f.get_tensor(k).numel() for k in f.keys())
shared = sum(os.path.getsize(os.path.join("out/lora", n)) for n in ("adapter_model.safetensors", "adapter_config.json"))
device = pick_device("auto")
run = {"trained": f"{resolve_precision('auto', device)} throughout, as `--precision auto` chose on this "
                  f"{str(device).upper()}",
       "dataset": ckpt["dataset"], "base_step": ckpt["step"],
       "adapter_size": {"lora_parameters": lora_parameters,
                        "base_parameters": sum(v.numel() for v in ckpt["model"].values() if v.is_floating_point()),
                        "shared_bytes": shared}}
with open("experiments/default/run.json", "w") as f:
    json.dump(run, f, indent=1)
    f.write("\n")
PY
