"""Measure sample quality with a reference classifier: conditional accuracy, Frechet distance, slant, ink.

    python evaluate.py                                           # out/ckpt.pt: samples 100 per label, then scores
    python evaluate.py --ckpt out/ckpt.pt --lora out/lora        # the same with the adapter (--lora-weight W)
    python evaluate.py --ckpt out/ckpt.pt --lora out/italic:0.8 --lora out/bold:0.5   # several, with weights
    python evaluate.py --samples out/samples.npz                 # scores images written by denoise.py
    python evaluate.py --ckpt a.pt b.pt c.pt                     # several checkpoints: + a time-to-quality curve
    python evaluate.py --lora out/lora --style-data my_digits    # against a style set, the base beside it
    python evaluate.py --lora out/lora --style "font:DejaVu Serif"   # ... or a font's digits

The reference classifier is a small CNN trained on the real training split of the data set and
reported on its held-out split; it is cached (default data/classifier-NAME.pt) with a fingerprint
of the images it was trained on, and retrained when they differ.

Scores, written to OUT_DIR/NAME.json (one object) and a one-page OUT_DIR/NAME.png report:
  accuracy             share of samples the classifier assigns to the label they were asked for
  per_class_accuracy   the same for each label
  frechet_distance     Frechet distance (as FID, Heusel et al. 2017) between the classifier's
                       penultimate features of the samples and of held-out real images;
  frechet_floor        the same between real training and real held-out images, same count: the
                       best a perfect generator could expect
  slant, ink           mean image-moment slant (mu11/mu02) and mean ink, beside the real data's
  zero_share           the share of pixels exactly 0 (a clean background; real MNIST about 0.8)
  frechet_distance_style  with a style (an adapter's, or --style): the distance to the held-out
                       real digits in that style
  real_style_accuracy  with a style: the classifier's accuracy on those real styled digits, the
                       most a styled adapter's samples can expect (it was trained on upright ones)

With a style set (--style-data PATH, --style font:NAME, or an adapter fine-tuned on one), split
80/20 per label (the same split every time):
  style_share          share of samples a small real-vs-style classifier calls style; it is trained
                       on MNIST's training digits against the style set's training split, and
  style_share_reliable true only when, on images it never saw, it calls >= 95% of the held-out
                       style images and <= 5% of the held-out real digits style (style_share_check);
                       otherwise the share is printed as unreliable
  frechet_distance_style_data, frechet_floor_style_data   the distance to the held-out style images,
                       and theirs to the style set's training split (same count): its floor
  style_data_accuracy  the reference classifier's accuracy on the style set itself (a typeface may
                       read worse than handwriting): what the conditional accuracy compares with
  prior_labels, prior_accuracy, prior_frechet_distance   the labels the style set lacks (which a
                       fine-tune keeps from the base), their accuracy and distance to real digits
  base                 with --lora: the base's figures on the same noise, for each of the above
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time

import torch

from adapter import set_weights
from adapter_formats import load_adapters
from checkpoint import load_checkpoint
from files import atomic_write, check_apart, check_replace, check_writable_dir, remove_stale_temps, write_json
from inputs import check_inputs_apart
from config import BATCH_MAX, DATASETS, DEFAULT_CKPT, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, STYLES, SampleConfig
from cli import (ArgumentParser, add_config_args, add_lora_args, add_runtime_args, bounded, config_from_args, name_arg,
                 path_arg, resolve_lora_names, runtime_from_args)
from errors import CLIError, run_main
from dataset import MNIST_CLASSES, apply_style, load_dataset
from diffusion import generate
from pictures import read_samples_npz
from pipeline import load_pipeline
from model_card import write_scores
from metrics import (STYLE_SHARE_MAX_REAL, STYLE_SHARE_MIN_STYLE, classify, frechet_distance, get_classifier, ink,
                     slant, style_share, train_style_share, zero_share)
from runtime import pick_device, resolve_precision
from samplers import model_evals


# ---------------------------------------------------------------------- scores

def score(images_u8, labels, classifier, train, test, style="none", seed=0):
    """All scores for uint8 samples (N, 28, 28) asked for ``labels`` (N,)."""
    logits, feats = classify(classifier, images_u8)
    pred = logits.argmax(1)
    correct = (pred == labels).float()
    num_classes = len(test.classes)
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else None for c in range(num_classes)]
    _, real_test_feats = classify(classifier, test.images)
    n = min(len(images_u8), len(test))
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(train), generator=g)[:n]
    te = torch.randperm(len(test), generator=g)[:n]
    _, real_train_feats = classify(classifier, train.images[tr])
    real_ref = apply_style(test.images, style)
    # with a style, also the distance to the held-out digits in that style (what an adapter aims at) and the
    # classifier's accuracy on them: trained on upright digits, it misreads some real bold ones, so that, not
    # 100%, is the accuracy a styled adapter's samples can be held to
    frechet_style = style_accuracy = None
    if style != "none":
        style_logits, style_feats = classify(classifier, real_ref)
        frechet_style = frechet_distance(feats, style_feats)
        style_accuracy = (style_logits.argmax(1) == test.labels).float().mean().item()
    return {
        "num_samples": len(images_u8),
        "accuracy": correct.mean().item(),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(feats, real_test_feats),
        "frechet_floor": frechet_distance(real_train_feats, real_test_feats[te]),
        "frechet_samples_vs": f"{test.name}/test ({len(test)} images)",
        "slant": slant(images_u8).mean().item(),
        "ink": ink(images_u8).mean().item(),
        "zero_share": zero_share(images_u8).mean().item(),
        "real_zero_share": zero_share(test.images).mean().item(),
        "real_slant": slant(test.images).mean().item(),
        "real_ink": ink(test.images).mean().item(),
        "real_style": style,
        "real_style_slant": slant(real_ref).mean().item(),
        "real_style_ink": ink(real_ref).mean().item(),
        "frechet_distance_style": frechet_style,
        "real_style_accuracy": style_accuracy,
    }


# ------------------------------------------------------------------ style set

STYLE_SPLIT_SEED = 0  # the split does not move with --seed: every evaluation of a style holds out the same images
# the base's figures reported beside the adapter's, on the same noise
BASE_KEYS = ("accuracy", "frechet_distance", "slant", "ink", "style_share", "frechet_distance_style_data",
             "prior_accuracy", "prior_frechet_distance")


@dataclasses.dataclass
class StyleSet:
    """A style data set split into training and held-out parts, with what every score against it needs."""
    name: str  # StyleData.name: "font:NAME", "data:PATH"
    train: object  # StyleData
    held_out: object  # StyleData
    accuracy: float = None  # the reference classifier's on the whole style set
    held_out_feats: torch.Tensor = None  # (N, 128)
    frechet_floor: float = None  # held-out style vs its training split, same count
    share: object = None  # metrics.StyleShareCheck
    prior_labels: list = dataclasses.field(default_factory=list)  # labels the style set lacks
    real_prior_feats: torch.Tensor = None  # real held-out digits of those labels


def resolve_style(args, adapters, log=print):
    """(transform, style-set spec or None): ``--style italic|bold|none`` transforms the real digits as before;
    ``--style font:NAME`` or ``--style-data PATH`` (or an adapter trained on one of them) names a style set."""
    if args.style_data is not None and args.style is not None and args.style not in ("none",):
        raise CLIError(f"--style {args.style} and --style-data {args.style_data} both name the style: give one")
    if args.style_data is not None:
        return "none", args.style_data
    style = args.style
    if style is None:
        style = (adapters[0].style or "none") if adapters else "none"
        if style.startswith("data:"):  # a user's own digits: found again where the fine-tune read them, if there
            path = style[len("data:"):]
            if os.path.exists(path):
                return "none", path
            log(f"evaluate: the adapter's style {style!r} is not found here, so the style is not scored; pass "
                "--style-data PATH to score it")
            return "none", None
    if style in STYLES:
        return style, None
    if style.startswith("font:"):
        return "none", style
    raise CLIError(f"--style {style!r}: choose {', '.join(STYLES)} or font:NAME (or --style-data PATH)")


def read_style_set(spec):
    """The style set ``spec`` names, loaded, checked and split; before the data set is read (a font that does not
    exist is named before data/MNIST is made) and before any classifier is trained."""
    # the style data's own module, needed only here
    from style_training import (MIN_STYLE_IMAGES, STYLE_HELD_OUT, STYLE_MIN_HELD_OUT, check_style_count,
                                load_style_data, split_style_data)

    data = check_style_count(load_style_data(spec, log=lambda line: print(f"evaluate: style {line}")),
                             f"style set {spec!r}")
    train, held = split_style_data(data, STYLE_HELD_OUT, STYLE_SPLIT_SEED)
    if len(held) < STYLE_MIN_HELD_OUT:
        raise CLIError(f"style set {data.name!r} has {len(data)} images, too few to hold out "
                       f"{STYLE_MIN_HELD_OUT} ({STYLE_HELD_OUT:.0%} of each label) for its distance and check; "
                       f"give at least {MIN_STYLE_IMAGES}, a few of each label")
    present = set(data.present())
    return StyleSet(data.name, train, held, prior_labels=[c for c in range(len(MNIST_CLASSES)) if c not in present])


def prepare_style_set(ss, classifier, train, test, seed=0, log=print):
    """Fill in what every score against ``ss`` needs: features, the floor, the reference classifier's accuracy
    on the style set itself, and the real-vs-style share classifier (trained here, checked on held-out images)."""
    all_images = torch.cat([ss.train.images, ss.held_out.images])
    all_labels = torch.cat([ss.train.labels, ss.held_out.labels])
    logits, _ = classify(classifier, all_images)
    ss.accuracy = (logits.argmax(1) == all_labels).float().mean().item()
    _, ss.held_out_feats = classify(classifier, ss.held_out.images)
    # the floor as for the real digits: held-out against training images, the same count of each
    n = min(len(ss.held_out), len(ss.train))
    g = torch.Generator().manual_seed(seed)
    _, train_feats = classify(classifier, ss.train.images[torch.randperm(len(ss.train), generator=g)[:n]])
    ss.frechet_floor = frechet_distance(train_feats, ss.held_out_feats[torch.randperm(len(ss.held_out),
                                                                                       generator=g)[:n]])
    if ss.prior_labels:
        mask = torch.isin(test.labels, torch.tensor(ss.prior_labels))
        _, ss.real_prior_feats = classify(classifier, test.images[mask])
    ss.share = train_style_share(train.images, ss.train.images, test.images, ss.held_out.images, seed=seed, log=log)
    return ss


def style_scores(images_u8, labels, classifier, ss):
    """The scores of samples against a style set: its share, its distance, and the labels it lacks."""
    logits, feats = classify(classifier, images_u8)
    correct = (logits.argmax(1) == labels).float()
    prior = torch.isin(labels, torch.tensor(ss.prior_labels, dtype=labels.dtype))
    return {
        "style_data": ss.name,
        "style_data_images": {"train": len(ss.train), "held_out": len(ss.held_out)},
        "style_share": style_share(ss.share.model, images_u8),
        "style_share_reliable": ss.share.reliable,
        "style_share_check": ss.share.summary(),
        "frechet_distance_style_data": frechet_distance(feats, ss.held_out_feats),
        "frechet_floor_style_data": ss.frechet_floor,
        "style_data_accuracy": ss.accuracy,
        "prior_labels": list(ss.prior_labels),
        "prior_accuracy": correct[prior].mean().item() if prior.any() else None,
        "prior_frechet_distance": (frechet_distance(feats[prior], ss.real_prior_feats)
                                   if prior.sum() > 1 and ss.real_prior_feats is not None else None),
    }


def style_lines(result):
    """The style section of the printed and drawn report, one line each."""
    base = result.get("base") or {}

    def beside(key, fmt):
        return f" (base {fmt.format(base[key])})" if base.get(key) is not None else ""

    check = result["style_share_check"]
    lines = [f"style share            {100 * result['style_share']:.1f}%{beside('style_share', '{:.1%}')}"
             + ("" if result["style_share_reliable"] else "   UNRELIABLE, see below"),
             f"  its classifier, held out: {100 * check['held_out_style_called_style']:.1f}% of style and "
             f"{100 * check['held_out_real_called_style']:.1f}% of real digits called style (needs >= "
             f"{STYLE_SHARE_MIN_STYLE:.0%} and <= {STYLE_SHARE_MAX_REAL:.0%})",
             f"Frechet to style set   {result['frechet_distance_style_data']:.2f}"
             f"{beside('frechet_distance_style_data', '{:.2f}')}   (its floor {result['frechet_floor_style_data']:.2f}, "
             f"{result['style_data_images']['held_out']} held-out of {result['style_data']})",
             f"conditional accuracy   {100 * result['accuracy']:.1f}%{beside('accuracy', '{:.1%}')}   (reference "
             f"classifier on the style set itself {100 * result['style_data_accuracy']:.1f}%)"]
    if result["prior_labels"]:  # None where the samples hold too few of those labels (an .npz of some labels)
        acc, fd = result["prior_accuracy"], result["prior_frechet_distance"]
        lines.append(f"labels {','.join(map(str, result['prior_labels']))} (not in the style set)   accuracy "
                     + (f"{100 * acc:.1f}%{beside('prior_accuracy', '{:.1%}')}" if acc is not None else "n/a")
                     + ", Frechet " + (f"{fd:.2f}{beside('prior_frechet_distance', '{:.2f}')}" if fd is not None
                                        else "n/a"))
    return lines


# -------------------------------------------------------------------- sampling

def sample_checkpoint(ckpt_path, args, scfg, device, precision, adapters=None, log=print):
    """Draw n_per_label samples of every label from a checkpoint (+ adapters, read once by the caller);
    returns images, labels, info."""
    pipe = load_pipeline(ckpt_path, device, args.weights, adapters, force=args.force)
    if adapters:
        set_weights(pipe.model, adapters, args.lora_weight)
    model, diffusion, ckpt = pipe.model, pipe.diffusion, pipe.ckpt
    labels = torch.arange(model.num_classes).repeat_interleave(args.n_per_label)
    images = []
    t0 = time.time()
    for i in range(0, len(labels), args.batch):
        imgs, _ = generate(model, diffusion, labels[i:i + args.batch], device, precision, scfg, seed=args.seed + i,
                           data_size=pipe.data_size)
        images.append(imgs)
    seconds = time.time() - t0
    info = {"ckpt": ckpt_path, "step": ckpt["step"], "train_seconds": ckpt.get("train_seconds"),
            "dataset": ckpt.get("dataset"), "sampler": scfg.sampler,
            "steps": scfg.steps if scfg.sampler != "ddpm" else ckpt["config"]["diffusion"]["timesteps"],
            "guidance": scfg.guidance, "guidance_parallel": scfg.guidance_parallel,
            "guidance_interval": list(scfg.guidance_interval), "eta": scfg.eta,
            "threshold": scfg.threshold,
            # network evaluations an image costs, guidance's second half included (every step counted as guided)
            "model_evals_per_image": model_evals(scfg.sampler, scfg.steps if scfg.sampler != "ddpm"
                                                 else ckpt["config"]["diffusion"]["timesteps"], scfg.guidance > 0),
            "lora": [str(s) for s in args.lora] if args.lora else None,
            "lora_weight": args.lora_weight if args.lora else None,
            "sampling_seconds": seconds, "seconds_per_sample": seconds / len(labels)}
    log(f"sampled {len(labels)} images from {ckpt_path} in {seconds:.1f} s")
    return torch.cat(images), labels, info


def load_npz(path, num_classes=None, size=None):
    """The images and labels of a denoise.py .npz, checked; without ``num_classes`` and ``size`` (before the
    data set is loaded) every check that does not need them."""
    if not os.path.exists(path):
        raise CLIError(f"--samples {path!r} not found; write one with python denoise.py")
    images, labels = read_samples_npz(path, CLIError, num_classes=num_classes, size=size, what="--samples")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


# ---------------------------------------------------------------------- report

def report_png(result, images, labels, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = len(result["per_class_accuracy"])
    fig = plt.figure(figsize=(11, 8.5))
    # sample grid: up to 8 per class, a column per class
    ax = fig.add_axes([0.03, 0.30, 0.55, 0.62])
    rows = []
    for c in range(num_classes):
        sel = images[labels == c][:8]
        if len(sel) < 8:
            sel = torch.cat([sel, torch.zeros(8 - len(sel), *images.shape[1:], dtype=torch.uint8)])
        rows.append(sel)
    grid = torch.stack(rows, 1)  # (8, C, H, W)
    grid = grid.permute(0, 2, 1, 3).reshape(8 * images.shape[1], num_classes * images.shape[2])
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([(i + 0.5) * images.shape[2] for i in range(num_classes)], [str(i) for i in range(num_classes)])
    ax.set_yticks([])
    ax.set_title("samples (one column per label asked for)")
    ax2 = fig.add_axes([0.65, 0.55, 0.32, 0.35])
    acc = [100 * (a if a is not None else 0) for a in result["per_class_accuracy"]]
    ax2.bar(range(num_classes), acc, color="tab:blue")
    ax2.set_ylim(0, 100)
    ax2.set_xticks(range(num_classes))
    ax2.set_ylabel("accuracy %")
    ax2.set_title("per-class conditional accuracy")
    text = [title, "",
            f"conditional accuracy   {100 * result['accuracy']:.1f}%   (reference classifier "
            f"{100 * result['classifier_test_accuracy']:.2f}% on real held-out digits"
            + (f", {100 * result['real_style_accuracy']:.1f}% on real {result['real_style']} ones"
               if result["real_style_accuracy"] is not None else "") + ")",
            f"Frechet distance        {result['frechet_distance']:.2f}   (real-vs-real floor "
            f"{result['frechet_floor']:.2f})"
            + (f"; to real {result['real_style']} {result['frechet_distance_style']:.2f}"
               if result["frechet_distance_style"] is not None else ""),
            f"slant mu11/mu02         {result['slant']:+.3f}   (real {result['real_slant']:+.3f}"
            + (f", real {result['real_style']} {result['real_style_slant']:+.3f}" if result["real_style"] != "none"
               else "") + ")",
            f"ink                     {result['ink']:.3f}   (real {result['real_ink']:.3f}"
            + (f", real {result['real_style']} {result['real_style_ink']:.3f}" if result["real_style"] != "none"
               else "") + ")",
            f"pixels exactly 0        {result['zero_share']:.3f}   (real {result['real_zero_share']:.3f})",
            f"samples                 {result['num_samples']}"]
    if "style_share" in result:
        text += [f"against style set {result['style_data']}" + (", base beside on the same noise" if "base" in result
                                                                 else "")] + style_lines(result)
    fig.text(0.03, 0.04, "\n".join(text), family="monospace", fontsize=9, va="bottom")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def curve_png(results, path):
    """Accuracy and Frechet distance against training minutes, one point per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["train_seconds"] / 60, 100 * r["accuracy"], r["frechet_distance"]) for r in results
                 if r.get("train_seconds") is not None)
    if len(pts) < 2:
        return None
    mins, acc, fd = zip(*pts)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(mins, acc, "o-", color="tab:blue")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("conditional accuracy %", color="tab:blue")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(mins, fd, "s--", color="tab:red")
    ax2.set_ylabel("Frechet distance", color="tab:red")
    ax.set_title("time to quality")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ main

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    data, model, lora, sampling, out = (p.group(g) for g in ("data", "model", "LoRA", "sampling", "output"))
    src = model.add_mutually_exclusive_group()
    src.add_argument("--ckpt", nargs="+", type=path_arg,
                     help=f"checkpoint(s) from train.py to sample from and score (default "
                     f"{DEFAULT_CKPT} unless --samples)")
    src.add_argument("--samples", type=path_arg, help=".npz written by denoise.py (images, labels), scored instead "
                     "of sampling a checkpoint")
    data.add_argument("--dataset", default=None, choices=DATASETS,
                      help="reference data (default: the checkpoint's, else auto)")
    data.add_argument("--data-dir", default=DEFAULT_DATA_DIR, type=path_arg,
                      help="where torchvision keeps MNIST, and the classifier its cache")
    data.add_argument("--classifier", default=None, type=path_arg,
                      help="classifier cache (default DATA_DIR/classifier-NAME.pt)")
    out.add_argument("--out-dir", default=os.path.join(DEFAULT_OUT_DIR, "eval"), type=path_arg,
                     help="where the JSON and PNG reports go")
    out.add_argument("--name", default="eval", type=name_arg, help="stem of the JSON and PNG written")
    sampling.add_argument("--n-per-label", type=bounded(int, gt=0, le=100000), default=100,
                          help="samples per label when sampling a checkpoint")
    sampling.add_argument("--batch", type=bounded(int, gt=0, le=BATCH_MAX), default=500,
                          help="images per sampling batch")
    model.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    add_lora_args(lora)
    lora.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    data.add_argument("--style", default=None, metavar="{none,italic,bold,font:NAME}",
                   help="also report the real data in this style, or score against the digits of font NAME as a "
                   "style set (default: the adapter's style)")
    data.add_argument("--style-data", default=None, metavar="PATH", type=path_arg,
                   help="score against this style set: a folder of 0..9 subfolders of images or an .npz (images, "
                   "labels); with --lora the base is sampled on the same noise and reported beside")
    add_config_args(p, SampleConfig)
    add_runtime_args(p)
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.ckpt is None and args.samples is None:  # as denoise.py: the checkpoint train.py writes by default
        args.ckpt = [DEFAULT_CKPT]
    return args


