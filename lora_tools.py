"""Adapter tools: look inside, convert, merge, resize, extract, and the two-adapter grid.

    python lora_tools.py info out/lora                                 # format, rank, alpha, base, size, norms
    python lora_tools.py convert out/lora.pt --out out/lora            # an old .pt -> PEFT folder
    python lora_tools.py convert out/lora --out out/lora_kohya.safetensors   # PEFT folder -> kohya file (and back)
    python lora_tools.py merge out/italic:0.8 out/bold:0.5 --out out/both --mode cat           # exact, rank = sum
    python lora_tools.py merge out/italic out/bold --out out/both4 --mode svd --r 4            # re-factored
    python lora_tools.py resize out/lora --r 2 --out out/lora_r2       # lower rank, same strength
    python lora_tools.py extract --tuned out/full.pt --base out/ckpt.pt --r 4 --out out/extracted
    python lora_tools.py grid out/italic out/bold --weights 0,0.5,1 --label 7   # -> out/lora_grid.png
    python lora_tools.py render-style "font:DejaVu Serif" --per-label 20 --out my_digits   # PNGs in my_digits/0..9/

An output path ending in .safetensors is written in kohya's layout, anything else as a PEFT
folder. Kohya files name modules with dots turned into underscores; --ckpt (default out/ckpt.pt)
gives the model whose module names map them back. Every bad input is one line and exit code 2,
before anything is written.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

import torch

from adapter import Adapter, check_same_base, resolve_kohya_names
from adapter_formats import adapter_size, check_adapter_folder, load_adapter, load_adapters, write_adapter, write_kohya
from checkpoint import load_model, model_config_from_checkpoint, state_fingerprint
from pipeline import load_pipeline
from config import DEFAULT_ADAPTER, DEFAULT_CKPT, DEFAULT_OUT_DIR, R_MAX, SEED_MAX, SampleConfig
from cli import (ArgumentParser, add_config_args, add_runtime_args, bounded, check_weight, config_from_args, lora_spec,
                 path_arg, resolve_lora_names, runtime_from_args)
from errors import CLIError, run_main
from files import check_apart, check_replace, check_writable_dir, check_writable_file
from lora import LoraError, resolve_targets, set_lora_weight, short_targets
from model_card import CardFacts, write_card
from runtime import pick_device, resolve_precision
from font_styles import FONT_PER_LABEL, FONT_PER_LABEL_MAX
from unet import UNet

# ------------------------------------------------------------------ helpers

def write_any(path, adapter, args=None, note=None):
    """A .safetensors path gets kohya's layout, anything else a PEFT folder, with a model card (README.md) saying
    ``note`` (how it came to be) and the command (``args.command``) when given."""
    if str(path).endswith(".safetensors"):
        return write_kohya(path, adapter)
    written = write_adapter(path, adapter)
    if args is not None:
        write_card(written, adapter, CardFacts(command=getattr(args, "command", None), notes=(note,) if note else ()))
    return written


def check_outputs(out, inputs, overwrite, flag="--out"):
    """Before anything is read: ``out`` is none of ``inputs`` (resolved: symlinks and a/../a count, and an adapter
    folder and its files are one), holds nothing of another kind, and replaces an earlier result only with
    --overwrite. A .png is a picture, a .safetensors a kohya file, anything else a PEFT folder."""
    check_apart([(flag, out)], inputs, f"pass another {flag}")
    if str(out).endswith(".png"):
        check_writable_file(out, flag)
        check_replace(out, flag, ("png",), overwrite, "a picture")
    elif str(out).endswith(".safetensors"):
        check_writable_file(out, flag)
        check_replace(out, flag, _is_adapter, overwrite, "an adapter")
    else:
        check_adapter_folder(out)
        check_writable_dir(out, flag)
        check_replace(out, flag, ("adapter folder",), overwrite, "an adapter")


def _is_adapter(path):
    try:
        load_adapter(path)
    except LoraError:
        return False
    return True


def model_names(ckpt_path):
    """A fresh UNet built from a checkpoint's config: its module names map kohya's names back."""
    from checkpoint import load_checkpoint

    return UNet(model_config_from_checkpoint(load_checkpoint(ckpt_path)))


def resolved(adapter, ckpt_path):
    """The adapter with our module names (kohya files need a model to map theirs back)."""
    if adapter.format != "kohya":
        return adapter
    return resolve_kohya_names(adapter, model_names(ckpt_path))


def truncate(delta, r, name):
    """Best rank-r factors of an update by SVD, in PEFT's shapes: for a Linear's (out, in) update A (r, in) and
    B (out, r); for a conv's (out, in, kh, kw) A (r, in, kh, kw) and B (out, r, 1, 1), the SVD taken of the
    (out, in * kh * kw) matrix, as a conv LoRA's B[:, :, 0, 0] @ A.flatten(1) is. B A is the truncated update;
    returns A, B and the update's kept and total squared norms."""
    matrix = delta.flatten(1)
    out_f, in_f = matrix.shape
    if r > min(out_f, in_f):
        raise LoraError(f"--r {r} is larger than layer {name} allows (its weight is {out_f} x {in_f}, "
                        f"so at most rank {min(out_f, in_f)})")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    root = s[:r].sqrt()
    b = u[:, :r] * root  # (out, r): U sqrt(S)
    a = root[:, None] * vh[:r]  # (r, in k k): sqrt(S) V^T
    if delta.dim() == 4:
        a, b = a.view(r, *delta.shape[1:]), b.view(out_f, r, 1, 1)
    return a.float().contiguous(), b.float().contiguous(), float(s[:r].pow(2).sum()), float(s.pow(2).sum())


