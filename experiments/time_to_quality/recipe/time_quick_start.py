"""Time the README's first command, stage by stage, in a fresh clone, and write what it saw as JSON.

    git clone REPO /tmp/qs && cd /tmp/qs && MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        ATEN_CPU_CAPABILITY=avx2 python experiments/time_to_quality/recipe/time_quick_start.py OUT.json

The stages run one after the other exactly as the README chains them (each must succeed for the next to run); the
machine should have nothing else running.
"""
import json
import os
import platform
import re
import subprocess
import sys
import time

STAGES = [("pip", "pip install -r requirements.txt"), ("train", "python train.py"),
          ("finetune", "python lora_finetune.py"), ("denoise", "python denoise.py --lora --merge")]


def cpu_name():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(out_path):
    result = {"command": " && ".join(cmd for _, cmd in STAGES), "cpu": cpu_name(), "cores": os.cpu_count(),
              "environment": {k: os.environ.get(k) for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
                                                             "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}}
    start = time.perf_counter()
    for name, cmd in STAGES:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        result[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        tail = (proc.stdout + proc.stderr).replace("\r", "\n")
        if proc.returncode:
            sys.exit(f"{cmd} failed ({proc.returncode}):\n{tail[-2000:]}")
        for line in tail.splitlines():
            if re.search(r"(train|lora): done|precision|dataset:", line):
                result.setdefault("said", []).append(line.strip())
    result["total_s"] = round(time.perf_counter() - start, 1)
    # the train stage's seconds over its steps: start-up, data and sample grids included, so an upper bound
    steps = next(int(m.group(1)) for line in result["said"] if (m := re.search(r"train: done, (\d+) steps", line)))
    result["seconds_per_train_step"] = round(result["train_s"] / steps, 3)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