def main(argv=None):
    args = parse_args(argv)
    # the command as typed, for an adapter's model card (an in-process call's argv, or the shell's)
    args.command = shlex.join(["python", "evaluate.py", *(sys.argv[1:] if argv is None else argv)])
    return run_main(run, args)


def summary_line(result):
    """The scores of one evaluated source in a line: printed, and in an adapter's model card."""
    return (f"accuracy {100 * result['accuracy']:.1f}%, Frechet {result['frechet_distance']:.2f} "
            f"(floor {result['frechet_floor']:.2f}), slant {result['slant']:+.3f} (real "
            f"{result['real_slant']:+.3f}), ink {result['ink']:.3f} (real {result['real_ink']:.3f}), pixels exactly 0 "
            f"{result['zero_share']:.3f} (real {result['real_zero_share']:.3f})"
            + (f"; to real {result['real_style']} digits: Frechet {result['frechet_distance_style']:.2f}, "
               f"slant {result['real_style_slant']:+.3f}, ink {result['real_style_ink']:.3f}, "
               f"accuracy {100 * result['real_style_accuracy']:.1f}%"
               if result["frechet_distance_style"] is not None else ""))


def check_outputs(args):
    """Before anything is read: the output folder can be written, no file written is one given to read (nor inside
    an adapter folder given), and none holds a file of another kind."""
    check_writable_dir(args.out_dir, "--out-dir")
    stems = [args.name] if not args.ckpt or len(args.ckpt) == 1 else [
        f"{args.name}-{os.path.splitext(os.path.basename(p))[0]}" for p in args.ckpt] + [f"{args.name}-curve"]
    outputs = [(os.path.join(args.out_dir, f"{args.name}.json"), "json")] + [
        (os.path.join(args.out_dir, f"{s}.png"), "png") for s in stems]
    inputs = ([("--ckpt", p) for p in args.ckpt or []] + [("--samples", args.samples)]
              + [("--lora", spec.path) for spec in args.lora or []])
    check_inputs_apart([("--out-dir", p) for p, _ in outputs], inputs + [("--classifier", args.classifier),
                       ("--style-data", args.style_data)], "pass another --out-dir or --name")
    check_apart([("--classifier", args.classifier)], inputs, "pass another --classifier")
    for path, kind in outputs:
        check_replace(path, "--out-dir", (kind,), None, "a report" if kind == "png" else "a JSON report")