def low_rank(deltas, r, what):
    """Every update of ``deltas`` ({module: update}) cut to rank r by SVD: ({M.lora_A: A, M.lora_B: B}, the share
    of the updates' Frobenius norm kept, their total squared norm). Prints the share, overall and for the worst
    layer, under ``what``."""
    tensors, kept, total = {}, {}, {}
    for m, d in deltas.items():
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"], kept[m], total[m] = truncate(d, r, m)
    overall = math.sqrt(sum(kept.values()) / max(sum(total.values()), 1e-30))
    worst = min(kept, key=lambda m: kept[m] / max(total[m], 1e-30))
    share = math.sqrt(kept[worst] / max(total[worst], 1e-30))
    print(f"{what}: kept {100 * overall:.2f}% of the update's Frobenius norm "
          f"(lowest layer {worst}: {100 * share:.2f}%)")
    return tensors, overall, sum(total.values())


def cmd_info(args):
    ad = load_adapter(args.path)
    if ad.format == "kohya" and os.path.exists(args.ckpt):
        ad = resolve_kohya_names(ad, model_names(args.ckpt))
    deltas = ad.delta_weights()
    print(f"{args.path}: format {ad.format}, rank {ad.r}, alpha {ad.alpha:g} (scale alpha/r "
          f"{ad.alpha / ad.r:g}), targets {short_targets(ad.targets or ad.modules)}, {len(ad.modules)} modules, "
          f"{sum(v.numel() for v in ad.tensors.values()):,} parameters")
    base = f" ({ad.base_path})" if ad.base_path else ""
    print(f"base fingerprint {ad.base_fingerprint or 'not recorded'}{base}, style {ad.style or 'not recorded'}, "
          f"size {adapter_size(args.path):,} bytes")
    if ad.kind == "lcm":
        print(f"kind lcm: a speed adapter (sample with --sampler lcm --steps 1..8; --guidance is its input w); saved "
              f"modules {', '.join(f'{k} {tuple(v.shape)}' for k, v in ad.saved_modules.items())}")
    for note in ad.notes:
        print(f"note: {note}")
    width = max(len(m) for m in deltas)
    print(f"{'module':<{width}}  {'weight shape':<16}  |update|_F at weight 1")
    for m, d in deltas.items():
        print(f"{m:<{width}}  {' x '.join(map(str, d.shape)):<16}  {d.norm().item():.4g}")
    return ad


