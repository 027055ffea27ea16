"""Adapter tools: look inside, convert, merge, resize, extract, and the two-adapter grid.

    python lora_tools.py info out/lora                                 # format, rank, alpha, base, size, norms
    python lora_tools.py convert out/lora.pt out/lora                  # an old .pt -> PEFT folder
    python lora_tools.py convert out/lora out/lora_kohya.safetensors   # PEFT folder -> kohya file (and back)
    python lora_tools.py merge out/italic:0.8 out/bold:0.5 --out out/both --mode cat           # exact, rank = sum
    python lora_tools.py merge out/italic out/bold --out out/both4 --mode svd --rank 4         # re-factored
    python lora_tools.py resize out/lora --rank 2 --out out/lora_r2    # lower rank, same strength
    python lora_tools.py extract --tuned out/full.pt --base out/ckpt.pt --rank 4 --out out/extracted
    python lora_tools.py grid out/italic out/bold --weights 0,0.5,1 --label 7   # -> out/lora_grid.png

An output path ending in .safetensors is written in kohya's layout, anything else as a PEFT
folder. Kohya files name modules with dots turned into underscores; --ckpt (default out/ckpt.pt)
gives the model whose module names map them back. Every bad input is one line and exit code 2,
before anything is written.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from adapter import (DEFAULT_ADAPTER, adapter_size, check_same_base, delta_weights, load_adapter, load_adapters,
                     make_adapter, parse_lora_spec, resolve_kohya_names, write_adapter, write_kohya)
from checkpoint import load_for_sampling, load_model, model_config_from_checkpoint, state_fingerprint
from config import SampleConfig
from cli import HelpFormatter, add_config_args, config_from_args
from errors import CLIError, run_main
from lora import LoraError, LoraLayer
from runtime import add_runtime_args, pick_device, resolve_precision
from unet import UNet

DEFAULT_CKPT = os.path.join("out", "ckpt.pt")


# ------------------------------------------------------------------ helpers

def write_any(path, adapter):
    """A .safetensors path gets kohya's layout, anything else a PEFT folder."""
    if str(path).endswith(".safetensors"):
        return write_kohya(path, adapter)
    return write_adapter(path, adapter)


def model_names(ckpt_path):
    """A fresh UNet built from a checkpoint's config: its module names map kohya's names back."""
    from checkpoint import load_checkpoint

    return UNet(model_config_from_checkpoint(load_checkpoint(ckpt_path)))


def resolved(adapter, ckpt_path):
    """The adapter with our module names (kohya files need a model to map theirs back)."""
    if adapter["format"] != "kohya":
        return adapter
    return resolve_kohya_names(adapter, model_names(ckpt_path))


def truncate(delta, rank, name):
    """Best rank-k factors of an (out, in) update by SVD: lora_a (in, k), lora_b (k, out), with
    (lora_a lora_b)^T = the truncated update; returns them and the update's kept and total squared norms."""
    out_f, in_f = delta.shape
    if rank > min(out_f, in_f):
        raise LoraError(f"--rank {rank} is larger than layer {name} allows (its weight is {out_f} x {in_f}, "
                        f"so at most rank {min(out_f, in_f)})")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    lora_b = (u[:, :rank] * root).T  # (k, out): U sqrt(S), transposed into our layout
    lora_a = (root[:, None] * vh[:rank]).T  # (in, k): sqrt(S) V^T, transposed
    return lora_a.float().contiguous(), lora_b.float().contiguous(), float(s[:rank].pow(2).sum()), float(
        s.pow(2).sum())


def report_kept(kept, total, what):
    """The share of the update's Frobenius norm kept, overall and for the worst layer."""
    overall = math.sqrt(sum(kept.values()) / max(sum(total.values()), 1e-30))
    worst = min(kept, key=lambda m: kept[m] / max(total[m], 1e-30))
    share = math.sqrt(kept[worst] / max(total[worst], 1e-30))
    print(f"{what}: kept {100 * overall:.2f}% of the update's Frobenius norm "
          f"(lowest layer {worst}: {100 * share:.2f}%)")
    return overall


