"""Sample digits from a trained checkpoint, optionally with a LoRA adapter, and save pictures.

    python denoise.py                              # labels 0..9 from out/ckpt.pt (EMA weights)
    python denoise.py --labels 3,3,7 --n-per-label 4 --sampler ddpm --guidance 3
    python denoise.py --lora --merge               # + the adapter in out/lora/, merged into the weights
    python denoise.py --lora --lora-weight 0.5     # half the adapter's effect, unmerged
    python denoise.py --lora out/italic:0.8 --lora out/bold:0.5   # two adapters, each at its own weight
    python denoise.py --lora "<lora:italic:0.8>" --lora-dir ~/adapters   # an adapter by its folder's name
    python denoise.py --init my7.png --strength 0.6 --labels 7 --lora out/lora   # img2img: restyle your digit
    python denoise.py --from-png out/samples.png --out-dir again   # the same grid again, from its PNG's settings

Writes, in --out-dir (default out/), with NAME = samples (or lora_samples with --lora):
    NAME_process.png   the denoising process: one row per label asked for (its first sample),
                       noise -> digit across columns
    NAME.png           a grid of the final samples, one column per label
    NAME.npz           images (uint8, N x 28 x 28 at the data set's resolution) and labels (N)
                       (NAME.png keeps the settings as PNG text: --from-png reads them back)
    lora_weight_sweep.png  with --lora: a row per LoRA weight 0 -> 1, a column per label, labelled
"""
from __future__ import annotations

import io
import os
import sys

import torch

from adapter import set_weights
from adapter_formats import LEGACY_DEFAULT_ADAPTER, load_adapters
from files import check_replace, check_writable_dir, remove_stale_temps
from config import DEFAULT_ADAPTER, DEFAULT_CKPT, DEFAULT_OUT_DIR, RuntimeConfig, SampleConfig, from_saved
from cli import (ArgumentParser, add_config_args, add_lora_args, add_runtime_args, bounded, config_flags,
                 config_from_args, name_arg, path_arg, resolve_lora_names, runtime_from_args)
from errors import CLIError, exit_with, run_main
from dataset import to_model_range
from diffusion import generate
from inputs import check_inputs_apart, read_regular
from lora import merge_lora
from pipeline import load_pipeline
from pictures import (SETTINGS_KEY, column_order, process_figure, process_rows, read_png_settings, save_grid,
                      settings_text, weight_sweep_png, write_samples_npz)
from runtime import pick_device, resolve_precision
from styles import read_digit