def cmd_convert(args):
    if args.out and args.dst:
        raise CLIError(f"convert: two destinations, {args.dst!r} and --out {args.out!r}; give --out alone")
    dst = args.out or args.dst  # DST as a second word: the spelling before --out
    if not dst:
        raise CLIError("convert needs the destination: --out FOLDER (PEFT's layout) or --out FILE.safetensors "
                       "(kohya's)")
    check_outputs(dst, [("SRC", args.src), ("--ckpt", args.ckpt)], args.overwrite)
    ad = resolved(load_adapter(args.src), args.ckpt)
    written = write_any(dst, ad, args, f"Converted from `{args.src}` ({ad.format} layout).")
    back = load_adapter(written)
    back = resolved(back, args.ckpt)
    diff = max((back.tensors[k] - v).abs().max().item() for k, v in ad.tensors.items())
    print(f"convert: {args.src} ({ad.format}, {adapter_size(args.src):,} bytes) -> {written} "
          f"({back.format}, {adapter_size(written):,} bytes); max |difference| of the tensors {diff:.3g}")
    return written


def cmd_merge(args):
    if args.mode == "svd":
        if args.r is None:
            raise CLIError("--mode svd needs --r R (the rank)")
    check_outputs(args.out, [("PATH", a.path) for a in args.adapters]
                 + [("--ckpt", args.ckpt)], args.overwrite)
    adapters = load_adapters(args.adapters)
    if len(adapters) < 2:
        raise CLIError("merge needs at least two adapters")
    if not args.force:
        check_same_base(adapters)
    adapters = [resolved(a, args.ckpt) for a in adapters]
    modules = sorted({m for a in adapters for m in a.modules})
    tensors = {}
    if args.mode == "cat":
        # [A_1 .. A_n] and [w_1 s_1 B_1 .. w_n s_n B_n] stacked along the rank: the product is the
        # weighted sum of the updates exactly; alpha = rank makes the file's own scale 1
        for m in modules:
            a_parts, b_parts = [], []
            ref_a, ref_b = next(x for x in adapters if m in x.modules).pair(m)
            for ad in adapters:
                if m in ad.modules:
                    a, b = ad.pair(m)
                    a_parts.append(a)
                    b_parts.append(b * (ad.weight * ad.alpha / ad.r))
                else:  # a module only some adapters touch: zeros keep the rank the same everywhere
                    a_parts.append(ref_a.new_zeros(ad.r, *ref_a.shape[1:]))
                    b_parts.append(ref_b.new_zeros(ref_b.shape[0], ad.r, *ref_b.shape[2:]))
            tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        r = sum(a.r for a in adapters)
    else:
        sums = {}
        for ad in adapters:
            for m, d in ad.delta_weights().items():
                sums[m] = sums.get(m, 0) + ad.weight * d
        tensors = low_rank({m: sums[m] for m in modules}, args.r, f"merge --mode svd --r {args.r}")[0]
        r = args.r
    styles = "+".join(str(a.style) for a in adapters)
    first = adapters[0]
    style = first.style if len({a.style for a in adapters}) == 1 else None  # a mix is no one style of the list
    # a speed adapter's guidance input is linear in its weight: the weighted sum is exact, as the cat mode's
    saved = {}
    for ad in adapters:
        for k, v in ad.saved_modules.items():
            saved[k] = saved.get(k, 0) + ad.weight * v
    merged = Adapter(tensors, r, float(r), targets=modules, style=style, base_fingerprint=first.base_fingerprint,
                     base_path=first.base_path, base_name=first.base_name, saved_modules=saved,
                     kind="lcm" if saved else None)
    sources = ", ".join(f"`{a}`" for a in args.adapters)
    written = write_any(args.out, merged, args, f"Merged ({args.mode}) from {sources}.")
    shown = ", ".join(map(str, args.adapters))
    print(f"merge: {len(adapters)} adapters ({shown}; styles {styles}) -> {written}, rank {r}, "
          f"{adapter_size(written):,} bytes")
    return written


