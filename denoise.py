"""Sample digits from a trained checkpoint, optionally with a LoRA adapter, and save pictures.

    python denoise.py                              # labels 0..9 from out/ckpt.pt (EMA weights)
    python denoise.py --labels 3,3,7 --n-per-label 4 --sampler ddpm --guidance 3
    python denoise.py --lora --merge               # + out/lora.pt, merged into the weights
    python denoise.py --lora --lora-scale 0.5      # half the adapter's effect, unmerged

Writes, in --out-dir (default out/), with NAME = samples (or lora_samples with --lora):
    NAME_process.png   the denoising process: one row per sample, noise -> digit across columns
    NAME.png           a grid of the final samples, one column per label
    NAME.npz           images (uint8, N x 28 x 28 at the data set's resolution) and labels (N)
    lora_scale_sweep.png   with --lora: LoRA scale 0 -> 1 across columns, one row per label
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from config import CLIError, DiffusionConfig, SampleConfig, add_config_args, atomic_write, config_from_args, run_main
from dataset import save_grid
from diffusion import Diffusion
from lora import apply_adapter, load_adapter, merge_lora, set_lora_scale
from train import generate, pick_device, resolve_precision
from unet import load_model, state_fingerprint

DEFAULT_LORA = os.path.join("out", "lora.pt")


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
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join("out", "ckpt.pt"), help="base checkpoint from train.py")
    p.add_argument("--out-dir", default="out", help="where the pictures and the .npz go")
    p.add_argument("--name", default=None, help="file name stem (default samples, or lora_samples with --lora)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    p.add_argument("--labels", default="0..9", help="labels to draw: 0..9, 3,3,7 or 0..2,7")
    p.add_argument("--n-per-label", type=int, default=1, help="samples per label")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pictures")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--frames", type=int, default=10, help="columns of the denoising-process figure")
    p.add_argument("--show", action="store_true", help="also open the figures in a window")
    p.add_argument("--lora", nargs="?", const=DEFAULT_LORA, default=None, metavar="PATH",
                   help=f"apply a LoRA adapter (default {DEFAULT_LORA})")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (needs --lora)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the adapter: 0 off, 1 as trained")
    p.add_argument("--force", action="store_true", help="load an adapter trained on another base checkpoint")
    add_config_args(p, SampleConfig)
    return p.parse_args(argv)


def process_figure(frames, labels, path, show=False):
    """One row per sample, columns from pure noise to the final digit (the tutorial's figure)."""
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
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    # validate everything the user typed before loading or writing anything
    model, ckpt = load_model(args.ckpt, device, args.weights)
    labels = parse_labels(args.labels, model.num_classes)
    dcfg = DiffusionConfig(**ckpt["config"]["diffusion"])
    if scfg.sampler == "ddim" and scfg.steps > dcfg.timesteps:
        raise CLIError(f"--steps {scfg.steps} exceeds the model's T={dcfg.timesteps}")
    diffusion = Diffusion.from_config(dcfg).to(device)
    data_size = ckpt.get("data_size", 28)
    adapter = None
    if args.lora:
        adapter = load_adapter(args.lora, device)
        apply_adapter(model, adapter, state_fingerprint(ckpt[args.weights]), force=args.force)
    name = args.name or ("lora_samples" if adapter else "samples")
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    common = dict(device=device, precision=precision, sampler=scfg.sampler, steps=scfg.steps, eta=scfg.eta,
                  guidance=scfg.guidance, seed=args.seed, data_size=data_size)
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
    atomic_write(npz_path, lambda tmp: np.savez_compressed(open(tmp, "wb"), images=images.numpy(),
                                                           labels=label_t.numpy().astype(np.int64)))
    written += [grid_path, npz_path]
    if args.frames > 0:
        proc_path = os.path.join(out, f"{name}_process.png")
        process_figure(frames, label_t.tolist(), proc_path, show=args.show)
        written.append(proc_path)
    lora_note = ""
    if adapter is not None:
        lora_note = f", LoRA {args.lora} (scale {args.lora_scale}{', merged' if args.merge else ''})"
    print(f"denoise: {len(label_t)} samples, {scfg.sampler} {scfg.steps if scfg.sampler == 'ddim' else dcfg.timesteps}"
          f" steps, guidance {scfg.guidance}{lora_note}; wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    main()
