"""Time a 10-digit grid for the base and the speed adapter at each step count, and draw the README's picture.

    python experiments/speed_lora/speed.py --ckpt out/ckpt.pt --lcm out/lcm --style out/lora --out experiments/speed_lora

Writes ``timing.json`` (seconds per grid of ten digits, labels 0..9: the median of --repeats rounds after one
warm-up, each setting timed in turn round after round so a busy machine's drift hits all alike; fp32; the adapters
merged, as the page's fast path would run them) and ``speed_lora.png`` (a row per setting on the same seed, a
column per label). Quality is evaluate.py's (commands.sh); this measures the time and shows the digits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from adapter_formats import load_adapters  # noqa: E402
from cli import lora_spec  # noqa: E402
from config import SampleConfig  # noqa: E402
from diffusion import generate  # noqa: E402
from lora import merge_lora  # noqa: E402
from pictures import preview_png  # noqa: E402
from pipeline import load_pipeline  # noqa: E402

LABELS = torch.arange(10)
LCM_STEPS = (1, 2, 4, 8)


def settings(default):
    """(row name, adapters to load, SampleConfig): the base at the default sampler, then LCM-LoRA at each step
    count, then the base and the adapters at 4 steps of lcm; "style" stands for --style's adapter."""
    short = f"{default.sampler[:3]}{default.steps}"  # row names fit the picture's margin: dpm10
    rows = [(f"base {short}", (), default), ("base lcm4", (), SampleConfig(sampler="lcm", steps=4))]
    rows += [(f"LCM lcm{n}", ("lcm",), SampleConfig(sampler="lcm", steps=n)) for n in LCM_STEPS]
    rows += [(f"style {short}", ("style",), default),
             ("LCM+st lcm4", ("lcm", "style"), SampleConfig(sampler="lcm", steps=4))]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out/ckpt.pt")
    p.add_argument("--lcm", default="out/lcm", help="the speed adapter (lora_finetune.py --distill lcm)")
    p.add_argument("--style", default="out/lora", help="a style adapter to stack with it")
    p.add_argument("--out", default="experiments/speed_lora")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    paths = {"lcm": args.lcm, "style": args.style}
    rows, pipes = settings(SampleConfig()), {}
    for _, ads, _ in rows:  # one merged model per set of adapters, built once
        if ads not in pipes:
            adapters = load_adapters([lora_spec(paths[a]) for a in ads])
            pipe = load_pipeline(args.ckpt, device, adapters=adapters)
            if ads:
                merge_lora(pipe.model)
            pipes[ads] = pipe

    def grid(ads, cfg):
        pipe = pipes[ads]
        return generate(pipe.model, pipe.diffusion, LABELS, device, "fp32", cfg, seed=args.seed,
                        data_size=pipe.data_size)[0]
    pictures = {name: grid(ads, cfg) for name, ads, cfg in rows}  # also the warm-up
    times = {name: [] for name, _, _ in rows}
    for _ in range(args.repeats):
        for name, ads, cfg in rows:
            start = time.perf_counter()
            grid(ads, cfg)
            times[name].append(time.perf_counter() - start)
    result = {"ckpt": args.ckpt, "lcm": args.lcm, "style": args.style, "device": "cpu", "precision": "fp32",
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "seconds_per_grid_of_10": {k: statistics.median(v) for k, v in times.items()},
              "all_seconds": times}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "timing.json"), "w") as f:
        json.dump(result, f, indent=2)
    preview_png(pictures, LABELS.tolist(), os.path.join(args.out, "speed_lora.png"),
                f"base, speed adapter (LCM), style ({os.path.basename(os.path.normpath(args.style))}) "
                f"and both: sampler and steps per row; seed {args.seed}, guidance {SampleConfig().guidance:g}")
    for k, v in result["seconds_per_grid_of_10"].items():
        print(f"{k:<24} {v:.3f} s")


if __name__ == "__main__":
    main()
