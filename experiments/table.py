"""The README's results table, generated from the files in experiments/default/ (and the speed adapter's row from
experiments/speed_lora/data/), so it cannot drift.

    python experiments/table.py            # prints the Markdown that sits between the README's results markers

Quality comes from what the scripts wrote (default/eval_base/eval.json, default/eval_lora/eval.json,
default/run.json) when those files are there, and from default/results.json (the README's own earlier
figures, each with the commit that first wrote it) when they are not. Speed always comes from
default/results.json: the figures measured on the reference machine, alone on it.
"""
from __future__ import annotations

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(HERE, "default")


def _load(*parts):
    path = os.path.join(DEFAULT, *parts)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _quality():
    """(base scores, adapter scores, sizes, where they came from) in eval.json's own keys."""
    base, lora, run = _load("eval_base", "eval.json"), _load("eval_lora", "eval.json"), _load("run.json")
    if base and lora and run:
        return ({**base, "trained": run["trained"]}, {**lora, "base_slant": base["slant"]}, run["adapter_size"],
                "experiments/default/")
    old = _load("results.json")["readme_quality"]
    return old["base"], old["lora"], old["adapter_size"], "experiments/default/results.json"


def _weight(scores):
    """The adapter's weight an eval.json records: ``lora_weight``, or ``lora_scale`` as files written before the
    strength had one name call it; 1 when it says neither (results.json's summary)."""
    for key in ("lora_weight", "lora_scale"):
        if scores.get(key) is not None:
            return scores[key]
    return 1.0


def _minutes(seconds):
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s"


def _reference(d):
    """'mnist-5k/test (500 images)', as evaluate.py names the digits it compares with, in words."""
    m = re.fullmatch(r"(\S+)/test \((\d+) images\)", d["frechet_samples_vs"])
    if not m:
        return d["frechet_samples_vs"]
    name = {"mnist-5k": "the offline set (mnist-5k)", "mnist": "MNIST"}.get(m.group(1), m.group(1))
    return f"the {int(m.group(2)):,} held-out digits of {name}"


def _sampling(d):
    name = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp-2m": "DPM-Solver++(2M)", "heun": "Heun"}.get(d["sampler"],
                                                                                            d["sampler"])
    sampler = f"{name}-{d['steps']}" + (f" ({d['model_evals_per_image']} network evaluations an image)"
                                         if d.get("model_evals_per_image") else "")
    parallel = d.get("guidance_parallel", 1.0)  # eval.json files from before projected guidance: plain
    projected = f" with {parallel:g} of its parallel push (projected)" if parallel != 1 else ""
    return f"{d['num_samples']:,} samples, {sampler}, guidance {d['guidance']:g}{projected}"


def table() -> str:
    base, lora, sizes, where = _quality()
    share = (lora["slant"] - lora["base_slant"]) / (lora["real_style_slant"] - lora["base_slant"])
    speed = _load("results.json")["quick_start_speed"]
    rows = [
        ("base: conditional accuracy", f"**{100 * base['accuracy']:.1f}%**"),
        ("base: Frechet distance (floor: real digits against real digits)",
         f"{base['frechet_distance']:.2f} ({base['frechet_floor']:.2f})"),
        ("base: ink (real digits)", f"{base['ink']:.3f} ({base['real_ink']:.3f})"),
    ]
    if base.get("zero_share") is not None:  # eval.json files written before it was counted lack it
        rows.append(("base: pixels exactly 0 (real digits)",
                     f"{100 * base['zero_share']:.0f}% ({100 * base['real_zero_share']:.0f}%)"))
    rows += [
        (f"{lora['real_style']} adapter: share of the way to real {lora['real_style']} slant",
         f"**{100 * share:.0f}%** (slant {lora['base_slant']:+.3f} -> {lora['slant']:+.3f}; "
         f"real {lora['real_style']} {lora['real_style_slant']:+.3f})"),
        (f"{lora['real_style']} adapter: conditional accuracy", f"{100 * lora['accuracy']:.1f}%"),
        (f"{lora['real_style']} adapter: Frechet distance to real {lora['real_style']} digits",
         f"{lora['frechet_distance_style']:.2f}"),
        ("adapter size", f"{sizes['lora_parameters']:,} parameters ({100 * sizes['lora_parameters'] / sizes['base_parameters']:.2f}%"
                         f" of the base's {sizes['base_parameters']:,}), {sizes['shared_bytes']:,} bytes as shared"),
    ]
    # the speed adapter's own study, on the same base, at the default guidance input of the day
    lcm = _load(os.pardir, "speed_lora", "data", "lcm4_w1.75.json")
    if lcm:
        rows.append(("speed adapter (`--distill lcm`), 4 steps: accuracy, Frechet distance",
                     f"{100 * lcm['accuracy']:.1f}%, {lcm['frechet_distance']:.2f} ({lcm['model_evals_per_image']} "
                     f"network evaluations an image; [speed_lora](experiments/speed_lora/notes.md))"))
    for s in speed:
        rows.append((f"the quick start, {s['label']}",
                     f"{_minutes(s['total_s'])} (training {s['train_min']:.1f} min, fine-tune {s['finetune_min']:.1f} min,"
                     f" denoise {s['denoise_s']} s)"))
    lines = ["| | measured |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    lines += [
        "",
        f"- Machine: {speed[0]['machine']}.",
        f"- Quality: the default base and italic adapter ({base['trained']}), scored by `evaluate.py` on the base"
        f" ({_sampling(base)}) and with the adapter at weight {_weight(lora):g} ({_sampling(lora)}), seed 0; Frechet distances in the"
        f" reference classifier's features against {_reference(base)}; from [{where}]({where}).",
        f"- Speed: the quick start's first command from a fresh clone, requirements installed; laptop setting:"
        f" {speed[0]['settings']}.",
    ]
    return "\n".join(lines)


def main(argv=None):
    print(table())


if __name__ == "__main__":
    main(sys.argv[1:])