def check_rank(rank):
    if rank <= 0:
        raise CLIError(f"--rank must be > 0, got {rank}")


# ------------------------------------------------------------------ subcommands

def cmd_info(args):
    ad = load_adapter(args.path)
    if ad["format"] == "kohya" and os.path.exists(args.ckpt):
        ad = resolve_kohya_names(ad, model_names(args.ckpt))
    deltas = delta_weights(ad)
    print(f"{args.path}: format {ad['format']}, rank {ad['r']}, alpha {ad['alpha']:g} (scale alpha/r "
          f"{ad['alpha'] / ad['r']:g}), targets {ad['targets']}, {len(ad['modules'])} modules, "
          f"{sum(v.numel() for v in ad['lora'].values()):,} parameters")
    print(f"base fingerprint {ad['base_fingerprint'] or 'not recorded'}, style {ad['style'] or 'not recorded'}, "
          f"size {adapter_size(args.path):,} bytes")
    for note in ad["notes"]:
        print(f"note: {note}")
    width = max(len(m) for m in deltas)
    print(f"{'module':<{width}}  out x in    |update|_F at weight 1")
    for m, d in deltas.items():
        print(f"{m:<{width}}  {d.shape[0]:>3} x {d.shape[1]:<4}  {d.norm().item():.4g}")
    return ad


def cmd_convert(args):
    ad = resolved(load_adapter(args.src), args.ckpt)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise CLIError("convert: the destination is the source; pick another path")
    written = write_any(args.dst, ad)
    back = load_adapter(written)
    back = resolved(back, args.ckpt)
    diff = max((back["lora"][k] - v).abs().max().item() for k, v in ad["lora"].items())
    print(f"convert: {args.src} ({ad['format']}, {adapter_size(args.src):,} bytes) -> {written} "
          f"({back['format']}, {adapter_size(written):,} bytes); max |difference| of the tensors {diff:.3g}")
    return written


def cmd_merge(args):
    if args.mode == "svd":
        if args.rank is None:
            raise CLIError("--mode svd needs --rank K")
        check_rank(args.rank)
    adapters = load_adapters(args.adapters)
    if len(adapters) < 2:
        raise CLIError("merge needs at least two adapters")
    if not args.force:
        check_same_base(adapters)
    adapters = [dict(resolved(a, args.ckpt), weight=a["weight"]) for a in adapters]
    modules = sorted({m for a in adapters for m in a["modules"]})
    lora, kept, total = {}, {}, {}
    if args.mode == "cat":
        # [A_1 .. A_n] and [w_1 s_1 B_1 .. w_n s_n B_n] stacked along the rank: the product is the
        # weighted sum of the updates exactly; alpha = rank makes the file's own scale 1
        for m in modules:
            a_parts, b_parts = [], []
            for ad in adapters:
                if m in ad["modules"]:
                    a, b = ad["lora"][f"{m}.lora_a"], ad["lora"][f"{m}.lora_b"]
                    a_parts.append(a)
                    b_parts.append(b * (ad["weight"] * ad["alpha"] / ad["r"]))
                else:  # a module only some adapters touch: zeros keep the rank the same everywhere
                    ref = next(x for x in adapters if m in x["modules"])
                    a_parts.append(ref["lora"][f"{m}.lora_a"].new_zeros(ref["lora"][f"{m}.lora_a"].shape[0], ad["r"]))
                    b_parts.append(ref["lora"][f"{m}.lora_b"].new_zeros(ad["r"], ref["lora"][f"{m}.lora_b"].shape[1]))
            lora[f"{m}.lora_a"], lora[f"{m}.lora_b"] = torch.cat(a_parts, 1), torch.cat(b_parts, 0)
        rank = sum(a["r"] for a in adapters)
    else:
        sums = {}
        for ad in adapters:
            for m, d in delta_weights(ad).items():
                sums[m] = sums.get(m, 0) + ad["weight"] * d
        for m in modules:
            lora[f"{m}.lora_a"], lora[f"{m}.lora_b"], kept[m], total[m] = truncate(sums[m], args.rank, m)
        rank = args.rank
    styles = "+".join(str(a["style"]) for a in adapters)
    targets = sorted({t for a in adapters for t in a["targets"]})
    merged = make_adapter(lora, rank, rank, targets, adapters[0]["base_fingerprint"], styles)
    if args.mode == "svd":
        report_kept(kept, total, f"merge --mode svd --rank {rank}")
    written = write_any(args.out, merged)
    print(f"merge: {len(adapters)} adapters ({', '.join(args.adapters)}) -> {written}, rank {rank}, "
          f"{adapter_size(written):,} bytes")
    return written