INIT_MAX_BYTES = 64 << 20  # a phone's photo of a digit is a few MB; --init larger than this is the wrong file
DEFAULT_STRENGTH = 0.75  # --init without --strength: AUTOMATIC1111's default denoising strength

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
    sampling.add_argument("--init", default=None, type=path_arg, metavar="IMAGE",
                          help="img2img (SDEdit, Meng et al. 2021): start from this digit image, made MNIST-like as "
                          "--data's images are, noised to t = strength x T, then denoised towards each label")
    sampling.add_argument("--strength", default=None, type=bounded(float, ge=0.0, le=1.0),
                          help=f"with --init: how much of the way back to noise; 0 returns the image as "
                          f"preprocessed, 1 is plain sampling from the same noise (default {DEFAULT_STRENGTH})")
    sampling.add_argument("--from-png", default=None, type=path_arg, metavar="PNG",
                          help="draw again with the settings a grid PNG of denoise.py holds (--ckpt, --lora, "
                          "--labels, --seed, the sampler...); flags given beside it win over the PNG's")
    add_config_args(p, SampleConfig)
    add_runtime_args(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_dests(parser, sys.argv[1:] if argv is None else argv)  # what --from-png leaves alone
    return args


def png_argv(settings):
    """The command-line flags that give back ``settings`` (pictures.read_png_settings' dict): every value goes
    through the flag it came from, so a changed value meets the same checks as one typed."""
    try:
        sample = config_flags(from_saved(SampleConfig, settings["sample"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"its sampler settings are wrong ({e})") from None
    argv = [f"--ckpt={settings['ckpt']}", f"--weights={settings['weights']}", f"--labels={settings['labels']}",
            f"--n-per-label={settings['n_per_label']}", f"--seed={settings['seed']}",
            f"--precision={settings['precision']}", f"--lora-weight={settings['lora_weight']!r}", *sample]
    argv += [f"--lora={text}" for text in settings["lora"]]
    argv += [flag for flag in ("--merge", "--force") if settings[flag[2:]]]
    if settings["init"] is not None:
        argv += [f"--init={settings['init']}", f"--strength={settings['strength']!r}"]
    return argv


def given_dests(parser, argv):
    """The dests of the flags typed in ``argv`` (aliases and --flag=value included)."""
    actions = parser._option_string_actions
    return {actions[tok.split("=", 1)[0]].dest for tok in argv
            if tok.startswith("--") and tok.split("=", 1)[0] in actions}


def apply_png_settings(args):
    """--from-png: every setting the PNG holds that no flag typed gives (``args.given``), parsed as if typed; a
    path it names that is gone is named."""
    png = args.from_png
    settings = read_png_settings(png, "--from-png")
    fix = "write the picture again with denoise.py, or give the flags yourself"
    try:
        flags = png_argv(settings)
    except ValueError as e:
        exit_with(CLIError(f"--from-png {png!r}: {e}; {fix}"))
    png_parser = build_parser()
    png_parser.error = lambda message: exit_with(CLIError(f"--from-png {png!r} holds a bad setting: {message}; {fix}"))
    from_png = png_parser.parse_args(flags)
    try:  # the ranges of settings are checked when their config is built: here, so that the PNG is named
        config_from_args(from_png, SampleConfig)
        config_from_args(from_png, RuntimeConfig)
    except CLIError as e:
        raise CLIError(f"--from-png {png!r} holds a bad setting: {e}; {fix}") from None
    given = args.given
    for dest in given_dests(png_parser, flags) - given:
        setattr(args, dest, getattr(from_png, dest))
    named = [(f"--{dest}", getattr(args, dest)) for dest in ("ckpt", "init") if dest not in given]
    named += [("--lora", s.path) for s in (args.lora or []) if "lora" not in given]
    for flag, path in [(f, p) for f, p in named if p and not os.path.exists(p)]:
        raise CLIError(f"--from-png {png!r} names {flag} {path!r}, which no longer exists; restore it, or pass "
                       f"{flag} with the file to use instead")


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
    inputs += [("--init", args.init), ("--from-png", args.from_png)]
    paths = [("--out-dir", os.path.join(args.out_dir, f)) for f, _ in outputs]
    check_inputs_apart(paths, inputs, "pass another --out-dir or --name")
    for (_, path), (_, kind) in zip(paths, outputs):
        check_replace(path, "--out-dir", (kind,), None, f"a {'picture' if kind == 'png' else 'samples .npz'}")


def read_init(path):
    """--init as the model sees it: the file read bounded (inputs.read_regular), then made MNIST-like exactly as
    --data's images are (styles.read_digit); uint8 (28, 28)."""
    if not os.path.lexists(path):
        raise CLIError(f"--init {path!r}: no such file; pass the image of a digit to start from")
    data = read_regular(path, "--init", INIT_MAX_BYTES)
    image, _ = read_digit(io.BytesIO(data), f"--init {path!r}")
    return torch.from_numpy(image)


def sweep_weights(model, diffusion, adapter, labels, common, title, path):
    """lora_weight_sweep.png: the unmerged adapters at weight 0 -> 1 (a runtime knob), a row per weight, a column per
    label, on the same noise (and from the same --init)."""
    weights = [0.0, 0.25, 0.5, 0.75, 1.0]
    sweep_labels = torch.tensor(sorted(set(labels)))
    cols = []
    for w in weights:
        set_weights(model, adapter, w)
        cols.append(generate(model, diffusion, sweep_labels, **common)[0])
    # a picture for people (labelled, 3x nearest-neighbour): a row per weight, a column per label
    weight_sweep_png(dict(zip(weights, cols)), sweep_labels.tolist(), path, title)
    return path


def png_settings(args, scfg, rcfg, labels, precision, steps_run):
    """The text save_grid keeps in the PNG: the settings that drew it, as A1111's "parameters" line and one key each
    for people, and as JSON (pictures.SETTINGS_KEY) for --from-png; the same command gives the same picture."""
    shown = {"ckpt": args.ckpt, "lora": " ".join(map(str, args.lora or [])) or "none",
             "lora_weight": args.lora_weight, "merged": bool(args.merge), "labels": ",".join(map(str, labels)),
             "n_per_label": args.n_per_label, "seed": rcfg.seed, "sampler": scfg.sampler, "steps": steps_run,
             "guidance": scfg.guidance, "eta": scfg.eta, "precision": precision}
    if args.init is not None:
        shown.update(init=args.init, strength=args.strength)
    # a <lora:NAME:W> as the folder it was found in: the PNG draws again without --lora-dir
    lora = [f"{s.path}:{s.weight!r}" if s.name else str(s) for s in args.lora or []]
    exact = {"ckpt": args.ckpt, "weights": args.weights, "lora": lora,
             "lora_weight": args.lora_weight, "merge": bool(args.merge), "force": bool(args.force),
             "labels": ",".join(map(str, labels)), "n_per_label": args.n_per_label, "seed": rcfg.seed,
             "precision": precision, "sample": dict(vars(scfg)), "init": args.init,
             "strength": args.strength if args.init is not None else None}
    exact["sample"]["guidance_interval"] = list(scfg.guidance_interval)
    return {"parameters": ", ".join(f"{k}: {v}" for k, v in shown.items()), **shown,
            SETTINGS_KEY: settings_text(exact)}


def check_flags(args):
    """What the flags say together, before any file is read."""
    if args.merge and not args.lora:
        raise CLIError("--merge needs --lora (there is no adapter to merge)")
    if args.strength is not None and args.init is None:
        raise CLIError("--strength needs --init (the image to start from); pass --init IMAGE or drop --strength")
    if args.init is not None and args.strength is None:
        args.strength = DEFAULT_STRENGTH


def run(args):
    if args.from_png is not None:
        apply_png_settings(args)
    args.lora = resolve_lora_names(args.lora, args.lora_dir)
    scfg = config_from_args(args, SampleConfig)
    rcfg = runtime_from_args(args)
    check_flags(args)
    check_outputs(args)
    init = read_init(args.init) if args.init is not None else None
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
    if init is not None:
        common.update(init=to_model_range(init[None], model.cfg.img_size), strength=args.strength)
    written = []

    shown = ", ".join(map(str, args.lora or []))  # the adapters as given, PATH[:WEIGHT]
    if adapter is not None:
        written.append(sweep_weights(model, diffusion, adapter, labels, common,
                                     f"{shown}: weight 0 to 1 on the same noise ({scfg.sampler}-{scfg.steps}, "
                                     f"guidance {scfg.guidance:g}, seed {rcfg.seed})",
                                     os.path.join(out, "lora_weight_sweep.png")))
        set_weights(model, adapter, args.lora_weight)
        if args.merge:
            merge_lora(model)

    label_t = torch.tensor(labels).repeat_interleave(args.n_per_label)
    from tqdm import tqdm

    images, frames = generate(model, diffusion, label_t, num_frames=args.frames, **common,
                              progress=lambda ts: tqdm(ts, desc=f"{scfg.sampler} x{len(label_t)}", leave=False))
    grid_path = os.path.join(out, f"{name}.png")
    steps = scfg.steps if scfg.sampler != "ddpm" else diffusion.timesteps
    text = png_settings(args, scfg, rcfg, labels, precision, steps)
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
    if init is not None:
        lora_note += f", from {args.init} at strength {args.strength:g}"
    print(f"denoise: {len(label_t)} samples, {scfg.sampler} {steps} steps, guidance {scfg.guidance}{lora_note}; "
          f"wrote {', '.join(written)}")
    return written


if __name__ == "__main__":
    main()