def cmd_resize(args):
    check_outputs(args.out, [("SRC", args.src), ("--ckpt", args.ckpt)], args.overwrite)
    ad = resolved(load_adapter(args.src), args.ckpt)
    if args.r > ad.r:
        raise LoraError(f"--r {args.r} is larger than the adapter's rank {ad.r}; resize only lowers it")
    scale = ad.alpha / ad.r
    tensors = low_rank({m: d / scale for m, d in ad.delta_weights().items()}, args.r,
                       f"resize {ad.r} -> {args.r}")[0]
    # alpha / r stays what it was, so the update keeps its strength: alpha' = alpha * k / r (as kohya)
    out = ad.replace(tensors=tensors, r=args.r, alpha=scale * args.r, path=None, format="peft", notes=[])
    written = write_any(args.out, out, args, f"Resized from `{args.src}`, rank {ad.r} to {args.r}, at the same "
                        "strength (alpha / r kept).")
    print(f"resize: {args.src} rank {ad.r} alpha {ad.alpha:g} -> {written} rank {args.r} alpha "
          f"{out.alpha:g}, {adapter_size(args.src):,} -> {adapter_size(written):,} bytes")
    return written


def cmd_extract(args):
    check_outputs(args.out, [("--tuned", args.tuned), ("--base", args.base)], args.overwrite)
    base, base_ckpt = load_model(args.base, "cpu", args.source)
    tuned, tuned_ckpt = load_model(args.tuned, "cpu", args.source)
    if base_ckpt["config"]["model"] != tuned_ckpt["config"]["model"]:
        raise LoraError(f"{args.tuned!r} and {args.base!r} are different models (their configs differ); extract "
                        "needs a fine-tune and the base it started from")
    fingerprint = state_fingerprint(base_ckpt[args.source])
    started_from = tuned_ckpt.get("fine_tune", {}).get("base_fingerprint")
    if started_from and started_from != fingerprint and not args.force:
        raise LoraError(f"{args.tuned!r} was fine-tuned from base {started_from}, not {args.base!r} ({fingerprint}); "
                        "pass the base it started from, or --force")
    names = resolve_targets(base, args.targets)  # Linear and Conv2d layers: a conv's update is factored as one
    b_state, t_state = base.state_dict(), tuned.state_dict()
    tensors, overall, targeted_sq = low_rank(
        {n: t_state[f"{n}.weight"].float() - b_state[f"{n}.weight"].float() for n in names}, args.r,
        f"extract rank {args.r} from {len(names)} layers")
    targeted = {f"{n}.weight" for n in names}
    rest = sum((t_state[k].float() - b_state[k].float()).pow(2).sum().item() for k in b_state
               if k not in targeted and b_state[k].is_floating_point())
    style = tuned_ckpt.get("fine_tune", {}).get("style")
    out = Adapter(tensors, args.r, float(args.r), targets=names, style=style, base_fingerprint=fingerprint,
                  base_path=args.base, base_name=os.path.basename(args.base))
    all_change = math.sqrt(targeted_sq + rest)
    print(f"extract: the targeted weights hold {100 * math.sqrt(targeted_sq) / max(all_change, 1e-30):.1f}% "
          "of the fine-tune's whole change (Frobenius norm over every tensor); the rest is not in the adapter")
    written = write_any(args.out, out, args, f"Extracted at rank {args.r} from the full fine-tune `{args.tuned}`.")
    print(f"extract: {args.tuned} - {args.base} -> {written}, rank {args.r}, {adapter_size(written):,} bytes")
    return written, overall


