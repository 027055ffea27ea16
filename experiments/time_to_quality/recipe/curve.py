"""Frechet distance and accuracy against training minutes: the old default (noise objective, batch 128, DDIM-50)
beside the new one (v, batch 64, DPM-Solver++(2M)-10), from the files in this folder and ../results.json.

    python experiments/time_to_quality/recipe/curve.py     # writes curve.png and curve.json here

The old curve's minutes are that run's wall time (fp32, AVX2 setting, alone). The new run shared its CPU, so its
minutes are its steps times the seconds a step took in the quick start timed alone (quick_start_fp32.json).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(*parts):
    with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
        return json.load(f)


def curves():
    old = load("..", "results.json")["tables"]["base_default"]["rows"]
    old = [(r["training minutes (fp32, AVX2 setting)"], r["conditional accuracy"], r["Frechet distance"]) for r in old]
    timed = load("quick_start_fp32.json")
    step_s = timed["seconds_per_train_step"]
    new = []
    for name in sorted(os.listdir(os.path.join(HERE, "data"))):
        if name.startswith("v800b64_step") or name == "v800b64_dpm10.json":
            d = load("data", name)
            new.append((round(d["step"] * step_s / 60, 2), round(100 * d["accuracy"], 1),
                        round(d["frechet_distance"], 2)))
    return {"old": old, "new": sorted(new), "new_seconds_per_step": step_s}


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label, style in (("old", "old default: noise, batch 128, DDIM-50", "s--"),
                              ("new", "new default: v, batch 64, DPM-Solver++(2M)-10", "o-")):
        mins, _, fd = zip(*c[key])
        ax.plot(mins, fd, style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (2-core CPU, fp32, AVX2 setting)")
    ax.set_ylabel("Frechet distance (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curve.png"), dpi=90)
    with open(os.path.join(HERE, "curve.json"), "w") as f:
        json.dump(c, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
