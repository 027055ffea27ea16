"""Print notes.md's tables from the eval.json files evaluate.py wrote (kept in data/, one per row).

    python experiments/time_to_quality/bounded_loss/table.py
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
LEVERS = os.path.join(HERE, "..", "levers_500")
ROWS = {  # the table -> (label, file), each file an eval.json as evaluate.py wrote it
    "alone (500 steps of 64, 500 samples, guidance 2)": [
        ("G: v, uniform t, plain MSE (../levers_500's baseline)", os.path.join(LEVERS, "G_v500b64", "eval_dpm10")),
        ("H: the same with `--bounded-loss`", os.path.join(HERE, "H_bounded500", "eval_dpm10"))],
    "together (700 steps of 64, v; 1,000 samples) against the guidance": [
        ("the old default (plain MSE), guidance 2", os.path.join(HERE, "P_plain700", "eval_g2")),
        ("the old default (plain MSE), guidance 1.5", os.path.join(HERE, "P_plain700", "eval_g1.5"))] + [
        (f"`--bounded-loss`, guidance {g}", os.path.join(HERE, "I_bounded700", f"eval_{tag}"))
        for g, tag in (("2 (the old default)", "g2"), ("**1.5**", "g1.5"), ("1", "g1"),
                       ("2 on t/T in 0.5..1", "g2_i0.5-1"), ("1.5 on t/T in 0..0.5", "g1.5_i0-0.5"))],
    "the sweep, one setting at a time, and two more seeds (700 steps of 64; 1,000 samples, guidance 1.5)": [
        (label, os.path.join(HERE, run, "eval_g1.5")) for label, run in (
            ("**the default: lr 2e-3, warm-up 100, EMA 0.999 (seed 0)**", "I_bounded700"),
            ("lr 3e-3", "J_lr3e-3"), ("lr 1e-3", "L_lr1e-3"), ("EMA 0.98", "M_ema0.98"), ("warm-up 50", "N_warm50"),
            ("the default, seed 1", "S1_seed1"), ("the default, seed 2", "S2_seed2"),
            ("Min-SNR gamma 20 (not a sweep setting: more weight on the least noisy steps)", "Q_gamma20"))],
}


def row(label, path):
    path = os.path.join(path, "eval.json")
    if not os.path.exists(path):
        return f"| {label} | not run | | | |"
    with open(path) as f:
        r = json.load(f)
    return (f"| {label} | {100 * r['accuracy']:.1f}% | {r['frechet_distance']:.2f} | {r['ink']:.4f} | "
            f"{100 * r['zero_share']:.1f}% |")


def italic():
    """The italic adapter at three seeds on I_bounded700: the share of the way from the base's slant to real
    italic digits' (both on the same noise, guidance 1.5)."""
    with open(os.path.join(HERE, "I_bounded700", "eval_g1.5", "eval.json")) as f:
        base = json.load(f)
    print("\nthe italic adapter (every fine-tune default) on I_bounded700, 1,000 samples, guidance 1.5:\n\n"
          "| seed | slant | share of the way | accuracy | Frechet to real italic |\n| --- | ---: | ---: | ---: | ---: |")
    for s in (0, 1, 2):
        with open(os.path.join(HERE, "I_bounded700", f"eval_italic_s{s}", "eval.json")) as f:
            r = json.load(f)
        share = (r["slant"] - base["slant"]) / (r["real_style_slant"] - base["slant"])
        print(f"| {s} | {r['slant']:+.3f} (base {base['slant']:+.3f}, real italic {r['real_style_slant']:+.3f}) | "
              f"{100 * share:.0f}% | {100 * r['accuracy']:.1f}% | {r['frechet_distance_style']:.2f} |")


if __name__ == "__main__":
    for name, rows in ROWS.items():
        print(f"\n{name}:\n\n| run | accuracy | Frechet | ink | pixels exactly 0 |\n| --- | ---: | ---: | ---: | ---: |")
        for label, path in rows:
            print(row(label, path))
    italic()
