"""The table of notes.md's "Four minutes" section from the eval.json files evaluate.py wrote under data/budget/.

    python experiments/speed_lora/budget_table.py
"""
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "budget")
ROWS = [  # (file, what was distilled; every other setting the distillation's default of the day)
    ("a240_lcm4", "240 steps of 64, skip k 20 (LCM's)"),
    ("V1_lcm4", "275 steps of 64, skip k 50"),
    ("P1_lcm4", "275 steps of 64, skip k 100"),
    ("P2_lcm4", "275 steps of 64, skip k 50, lr 2e-2"),
    ("V2_lcm4", "560 steps of 32, skip k 20"),
    ("V3_lcm4", "275 steps of 64, skip k 20, no EMA target (`--distill-ema 0`)"),
    ("V4_lcm4", "275 steps of 64, skip k 50, no EMA target"),
]


def main():
    print("| distilled (r 4 on Wq, Wk, Wv, lr 1e-2, w 1..3) | lcm-4 accuracy | Frechet | ink | pixels exactly 0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, what in ROWS:
        with open(os.path.join(HERE, f"{name}.json")) as f:
            e = json.load(f)
        print(f"| {what} | {e['accuracy']:.1%} | {e['frechet_distance']:.2f} | {e['ink']:.3f} | {e['zero_share']:.3f} |")


if __name__ == "__main__":
    main()
