"""Print notes.md's tables from the eval.json files evaluate.py wrote (kept beside this file, one folder per row).

    python experiments/time_to_quality/projected_guidance/table.py
"""
import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BOUNDED = os.path.join(HERE, "..", "bounded_loss")
# a row of a table from one eval.json, as ../bounded_loss prints its own
_spec = importlib.util.spec_from_file_location("bounded_loss_table", os.path.join(BOUNDED, "table.py"))
_bounded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bounded)
row = _bounded.row
ROWS = {  # the table -> (label, folder holding an eval.json)
    "the default base (seed 0, 700 steps of 64), 1,000 samples, DPM-Solver++(2M)-10": [
        ("plain guidance 1 (../bounded_loss)", os.path.join(BOUNDED, "I_bounded700", "eval_g1")),
        ("plain guidance 1.25", os.path.join(HERE, "seed0", "plain_g1.25")),
        ("plain guidance 1.5 (the previous default; ../bounded_loss)",
         os.path.join(BOUNDED, "I_bounded700", "eval_g1.5")),
        ("plain guidance 2 (../bounded_loss)", os.path.join(BOUNDED, "I_bounded700", "eval_g2")),
        ("guidance rescale (Lin et al.), phi 0.7, guidance 2", os.path.join(HERE, "seed0", "rescale0.7_g2")),
        ("projected, parallel 0, guidance 1.75", os.path.join(HERE, "seed0", "p0_g1.75")),
        ("projected, parallel 0, guidance 2 (probe)", os.path.join(HERE, "seed0", "probe_p0_g2")),
        ("projected, parallel 0.5, guidance 1.5 (probe)", os.path.join(HERE, "seed0", "probe_p0.5_g1.5")),
        ("**projected, parallel 0.5, guidance 1.75 (the default)**", os.path.join(HERE, "seed0", "p0.5_g1.75")),
        ("projected, parallel 0.6, guidance 1.75 (probe)", os.path.join(HERE, "seed0", "probe_p0.6_g1.75")),
        ("projected, parallel 0.5, guidance 2 (probe)", os.path.join(HERE, "seed0", "probe_p0.5_g2"))],
    "the default sampler on the three seeds of the default base": [
        (f"seed {s}", os.path.join(HERE, f"seed{s}", "p0.5_g1.75")) for s in (0, 1, 2)],
}


def italic():
    """The italic adapter at three seeds on the seed-0 base, at the default sampler: the share of the way from
    the base's slant to real italic digits' slant, and the accuracy."""
    with open(os.path.join(HERE, "seed0", "p0.5_g1.75", "eval.json")) as f:
        base = json.load(f)["slant"]
    lines = ["| seed | slant | share of the way | accuracy | Frechet to real italic |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for s in (0, 1, 2):
        path = os.path.join(HERE, "italic", f"seed{s}", "eval.json")
        if not os.path.exists(path):
            lines.append(f"| {s} | not run | | | |")
            continue
        with open(path) as f:
            r = json.load(f)
        share = (r["slant"] - base) / (r["real_style_slant"] - base)
        lines.append(f"| {s} | {r['slant']:+.3f} (base {base:+.3f}, real italic {r['real_style_slant']:+.3f}) | "
                     f"{100 * share:.0f}% | {100 * r['accuracy']:.1f}% | {r['frechet_distance_style']:.2f} |")
    return lines


if __name__ == "__main__":
    for title, rows in ROWS.items():
        print(f"\n{title}:\n\n| run | accuracy | Frechet | ink (real 0.1352) | pixels exactly 0 (real 80.4%) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, folder in rows:
            print(row(label, folder))
    print("\nthe italic adapter (every fine-tune default, ../bounded_loss's three) at the default sampler:\n")
    print("\n".join(italic()))