def run(args):
    scfg = config_from_args(args, SampleConfig)
    rcfg = runtime_from_args(args)  # checked; args.seed, .device and .precision hold its values from here on
    if args.n_per_label <= 0 or args.batch <= 0:
        raise CLIError("--n-per-label and --batch must be > 0")
    if args.lora and not args.ckpt:
        raise CLIError("--lora needs the base it adapts: pass --ckpt (an adapter alone cannot be sampled)")
    args.lora = resolve_lora_names(args.lora, args.lora_dir)
    check_outputs(args)
    device = pick_device(rcfg.device)
    precision = resolve_precision(rcfg.precision, device)  # sampling: the rule, never timed (same seed, same pictures)
    adapters = load_adapters(args.lora, device) if args.lora else None  # read and checked once, for every --ckpt
    # every file given is read and checked before the work (the data set, the classifier, sampling) starts
    if args.samples:
        load_npz(args.samples)
    saved_dataset = [load_checkpoint(p).get("dataset", "auto") for p in args.ckpt or []]  # one at a time
    style, style_spec = resolve_style(args, adapters)
    dataset = args.dataset
    if dataset is None and saved_dataset:
        dataset = saved_dataset[0]
    style_set = read_style_set(style_spec) if style_spec else None  # checked before any file is written
    remove_stale_temps(args.out_dir)  # what a killed run left half-written there
    train = load_dataset(dataset or "auto", "train", args.data_dir)
    test = load_dataset(train.name, "test", args.data_dir)
    if args.samples:  # check the user's file before the (slow, first time) classifier training
        npz = load_npz(args.samples, len(test.classes), test.images.shape[-1])
    if style_set is not None and list(test.classes) != MNIST_CLASSES:
        raise CLIError("a style set holds digits; score it against a digit data set (--dataset mnist or mnist-5k)")
    seen = [a.style for a in adapters or [] if style_set is not None and a.style == style_set.name]
    if seen:  # the held-out part may be images the adapter trained on: its distance would flatter it
        print(f"evaluate: note: an adapter was trained on a set also named {seen[0]!r}; if these are those images, "
              "the distance is to images it saw: score against others (lora_tools.py render-style --seed 1, or a "
              "fifth of yours kept out of training)")
    classifier, clf_acc = get_classifier(train, test, args.classifier or os.path.join(
        args.data_dir, f"classifier-{train.name}.pt"))
    if style_set is not None:
        prepare_style_set(style_set, classifier, train, test, seed=args.seed)
    sources = args.ckpt or [None]
    results, card_lines = [], []
    for path in sources:
        if path is None:
            images, labels = npz
            info = {"samples": args.samples}
        else:
            images, labels, info = sample_checkpoint(path, args, scfg, device, precision, adapters)
        result = {**info, **score(images, labels, classifier, train, test, style, args.seed),
                  "classifier_test_accuracy": clf_acc, "reference_dataset": test.name}
        if style_set is not None:
            result.update(style_scores(images, labels, classifier, style_set))
            if adapters:  # the base on the same noise (the same seeds), so the difference is the adapter's
                base_images, base_labels, _ = sample_checkpoint(path, args, scfg, device, precision, None)
                base = {**score(base_images, base_labels, classifier, train, test, "none", args.seed),
                        **style_scores(base_images, base_labels, classifier, style_set)}
                result["base"] = {k: base[k] for k in BASE_KEYS}
        results.append(result)
        stem = args.name if len(sources) == 1 else f"{args.name}-{os.path.splitext(os.path.basename(path))[0]}"
        os.makedirs(args.out_dir, exist_ok=True)
        lora_note = f" + {', '.join(map(str, args.lora))} x{args.lora_weight}" if args.lora else ""
        title = f"{path or args.samples}{lora_note}"
        report_png(result, images, labels, os.path.join(args.out_dir, f"{stem}.png"), title)
        print(f"{title}: {summary_line(result)}")
        card_lines += [f"`{title}`: {summary_line(result)}", *(style_lines(result) if style_set is not None else [])]
        if style_set is not None:
            print(f"against style set {style_set.name}" + (" (base beside, same noise)" if adapters else "") + ":")
            for line in style_lines(result):
                print("  " + line)
    out = results[0] if len(results) == 1 else {"results": results}
    if len(results) > 1:
        curve = curve_png(results, os.path.join(args.out_dir, f"{args.name}-curve.png"))
        out["curve_png"] = curve
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    write_json(json_path, out)
    cards = [write_scores(a.path, args.command, card_lines, a) for a in adapters or []
             if a.format == "peft" and a.path and os.path.isdir(a.path)]
    print(f"evaluate: wrote {json_path}" + "".join(f", the scores in {c}" for c in cards if c))
    return out


if __name__ == "__main__":
    main()
