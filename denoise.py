"""Sample digits from a trained checkpoint, optionally with a LoRA adapter, and save pictures.

    python denoise.py                              # labels 0..9 from out/ckpt.pt (EMA weights)
    python denoise.py --labels 3,3,7 --n-per-label 4 --sampler ddpm --guidance 3
    python denoise.py --lora --merge               # + the adapter in out/lora/, merged into the weights
    python denoise.py --lora --lora-weight 0.5     # half the adapter's effect, unmerged
    python denoise.py --lora out/italic:0.8 --lora out/bold:0.5   # two adapters, each at its own weight

Writes, in --out-dir (default out/), with NAME = samples (or lora_samples with --lora):
    NAME_process.png   the denoising process: one row per label asked for (its first sample),
                       noise -> digit across columns
    NAME.png           a grid of the final samples, one column per label
    NAME.npz           images (uint8, N x 28 x 28 at the data set's resolution) and labels (N)
    lora_weight_sweep.png  with --lora: a row per LoRA weight 0 -> 1, a column per label, labelled
"""
from __future__ import annotations

import os

import torch

from adapter import set_weights
from adapter_formats import LEGACY_DEFAULT_ADAPTER, load_adapters
from files import check_apart, check_replace, check_writable_dir, remove_stale_temps
from config import DEFAULT_ADAPTER, DEFAULT_CKPT, DEFAULT_OUT_DIR, SampleConfig
from cli import (ArgumentParser, add_config_args, add_lora_args, add_runtime_args, bounded, config_from_args, name_arg,
                 path_arg, runtime_from_args)
from errors import CLIError, run_main
from diffusion import generate
from lora import merge_lora
from pipeline import load_pipeline
from pictures import (column_order, process_figure, process_rows, save_grid, weight_sweep_png,
                      write_samples_npz)
from runtime import pick_device, resolve_precision

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


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    model, lora, sampling, out = p.group("model"), p.group("LoRA"), p.group("sampling"), p.group("output")
    model.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg, help="base checkpoint from train.py")
    out.add_argument("--out-dir", default=DEFAULT_OUT_DIR, type=path_arg, help="where the pictures and the .npz go")
    out.add_argument("--name", default=None, type=name_arg,
                     help="file name stem (default samples, or lora_samples with --lora)")
    model.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    sampling.add_argument("--labels", default="0..9", help="labels to draw: 0..9, 3,3,7 or 0..2,7")
    # all samples go through the model as one batch: more than 1000 per label (10,000 images) is a typo
    sampling.add_argument("--n-per-label", type=bounded(int, gt=0, le=1000), default=1, help="samples per label")
    out.add_argument("--frames", type=bounded(int, ge=0, le=100), default=10,
                     help="columns of the denoising-process figure (0: no figure)")
    out.add_argument("--show", action="store_true", help="also open the figures in a window")
    add_lora_args(lora)
    lora.add_argument("--merge", action="store_true", help="merge the adapter into the weights (needs --lora)")
    lora.add_argument("--force", action="store_true", help="load an adapter trained on another base checkpoint")
    add_config_args(p, SampleConfig)
    add_runtime_args(p)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None):
    return run_main(run, parse_args(argv))


def check_outputs(args):
    """Before anything is read: --out-dir can be written, no file written is --ckpt or inside an --lora adapter,
    and none of them holds a file of another kind (a picture's name holding a checkpoint is left alone)."""
    check_writable_dir(args.out_dir, "--out-dir")
    name = args.name or ("lora_samples" if args.lora else "samples")
    outputs = [(f"{name}.png", "png"), (f"{name}.npz", "npz")]
    if args.frames > 0:
        outputs.append((f"{name}_process.png", "png"))
    if args.lora:
        outputs.append(("lora_weight_sweep.png", "png"))
    inputs = [("--ckpt", args.ckpt)]
    for spec in args.lora or []:
        path = spec.path
        inputs.append(("--lora", path))
        if path == DEFAULT_ADAPTER:
            inputs.append(("--lora", LEGACY_DEFAULT_ADAPTER))  # what it falls back to
    paths = [("--out-dir", os.path.join(args.out_dir, f)) for f, _ in outputs]
    check_apart(paths, inputs, "pass another --out-dir or --name")
    for (_, path), (_, kind) in zip(paths, outputs):
        check_replace(path, "--out-dir", (kind,), None, f"a {'picture' if kind == 'png' else 'samples .npz'}")


