"""Draws docs/lora_diagram.png: a frozen weight W beside the trainable low-rank update B A (Hu et al. 2021, fig. 1).

    python experiments/lora_diagram.py            # -> docs/lora_diagram.png
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROZEN, TRAINED, DATA = "#c9ced6", "#f4a259", "#8ecae6"


def _box(ax, x, y, w, h, color, title, sub):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", linewidth=1.5))
    ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=18, fontweight="bold")
    ax.text(x + w / 2, y - 0.25, sub, ha="center", va="top", fontsize=11)


def _arrow(ax, a, b, text=None):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=18, linewidth=1.5, color="black"))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.15, text, ha="center", va="bottom", fontsize=11)


def draw(path):
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.set_xlim(0, 15)
    ax.set_ylim(-1.6, 8.6)
    ax.set_aspect("equal")
    ax.axis("off")
    # x: the layer's input, k numbers per token
    _box(ax, 0.3, 3.2, 0.8, 2.4, DATA, "x", "input\n(k per token)")
    # the frozen path: W is d x k
    _box(ax, 3.2, 5.0, 3.0, 3.0, FROZEN, "W", "frozen: d x k,\nthe base's trained weight")
    # the trainable path: A squeezes k numbers to r, B spreads r back to d
    _box(ax, 3.2, 1.7, 3.0, 0.6, TRAINED, "A", "")
    ax.text(4.7, 1.45, "trainable: r x k\n(random at the start)", ha="center", va="top", fontsize=11)
    _box(ax, 7.4, 0.6, 0.6, 3.0, TRAINED, "B", "")
    ax.text(8.2, 0.9, "trainable: d x r\n(zero at the start)", ha="left", va="center", fontsize=11)
    # the sum and the output
    ax.add_patch(plt.Circle((10.5, 4.4), 0.45, facecolor="white", edgecolor="black", linewidth=1.5))
    ax.text(10.5, 4.4, "+", ha="center", va="center", fontsize=24)
    _box(ax, 13.6, 3.2, 0.8, 2.4, DATA, "h", "output\n(d per token)")
    _arrow(ax, (1.1, 5.0), (3.2, 6.5))
    _arrow(ax, (1.1, 3.8), (3.2, 2.0))
    _arrow(ax, (6.2, 2.0), (7.4, 2.0))
    ax.text(6.8, 2.45, "r", ha="center", va="bottom", fontsize=12, fontstyle="italic")
    _arrow(ax, (6.2, 6.5), (10.15, 4.7), "W x")
    _arrow(ax, (8.0, 2.1), (10.15, 4.1))
    ax.text(10.6, 2.9, "B A x\n× alpha / r\n× weight", ha="left", va="center", fontsize=11)
    _arrow(ax, (10.95, 4.4), (13.6, 4.4))
    ax.text(7.5, 8.55, "LoRA: h = W x + (alpha / r) · weight · B A x", ha="center", va="top", fontsize=16,
            fontweight="bold")
    ax.text(0.3, -1.5, "Only A and B are trained and shared: r (d + k) numbers per layer instead of d k.\n"
                        "B starts at zero, so a new adapter changes nothing; merging adds (alpha / r) · weight · B A "
                        "into W once,\nand sampling then costs what the base costs.",
            ha="left", va="bottom", fontsize=10.5)
    fig.savefig(path, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def main(argv=None):
    print(draw(os.path.join(ROOT, "docs", "lora_diagram.png")))


if __name__ == "__main__":
    main(sys.argv[1:])