def cmd_grid(args):
    scfg = config_from_args(args, SampleConfig)
    rcfg = runtime_from_args(args)
    weights = []
    for w in args.weights.split(","):
        try:
            value = float(w)
        except ValueError:
            raise CLIError(f"--weights {args.weights}: {w!r} is not a number; write the weights as 0,0.5,1") from None
        weights.append(check_weight(value, f"--weights {args.weights}"))
    if len(args.adapters) != 2:
        raise CLIError("grid takes exactly two adapters: the rows' and the columns'")
    check_outputs(args.out, [("PATH", a.path) for a in args.adapters]
                 + [("--ckpt", args.ckpt)], args.overwrite)
    device = pick_device(rcfg.device)
    precision = resolve_precision(rcfg.precision, device)  # sampling: the rule, never timed
    adapters = load_adapters(args.adapters, device)
    if not args.force:
        check_same_base(adapters)
    pipe = load_pipeline(args.ckpt, device, "ema", adapters, force=args.force)
    model, names = pipe.model, [a.name for a in adapters]
    if not 0 <= args.label < model.num_classes:
        raise CLIError(f"--label must be in 0..{model.num_classes - 1}, got {args.label}")
    from diffusion import generate

    cells = []
    for w_row in weights:
        for w_col in weights:
            set_lora_weight(model, w_row, names[0])
            set_lora_weight(model, w_col, names[1])
            imgs, _ = generate(model, pipe.diffusion, torch.tensor([args.label]), device, precision, scfg,
                               seed=args.seed, data_size=pipe.data_size)
            cells.append(imgs[0])
    grid_figure(cells, weights, names, args.out, args.label)
    print(f"grid: {names[0]} (rows) x {names[1]} (columns) at weights {weights}, digit {args.label} -> {args.out}")
    return args.out


def grid_figure(cells, weights, names, path, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from files import atomic_write

    n = len(weights)
    fig, axes = plt.subplots(n, n, figsize=(n * 1.0 + 0.8, n * 1.0 + 0.8), squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(cells[i * n + j].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{weights[i]:g}", rotation=0, labelpad=12)
            if i == 0:
                ax.set_title(f"{weights[j]:g}", fontsize=9)
    fig.supylabel(f"{names[0]} weight")
    fig.suptitle(f"digit {label}: {names[1]} weight", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def cmd_render_style(args):
    from font_styles import write_font_folder  # Pillow and matplotlib's fonts: only this command needs them

    if not args.style.startswith("font:"):
        raise CLIError(f"render-style renders a font: pass font:NAME, got {args.style!r}")
    check_writable_dir(args.out, "--out")  # a file where a folder of the path should be: named, before rendering
    name, count = write_font_folder(args.style, args.out, per_label=args.per_label, seed=args.seed)
    print(f"render-style: {count} images of {name} ({args.per_label} a label, seed {args.seed}) -> "
          f"{args.out}/0..9/*.png; train on them with: python lora_finetune.py --data {args.out}")
    return args.out


# ------------------------------------------------------------------ command line

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do; COMMAND --help "
                           "tells more")
    for name, fn, help_text, add_args in COMMANDS:
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.set_defaults(fn=fn)
        add_args(s)
    for name in ("convert", "merge", "resize", "extract", "grid"):
        sub.choices[name].group("output").add_argument("--overwrite", action="store_true",
                                                       help="replace what an earlier run wrote at the destination")
    return p


RANK = bounded(int, gt=0, le=R_MAX)  # the rank, as lora_finetune.py --r (LoraConfig.r)


def info_args(s):
    s.add_argument("path", nargs="?", default=DEFAULT_ADAPTER, type=path_arg,
                   help="the adapter: a PEFT folder, a kohya .safetensors or an old .pt")
    s.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg,
                   help="base checkpoint: maps kohya names, and gives |W| per layer")


def convert_args(s):
    s.add_argument("src", type=path_arg, help="the adapter to convert")
    s.add_argument("--out", type=path_arg, help="a folder (PEFT's layout) or a .safetensors file (kohya's)")
    s.add_argument("dst", nargs="?", type=path_arg, help=argparse.SUPPRESS)  # the old spelling: convert SRC DST
    s.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg,
                   help="base checkpoint whose module names map kohya's back")


def merge_args(s):
    s.add_argument("adapters", nargs="+", type=lora_spec, metavar="PATH[:WEIGHT]",
                   help="the adapters, each at WEIGHT (default 1)")
    s.add_argument("--out", required=True, type=path_arg, help="where the merged adapter goes")
    s.add_argument("--mode", choices=["cat", "svd"], default="cat",
                   help="cat: exact, r = the sum of the ranks; svd: re-factored to rank --r")
    s.add_argument("--r", "--rank", dest="r", type=RANK, default=None,
                   help="the rank r of --mode svd (no default: --mode svd needs it)")
    s.add_argument("--force", action="store_true", help="merge adapters trained on different bases")
    s.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg,
                   help="base checkpoint whose module names map kohya's back")