def cmd_resize(args):
    check_rank(args.rank)
    ad = resolved(load_adapter(args.src), args.ckpt)
    if args.rank > ad["r"]:
        raise LoraError(f"--rank {args.rank} is larger than the adapter's rank {ad['r']}; resize only lowers it")
    scale = ad["alpha"] / ad["r"]
    lora, kept, total = {}, {}, {}
    for m in ad["modules"]:
        product = (ad["lora"][f"{m}.lora_a"] @ ad["lora"][f"{m}.lora_b"]).T  # (out, in), without the scale
        lora[f"{m}.lora_a"], lora[f"{m}.lora_b"], kept[m], total[m] = truncate(product, args.rank, m)
    # alpha / r stays what it was, so the update keeps its strength: alpha' = alpha * k / r (as kohya)
    out = make_adapter(lora, args.rank, scale * args.rank, ad["targets"], ad["base_fingerprint"], ad["style"],
                       dropout=ad["dropout"])
    report_kept(kept, total, f"resize {ad['r']} -> {args.rank}")
    written = write_any(args.out, out)
    print(f"resize: {args.src} rank {ad['r']} alpha {ad['alpha']:g} -> {written} rank {args.rank} alpha "
          f"{out['alpha']:g}, {adapter_size(args.src):,} -> {adapter_size(written):,} bytes")
    return written


def cmd_extract(args):
    check_rank(args.rank)
    base, base_ckpt = load_model(args.base, "cpu", args.weights)
    tuned, tuned_ckpt = load_model(args.tuned, "cpu", args.weights)
    if base_ckpt["config"]["model"] != tuned_ckpt["config"]["model"]:
        raise LoraError(f"{args.tuned!r} and {args.base!r} are different models (their configs differ); extract "
                        "needs a fine-tune and the base it started from")
    fingerprint = state_fingerprint(base_ckpt[args.weights])
    started_from = tuned_ckpt.get("fine_tune", {}).get("base_fingerprint")
    if started_from and started_from != fingerprint and not args.force:
        raise LoraError(f"{args.tuned!r} was fine-tuned from base {started_from}, not {args.base!r} ({fingerprint}); "
                        "pass the base it started from, or --force")
    targets = tuple(args.targets.split(","))
    b_state, t_state = base.state_dict(), tuned.state_dict()
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise LoraError(f"--targets {args.targets} match no linear layer of this model")
    lora, kept, total = {}, {}, {}
    for n in names:
        delta = t_state[f"{n}.weight"].float() - b_state[f"{n}.weight"].float()
        lora[f"{n}.lora_a"], lora[f"{n}.lora_b"], kept[n], total[n] = truncate(delta, args.rank, n)
    targeted = {f"{n}.weight" for n in names}
    rest = sum((t_state[k].float() - b_state[k].float()).pow(2).sum().item() for k in b_state
               if k not in targeted and b_state[k].is_floating_point())
    style = tuned_ckpt.get("fine_tune", {}).get("style")
    out = make_adapter(lora, args.rank, args.rank, list(targets), fingerprint, style)
    overall = report_kept(kept, total, f"extract rank {args.rank} from {len(names)} layers")
    all_change = math.sqrt(sum(total.values()) + rest)
    print(f"extract: the targeted weights hold {100 * math.sqrt(sum(total.values())) / max(all_change, 1e-30):.1f}% "
          "of the fine-tune's whole change (Frobenius norm over every tensor); the rest is not in the adapter")
    written = write_any(args.out, out)
    print(f"extract: {args.tuned} - {args.base} -> {written}, rank {args.rank}, {adapter_size(written):,} bytes")
    return written, overall