def run(args):
    scfg = config_from_args(args, SampleConfig)
    rcfg = runtime_from_args(args)
    if args.merge and not args.lora:
        raise CLIError("--merge needs --lora (there is no adapter to merge)")
    check_outputs(args)
    device = pick_device(rcfg.device)
    precision = resolve_precision(rcfg.precision, device)  # sampling: the rule, never timed (same seed, same pictures)
    # the flags are checked above; the labels and step count need the model, so they are checked
    # right after loading it, before anything samples or writes
    adapter = load_adapters(args.lora, device) if args.lora else None
    pipe = load_pipeline(args.ckpt, device, args.weights, adapter, force=args.force)
    model, diffusion = pipe.model, pipe.diffusion
    labels = parse_labels(args.labels, model.num_classes)
    if scfg.sampler != "ddpm" and scfg.steps > diffusion.timesteps:
        raise CLIError(f"--steps {scfg.steps} exceeds the model's T={diffusion.timesteps}")
    name = args.name or ("lora_samples" if adapter else "samples")
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)  # what a killed run left half-written there
    common = dict(device=device, precision=precision, cfg=scfg, seed=rcfg.seed, data_size=pipe.data_size)
    written = []

    shown = ", ".join(map(str, args.lora or []))  # the adapters as given, PATH[:WEIGHT]
    if adapter is not None:
        # the weight sweep runs on the unmerged model, where the weight is a runtime knob
        weights = [0.0, 0.25, 0.5, 0.75, 1.0]
        sweep_labels = torch.tensor(sorted(set(labels)))
        cols = []
        for w in weights:
            set_weights(model, adapter, w)
            imgs, _ = generate(model, diffusion, sweep_labels, **common)
            cols.append(imgs)
        # a picture for people (labelled, 3x nearest-neighbour): a row per weight, a column per label
        path = os.path.join(out, "lora_weight_sweep.png")
        weight_sweep_png(dict(zip(weights, cols)), sweep_labels.tolist(), path,
                         f"{shown}: weight 0 to 1 on the same noise ({scfg.sampler}-{scfg.steps}, "
                         f"guidance {scfg.guidance:g}, seed {rcfg.seed})")
        written.append(path)
        set_weights(model, adapter, args.lora_weight)
        if args.merge:
            merge_lora(model)

    label_t = torch.tensor(labels).repeat_interleave(args.n_per_label)
    from tqdm import tqdm

    images, frames = generate(model, diffusion, label_t, num_frames=args.frames, **common,
                              progress=lambda ts: tqdm(ts, desc=f"{scfg.sampler} x{len(label_t)}", leave=False))
    grid_path = os.path.join(out, f"{name}.png")
    steps = scfg.steps if scfg.sampler != "ddpm" else diffusion.timesteps
    # the settings that drew this picture, in the PNG itself: the same command gives the same picture
    settings = {"ckpt": args.ckpt, "lora": " ".join(map(str, args.lora or [])) or "none",
                "lora_weight": args.lora_weight,
                "merged": bool(args.merge), "labels": ",".join(map(str, labels)), "n_per_label": args.n_per_label,
                "seed": rcfg.seed, "sampler": scfg.sampler, "steps": steps, "guidance": scfg.guidance,
                "eta": scfg.eta, "precision": precision}
    text = {"parameters": ", ".join(f"{k}: {v}" for k, v in settings.items()), **settings}
    save_grid(images[column_order(len(labels), args.n_per_label)], grid_path, nrow=len(labels), text=text)
    npz_path = write_samples_npz(os.path.join(out, f"{name}.npz"), images.numpy(), label_t.numpy())
    written += [grid_path, npz_path]
    if args.frames > 0:
        proc_path = os.path.join(out, f"{name}_process.png")
        rows = process_rows(labels, args.n_per_label)
        process_figure([f[rows] for f in frames], label_t[rows].tolist(), proc_path, show=args.show)
        written.append(proc_path)
    lora_note = ""
    if adapter is not None:
        lora_note = f", LoRA {shown} (weight {args.lora_weight}{', merged' if args.merge else ''})"
    print(f"denoise: {len(label_t)} samples, {scfg.sampler} {steps} steps, guidance {scfg.guidance}{lora_note}; "
          f"wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    main()