def resize_args(s):
    s.add_argument("src", type=path_arg, help="the adapter to resize")
    s.add_argument("--r", "--rank", dest="r", type=RANK, required=True,
                   help="the new rank r, below the adapter's (no default: required)")
    s.add_argument("--out", required=True, type=path_arg, help="where the resized adapter goes")
    s.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg,
                   help="base checkpoint whose module names map kohya's back")


def extract_args(s):
    s.add_argument("--tuned", required=True, type=path_arg,
                   help="the fully fine-tuned checkpoint (lora_finetune.py --full)")
    s.add_argument("--base", default=DEFAULT_CKPT, type=path_arg, help="the base it was fine-tuned from")
    s.add_argument("--r", "--rank", dest="r", type=RANK, default=4, help="the rank r of the adapter extracted")
    s.add_argument("--targets", default="attn", help="the layers to extract: a group (attn = Wq,Wk,Wv; attn-all; "
                   "all: every Linear and Conv2d of the blocks) or layer names")
    s.add_argument("--from", dest="source", default="ema", choices=["ema", "model"],
                   help="which weights of both checkpoints to compare")
    s.add_argument("--out", required=True, type=path_arg, help="where the extracted adapter goes")
    s.add_argument("--force", action="store_true", help="extract against a base the fine-tune did not start from")


def grid_args(s):
    s.add_argument("adapters", nargs="+", type=lora_spec, metavar="PATH",
                   help="two adapters: the rows' and the columns'")
    s.group("model").add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg,
                                  help="the base both adapters apply to")
    s.group("LoRA").add_argument("--weights", default="0,0.5,1",
                                 help="the adapters' weights (strengths), for rows and columns alike")
    s.group("sampling").add_argument("--label", type=bounded(int, ge=0, le=9999), default=7,
                                     help="the digit drawn in every cell (checked against the model's labels)")
    s.group("output").add_argument("--out", default=os.path.join(DEFAULT_OUT_DIR, "lora_grid.png"), type=path_arg,
                                   help="the PNG written")
    s.group("LoRA").add_argument("--force", action="store_true", help="adapters trained on another base")
    add_config_args(s, SampleConfig)
    add_runtime_args(s)


def render_style_args(s):
    s.add_argument("style", metavar="font:NAME", help="a font matplotlib ships; an unknown NAME lists them")
    s.add_argument("--per-label", type=bounded(int, gt=0, le=FONT_PER_LABEL_MAX), default=FONT_PER_LABEL,
                   help="images of each digit")
    s.add_argument("--seed", type=bounded(int, ge=0, le=SEED_MAX), default=0, help="the same seed, the same images")
    s.add_argument("--out", required=True, type=path_arg, help="a new (or empty) folder")


# (name, what it does, help, its arguments), in the order --help lists them
COMMANDS = (
    ("info", cmd_info, "what an adapter file holds", info_args),
    ("convert", cmd_convert, "an old .pt or a kohya file to a PEFT folder, or a PEFT folder to kohya", convert_args),
    ("merge", cmd_merge, "several adapters, each at a weight, into one", merge_args),
    ("resize", cmd_resize, "one adapter to a lower rank by SVD, at the same strength", resize_args),
    ("extract", cmd_extract, "a rank-r adapter from a full fine-tune and its base (truncated SVD)", extract_args),
    ("grid", cmd_grid, "two adapters' weights as a grid of one digit", grid_args),
    ("render-style", cmd_render_style, "a font's digits as PNG files in 0..9 subfolders, the folder "
     "lora_finetune.py --data reads (size, position and stroke jittered, seeded)", render_style_args),
)


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # the command as typed, for the model card of an adapter written (an in-process call's argv, or the shell's)
    args.command = shlex.join(["python", "lora_tools.py", *(sys.argv[1:] if argv is None else argv)])

    def run(a):
        if getattr(a, "adapters", None):  # merge, grid: <lora:NAME:W> looked up under out/
            a.adapters = resolve_lora_names(a.adapters)
        return a.fn(a)
    return run_main(run, args)


if __name__ == "__main__":
    main()