def cmd_grid(args):
    scfg = config_from_args(args, SampleConfig)
    weights = []
    for w in args.weights.split(","):
        _, value = parse_lora_spec(f"x:{w}")
        weights.append(value)
    if len(args.adapters) != 2:
        raise CLIError("grid takes exactly two adapters: the rows' and the columns'")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    adapters = load_adapters(args.adapters, device)
    if not args.force:
        check_same_base(adapters)
    from adapter import attach_adapters

    names = []
    pipe = load_for_sampling(args.ckpt, device, "ema",
                             lambda model, fp: names.extend(attach_adapters(model, adapters, fp, force=args.force)))
    model = pipe.model
    if not 0 <= args.label < model.num_classes:
        raise CLIError(f"--label must be in 0..{model.num_classes - 1}, got {args.label}")
    from diffusion import generate

    cells = []
    for w_row in weights:
        for w_col in weights:
            for name, layer in model.named_modules():
                if isinstance(layer, LoraLayer):
                    layer.scale = w_row if layer.adapter_name == names[0] else w_col
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


# ------------------------------------------------------------------ command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help_text):
        s = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        s.set_defaults(fn=fn)
        return s

    s = command("info", cmd_info, "what an adapter file holds")
    s.add_argument("path", nargs="?", default=DEFAULT_ADAPTER)
    s.add_argument("--ckpt", default=DEFAULT_CKPT, help="base checkpoint: maps kohya names, and gives |W| per layer")

    s = command("convert", cmd_convert, "an old .pt or a kohya file to a PEFT folder, or a PEFT folder to kohya")
    s.add_argument("src")
    s.add_argument("dst", help="a folder (PEFT's layout) or a .safetensors file (kohya's)")
    s.add_argument("--ckpt", default=DEFAULT_CKPT, help="base checkpoint whose module names map kohya's back")

    s = command("merge", cmd_merge, "several adapters, each at a weight, into one")
    s.add_argument("adapters", nargs="+", metavar="PATH[:WEIGHT]")
    s.add_argument("--out", required=True)
    s.add_argument("--mode", choices=["cat", "svd"], default="cat",
                   help="cat: exact, rank = the sum of the ranks; svd: re-factored to --rank")
    s.add_argument("--rank", type=int, default=None, help="rank of --mode svd")
    s.add_argument("--force", action="store_true", help="merge adapters trained on different bases")
    s.add_argument("--ckpt", default=DEFAULT_CKPT, help="base checkpoint whose module names map kohya's back")

    s = command("resize", cmd_resize, "one adapter to a lower rank by SVD, at the same strength")
    s.add_argument("src")
    s.add_argument("--rank", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--ckpt", default=DEFAULT_CKPT, help="base checkpoint whose module names map kohya's back")

    s = command("extract", cmd_extract, "a rank-k adapter from a full fine-tune and its base (truncated SVD)")
    s.add_argument("--tuned", required=True, help="the fully fine-tuned checkpoint (lora_finetune.py --full)")
    s.add_argument("--base", default=DEFAULT_CKPT, help="the base it was fine-tuned from")
    s.add_argument("--rank", type=int, default=4)
    s.add_argument("--targets", default="Wq,Wk,Wv", help="the linear layers to extract, by name")
    s.add_argument("--weights", default="ema", choices=["ema", "model"])
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="extract against a base the fine-tune did not start from")

    s = command("grid", cmd_grid, "two adapters' weights as a grid of one digit")
    s.add_argument("adapters", nargs="+", metavar="PATH")
    s.add_argument("--ckpt", default=DEFAULT_CKPT)
    s.add_argument("--weights", default="0,0.5,1", help="the weights, for rows and columns alike")
    s.add_argument("--label", type=int, default=7)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=os.path.join("out", "lora_grid.png"))
    s.add_argument("--force", action="store_true", help="adapters trained on another base")
    add_runtime_args(s)
    add_config_args(s, SampleConfig)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_main(lambda a: a.fn(a), args)


if __name__ == "__main__":
    main()
