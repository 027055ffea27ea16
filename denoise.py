"""Sample digits from a trained checkpoint, optionally with a LoRA adapter, and save pictures.

    python denoise.py                              # labels 0..9 from out/ckpt.pt (EMA weights)
    python denoise.py --labels 3,3,7 --n-per-label 4 --sampler ddpm --guidance 3
    python denoise.py --lora --merge               # + the adapter in out/lora/, merged into the weights
    python denoise.py --lora --lora-scale 0.5      # half the adapter's effect, unmerged
    python denoise.py --lora out/italic:0.8 --lora out/bold:0.5   # two adapters, each at its own weight

Writes, in --out-dir (default out/), with NAME = samples (or lora_samples with --lora):
    NAME_process.png   the denoising process: one row per label asked for (its first sample),
                       noise -> digit across columns
    NAME.png           a grid of the final samples, one column per label
    NAME.npz           images (uint8, N x 28 x 28 at the data set's resolution) and labels (N)
    lora_scale_sweep.png   with --lora: LoRA scale 0 -> 1 across columns, one row per label
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from adapter import DEFAULT_ADAPTER, attach_adapters, load_adapters
from checkpoint import load_for_sampling
from files import atomic_write, check_writable_dir
from config import SampleConfig
from cli import HelpFormatter, add_config_args, config_from_args, finite_float
from errors import CLIError, run_main
from dataset import save_grid
from diffusion import generate
from lora import merge_lora, set_lora_scale
from runtime import add_runtime_args, pick_device, resolve_precision

DEFAULT_LORA = DEFAULT_ADAPTER


def parse_labels(text, num_classes):
    """'0..9' (a range), '3,3,7' (a list) or a mix: '0..2,7'. Every label must be in 0..num_classes-1."""
    labels = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                lo, hi = (int(v) for v in part.split(".."))
                labels.extend(range(lo, hi + 1))
            elif part:
                labels.append(int(part))
        except ValueError:
            raise CLIError(f"--labels {text!r}: expected integers like 0..9 or 3,3,7") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad or not labels:
        raise CLIError(f"--labels {text!r}: every label must be in 0..{num_classes - 1} for this model"
                       f"{f' (got {bad})' if bad else ''}")
    return labels


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="base checkpoint from train.py")
    p.add_argument("--out-dir", default="out", help="where the pictures and the .npz go")
    p.add_argument("--name", default=None, help="file name stem (default samples, or lora_samples with --lora)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    p.add_argument("--labels", default="0..9", help="labels to draw: 0..9, 3,3,7 or 0..2,7")
    p.add_argument("--n-per-label", type=int, default=1, help="samples per label")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pictures")
    add_runtime_args(p)
    p.add_argument("--frames", type=int, default=10, help="columns of the denoising-process figure")
    p.add_argument("--show", action="store_true", help="also open the figures in a window")
    p.add_argument("--lora", nargs="?", const=DEFAULT_LORA, default=None, action="append", metavar="PATH[:WEIGHT]",
                   help=f"apply a LoRA adapter (default {DEFAULT_LORA}) at WEIGHT (default 1); repeat for several")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (needs --lora)")
    p.add_argument("--lora-scale", type=finite_float, default=1.0, help="strength of the adapter: 0 off, 1 as trained")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base checkpoint")
    add_config_args(p, SampleConfig)
    return p.parse_args(argv)


PROCESS_MAX_ROWS = 20  # rows of the denoising-process figure: matplotlib takes seconds per hundred axes


def process_rows(labels, n_per_label):
    """Indices of the samples the process figure shows: the first sample of each label asked for.

    ``--n-per-label 50`` draws 50 samples a label, but the figure keeps one row per label (at
    most PROCESS_MAX_ROWS), so it stays readable and is written in a second, whatever the count."""
    return [i * n_per_label for i in range(min(len(labels), PROCESS_MAX_ROWS))]


def process_figure(frames, labels, path, show=False):
    """One row per label, columns from pure noise to the final digit (the tutorial's figure).

    ``frames`` is a list of uint8 (rows, H, W) tensors, one per column; ``labels`` one per row."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    rows, cols = len(labels), len(frames)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(frames[c][r].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(labels[r]), rotation=0, labelpad=10)
    axes[0][0].set_title("noise", fontsize=8)
    axes[0][-1].set_title("digit", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    if show:
        plt.show()
    plt.close(fig)


def main(argv=None):
    return run_main(run, parse_args(argv))


def run(args):
    scfg = config_from_args(args, SampleConfig)
    if args.n_per_label <= 0 or args.frames < 0:
        raise CLIError("--n-per-label must be > 0 and --frames >= 0")
    if args.merge and not args.lora:
        raise CLIError("--merge needs --lora (there is no adapter to merge)")
    if args.lora_scale < 0:
        raise CLIError(f"--lora-scale must be >= 0, got {args.lora_scale}")
    check_writable_dir(args.out_dir, "--out-dir")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    # the flags are checked above; the labels and step count need the model, so they are checked
    # right after loading it, before anything samples or writes
    adapter = load_adapters(args.lora, device) if args.lora else None

    def attach(model, fingerprint):
        if adapter is not None:
            attach_adapters(model, adapter, fingerprint, force=args.force)

    pipe = load_for_sampling(args.ckpt, device, args.weights, attach)
    model, diffusion = pipe.model, pipe.diffusion
    labels = parse_labels(args.labels, model.num_classes)
    if scfg.sampler == "ddim" and scfg.steps > diffusion.timesteps:
        raise CLIError(f"--steps {scfg.steps} exceeds the model's T={diffusion.timesteps}")
    name = args.name or ("lora_samples" if adapter else "samples")
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    common = dict(device=device, precision=precision, cfg=scfg, seed=args.seed, data_size=pipe.data_size)
    written = []

    if adapter is not None:
        # the scale sweep runs on the unmerged model, where the scale is a runtime knob
        scales = [0.0, 0.25, 0.5, 0.75, 1.0]
        sweep_labels = torch.tensor(sorted(set(labels)))
        cols = []
        for s in scales:
            set_lora_scale(model, s)
            imgs, _ = generate(model, diffusion, sweep_labels, **common)
            cols.append(imgs)
        grid = torch.stack(cols, dim=1).flatten(0, 1)  # (labels x scales, H, W): row per label
        path = os.path.join(out, "lora_scale_sweep.png")
        save_grid(grid, path, nrow=len(scales))
        written.append(path)
        set_lora_scale(model, args.lora_scale)
        if args.merge:
            merge_lora(model)

    label_t = torch.tensor(labels).repeat_interleave(args.n_per_label)
    from tqdm import tqdm

    images, frames = generate(model, diffusion, label_t, num_frames=args.frames, **common,
                              progress=lambda ts: tqdm(ts, desc=f"{scfg.sampler} x{len(label_t)}", leave=False))
    grid_path = os.path.join(out, f"{name}.png")
    # one column per label, n_per_label rows
    order = torch.arange(len(label_t)).view(len(labels), args.n_per_label).T.flatten()
    save_grid(images[order], grid_path, nrow=len(labels))
    npz_path = os.path.join(out, f"{name}.npz")

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images.numpy(), labels=label_t.numpy().astype(np.int64))
    atomic_write(npz_path, write_npz)
    written += [grid_path, npz_path]
    if args.frames > 0:
        proc_path = os.path.join(out, f"{name}_process.png")
        rows = process_rows(labels, args.n_per_label)
        process_figure([f[rows] for f in frames], label_t[rows].tolist(), proc_path, show=args.show)
        written.append(proc_path)
    lora_note = ""
    if adapter is not None:
        lora_note = f", LoRA {', '.join(args.lora)} (scale {args.lora_scale}{', merged' if args.merge else ''})"
    steps = scfg.steps if scfg.sampler == "ddim" else diffusion.timesteps
    print(f"denoise: {len(label_t)} samples, {scfg.sampler} {steps} steps, guidance {scfg.guidance}{lora_note}; "
          f"wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    main()
