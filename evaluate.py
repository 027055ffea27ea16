"""Measure sample quality with a reference classifier: conditional accuracy, Frechet distance, slant, ink.

    python evaluate.py --ckpt out/ckpt.pt                        # samples 100 per label itself, then scores
    python evaluate.py --ckpt out/ckpt.pt --lora out/lora        # the same with the adapter (--lora-scale S)
    python evaluate.py --ckpt out/ckpt.pt --lora out/italic:0.8 --lora out/bold:0.5   # several, with weights
    python evaluate.py --samples out/samples.npz                 # scores images written by denoise.py
    python evaluate.py --ckpt a.pt b.pt c.pt                     # several checkpoints: + a time-to-quality curve

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
  frechet_distance_style  with a style (an adapter's, or --style): the distance to the held-out
                       real digits in that style
  real_style_accuracy  with a style: the classifier's accuracy on those real styled digits, the
                       most a styled adapter's samples can expect (it was trained on upright ones)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import DEFAULT_ADAPTER, attach_adapters, load_adapters
from checkpoint import (CHECKPOINT_VERSION, CheckpointError, load_checkpoint, load_for_sampling, load_state_strict,
                        save_checkpoint)
from files import atomic_write, check_writable_dir, check_writable_file, same_file, write_json
from config import SampleConfig
from cli import HelpFormatter, add_config_args, config_from_args, finite_float
from errors import CLIError, run_main
from dataset import apply_style, ink, load_dataset, slant, to_model_range
from diffusion import generate
from lora import set_lora_scale
from runtime import add_runtime_args, pick_device, resolve_precision


# ------------------------------------------------------------------ classifier

class Classifier(nn.Module):
    """A small CNN (about 0.4M parameters); ``features`` is the 128-d penultimate layer used for the distance."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def data_fingerprint(images, labels):
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _shift_augment(x, gen, max_shift=2):
    """Random translations of up to ``max_shift`` pixels: the classic cheap MNIST augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    size = x.shape[-1]
    rows = (dy[:, None] + torch.arange(size)[None])  # (N, H)
    cols = (dx[:, None] + torch.arange(size)[None])  # (N, W)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def classify(model, images_u8, batch=1000):
    """uint8 (N, 28, 28) -> (logits (N, C), features (N, 128))."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images_u8), batch):
        x = to_model_range(images_u8[i:i + batch])
        f = model.features(x)
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(logits), torch.cat(feats)


def train_classifier(train, test, epochs=None, seed=0, log=print):
    """Train the reference CNN on ``train`` and report accuracy on ``test`` (both Digits)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(len(train.classes))
    epochs = epochs or (12 if len(train) < 20000 else 4)
    steps_per_epoch = (len(train) + 127) // 128
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    x_all = to_model_range(train.images)
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * 128:(i + 1) * 128]
            loss = F.cross_entropy(model(_shift_augment(x_all[idx], gen)), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    acc = (classify(model, test.images)[0].argmax(1) == test.labels).float().mean().item()
    log(f"classifier: trained on {train.name}/train ({len(train)} images, {epochs} epochs, "
        f"{time.time() - t0:.0f} s): {100 * acc:.2f}% on {train.name}/test ({len(test)} images)")
    return model, acc


def read_classifier_cache(path):
    """The classifier cache at ``path``, None when there is none yet; any other file there is refused, never replaced.

    A cache is written only where a cache is (or nothing is): a base checkpoint, an adapter or a
    damaged file given as --classifier is left as it is, with one error, before any training."""
    check_writable_file(path, "--classifier")
    if not os.path.exists(path):
        return None
    try:
        cached = load_checkpoint(path, kind="classifier")
    except CheckpointError as e:
        raise CheckpointError(f"--classifier: {e}; it is not a classifier cache, so it is left as it is: pass "
                              "another --classifier path (or delete the file to retrain)") from None
    if not (isinstance(cached.get("data_fingerprint"), str) and isinstance(cached.get("model"), dict)
            and isinstance(cached.get("test_accuracy"), float)):
        raise CheckpointError(f"--classifier {path!r} lacks the fields of a classifier cache; it is left as it is: "
                              "pass another --classifier path (or delete the file to retrain)")
    return cached


def get_classifier(train, test, path, log=print):
    """The cached reference classifier for ``train`` (Digits), trained afresh when the cache is for other data."""
    fp = data_fingerprint(train.images, train.labels)
    cached = read_classifier_cache(path)
    if cached is not None and cached["data_fingerprint"] == fp:
        model = Classifier(len(train.classes))
        load_state_strict(model, cached["model"], f"classifier cache {path!r}")
        return model.eval(), cached["test_accuracy"]
    if cached is not None:
        log(f"classifier: cache {path} was trained on other data ({cached.get('dataset')}); retraining")
    model, acc = train_classifier(train, test, log=log)
    save_checkpoint({"version": CHECKPOINT_VERSION, "kind": "classifier", "model": model.state_dict(),
                     "dataset": train.name, "data_fingerprint": fp, "train_size": len(train),
                     "test_accuracy": acc}, path)
    return model.eval(), acc


# --------------------------------------------------------------------- metrics

def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64; the root via symmetric eigendecompositions."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), and the inner matrix is symmetric PSD
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * inner)


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
        "real_slant": slant(test.images).mean().item(),
        "real_ink": ink(test.images).mean().item(),
        "real_style": style,
        "real_style_slant": slant(real_ref).mean().item(),
        "real_style_ink": ink(real_ref).mean().item(),
        "frechet_distance_style": frechet_style,
        "real_style_accuracy": style_accuracy,
    }


# -------------------------------------------------------------------- sampling

def sample_checkpoint(ckpt_path, args, scfg, device, precision, adapters=None, log=print):
    """Draw n_per_label samples of every label from a checkpoint (+ adapters, read once by the caller);
    returns images, labels, info."""
    def attach(model, fingerprint):
        if adapters:
            attach_adapters(model, adapters, fingerprint, force=args.force)
            set_lora_scale(model, args.lora_scale)

    pipe = load_for_sampling(ckpt_path, device, args.weights, attach)
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
            "steps": scfg.steps if scfg.sampler == "ddim" else ckpt["config"]["diffusion"]["timesteps"],
            "guidance": scfg.guidance, "guidance_interval": list(scfg.guidance_interval), "eta": scfg.eta,
            "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
            "sampling_seconds": seconds, "seconds_per_sample": seconds / len(labels)}
    log(f"sampled {len(labels)} images from {ckpt_path} in {seconds:.1f} s")
    return torch.cat(images), labels, info


def load_npz(path, num_classes, size):
    if not os.path.exists(path):
        raise CLIError(f"--samples {path!r} not found; write one with python denoise.py")
    try:
        with np.load(path) as z:
            files = set(z.files)
            missing = {"images", "labels"} - files
            if missing:
                raise CLIError(f"{path!r} lacks {sorted(missing)}; it needs 'images' (N, {size}, {size}) uint8 "
                               "and 'labels' (N) as denoise.py writes them")
            images, labels = z["images"], z["labels"]
    except (ValueError, OSError) as e:
        raise CLIError(f"{path!r} is not a readable .npz ({e})") from None
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise CLIError(f"{path!r}: images have shape {images.shape}, expected (N, {size}, {size})")
    if len(images) == 0:
        raise CLIError(f"{path!r} holds no samples; there is nothing to score")
    if labels.shape != (len(images),):
        raise CLIError(f"{path!r}: labels have shape {labels.shape}, expected ({len(images)},)")
    # only real numbers, and nothing a cast would change: NaN, fractions, imaginary parts, strings
    if labels.dtype.kind not in "iu":
        raise CLIError(f"{path!r}: labels must be integers, found dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise CLIError(f"{path!r}: labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    if images.dtype != np.uint8:
        if images.dtype.kind not in "iuf":
            raise CLIError(f"{path!r}: images must be uint8 in 0..255, found dtype {images.dtype}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise CLIError(f"{path!r}: images hold NaN or infinite values; they must be uint8 in 0..255")
        if images.min() < 0 or images.max() > 255 or (images.dtype.kind == "f" and (images % 1 != 0).any()):
            raise CLIError(f"{path!r}: images must be whole numbers in 0..255 as uint8 (found {images.dtype} "
                           f"{images.min()}..{images.max()})")
        images = images.astype(np.uint8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


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
            f"samples                 {result['num_samples']}"]
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

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", help="checkpoint(s) from train.py to sample from and score")
    src.add_argument("--samples", help=".npz written by denoise.py (images, labels)")
    p.add_argument("--dataset", default=None, help="reference data (default: the checkpoint's, else auto)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--classifier", default=None, help="classifier cache (default DATA_DIR/classifier-NAME.pt)")
    p.add_argument("--out-dir", default=os.path.join("out", "eval"))
    p.add_argument("--name", default="eval", help="stem of the JSON and PNG written")
    p.add_argument("--n-per-label", type=int, default=100, help="samples per label when sampling a checkpoint")
    p.add_argument("--batch", type=int, default=500, help="images per sampling batch")
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--lora", nargs="?", const=DEFAULT_ADAPTER, default=None, action="append", metavar="PATH[:WEIGHT]",
                   help=f"LoRA adapter to apply to the checkpoint (default {DEFAULT_ADAPTER}) at WEIGHT (default 1); "
                   "repeat for several")
    p.add_argument("--lora-scale", type=finite_float, default=1.0)
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    p.add_argument("--style", default=None, choices=["none", "italic", "bold"],
                   help="also report the real data in this style (default: the adapter's style)")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p)
    add_config_args(p, SampleConfig)
    return p.parse_args(argv)


def main(argv=None):
    return run_main(run, parse_args(argv))


def check_outputs(args):
    """Before any work: the output folder can be written, and no file written is one given to read."""
    check_writable_dir(args.out_dir, "--out-dir")
    stems = [args.name] if not args.ckpt or len(args.ckpt) == 1 else [
        f"{args.name}-{os.path.splitext(os.path.basename(p))[0]}" for p in args.ckpt] + [f"{args.name}-curve"]
    outputs = [os.path.join(args.out_dir, f"{args.name}.json")] + [os.path.join(args.out_dir, f"{s}.png")
                                                                   for s in stems]
    inputs = [p for p in [*(args.ckpt or []), args.samples, args.classifier] if p]
    for out in outputs:
        for given in inputs:
            if same_file(out, given):
                raise CLIError(f"evaluate would write {out!r}, which is {given!r}, a file given to read; "
                               "pass another --out-dir or --name")


def run(args):
    scfg = config_from_args(args, SampleConfig)
    if args.n_per_label <= 0 or args.batch <= 0:
        raise CLIError("--n-per-label and --batch must be > 0")
    if args.lora and not args.ckpt:
        raise CLIError("--lora needs the base it adapts: pass --ckpt (an adapter alone cannot be sampled)")
    check_outputs(args)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    adapters = load_adapters(args.lora, device) if args.lora else None  # read and checked once, for every --ckpt
    style = args.style
    if style is None:
        style = (adapters[0]["style"] or "none") if adapters else "none"
    dataset = args.dataset
    if dataset is None and args.ckpt:
        dataset = load_checkpoint(args.ckpt[0]).get("dataset", "auto")
    train = load_dataset(dataset or "auto", "train", args.data_dir)
    test = load_dataset(train.name, "test", args.data_dir)
    if args.samples:  # check the user's file before the (slow, first time) classifier training
        npz = load_npz(args.samples, len(test.classes), test.images.shape[-1])
    classifier, clf_acc = get_classifier(train, test, args.classifier or os.path.join(
        args.data_dir, f"classifier-{train.name}.pt"))
    sources = args.ckpt or [None]
    results = []
    for path in sources:
        if path is None:
            images, labels = npz
            info = {"samples": args.samples}
        else:
            images, labels, info = sample_checkpoint(path, args, scfg, device, precision, adapters)
        result = {**info, **score(images, labels, classifier, train, test, style, args.seed),
                  "classifier_test_accuracy": clf_acc, "reference_dataset": test.name}
        results.append(result)
        stem = args.name if len(sources) == 1 else f"{args.name}-{os.path.splitext(os.path.basename(path))[0]}"
        os.makedirs(args.out_dir, exist_ok=True)
        title = f"{path or args.samples}" + (f" + {', '.join(args.lora)} x{args.lora_scale}" if args.lora else "")
        report_png(result, images, labels, os.path.join(args.out_dir, f"{stem}.png"), title)
        print(f"{title}: accuracy {100 * result['accuracy']:.1f}%, Frechet {result['frechet_distance']:.2f} "
              f"(floor {result['frechet_floor']:.2f}), slant {result['slant']:+.3f} (real "
              f"{result['real_slant']:+.3f}), ink {result['ink']:.3f} (real {result['real_ink']:.3f})"
              + (f"; to real {result['real_style']} digits: Frechet {result['frechet_distance_style']:.2f}, "
                 f"slant {result['real_style_slant']:+.3f}, ink {result['real_style_ink']:.3f}, "
                 f"accuracy {100 * result['real_style_accuracy']:.1f}%"
                 if result["frechet_distance_style"] is not None else ""))
    out = results[0] if len(results) == 1 else {"results": results}
    if len(results) > 1:
        curve = curve_png(results, os.path.join(args.out_dir, f"{args.name}-curve.png"))
        out["curve_png"] = curve
    json_path = os.path.join(args.out_dir, f"{args.name}.json")
    write_json(json_path, out)
    print(f"evaluate: wrote {json_path}")
    return out


if __name__ == "__main__":
    main()
