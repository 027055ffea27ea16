"""How good are these digits: the reference classifier, the Frechet distance, slant, ink, and the style share.

    model, acc = get_classifier(train, test, "data/classifier-mnist.pt")  # cached; retrained for other data
    logits, feats = classify(model, images_u8)                            # (N, 10), (N, 128)
    frechet_distance(feats, real_feats)                                   # as FID (Heusel et al. 2017)
    slant(images_u8), ink(images_u8), zero_share(images_u8)              # per image, from moments and mean
    check = train_style_share(real_train, style_train, real_held, style_held)   # real vs style, held-out check
    style_share(check.model, images_u8)                                   # share of images it calls style

evaluate.py (the report), bench.py and the tests use these; nothing here samples or writes a report.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CHECKPOINT_VERSION, CheckpointError, load_checkpoint, load_state_strict, save_checkpoint
from dataset import to_model_range
from files import check_writable_file


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


def slant(images_u8):
    """Per-image slant from second-order image moments: mu11 / mu02, with y pointing up.

    Positive leans right (italic), 0 is upright. Ink-weighted, so it is independent of image size.
    """
    x = images_u8.float()
    n, h, w = x.shape
    ys = -torch.arange(h, dtype=torch.float32).view(1, h, 1)  # up is positive
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    m = x.sum(dim=(1, 2)).clamp_min(1e-6)
    cy = (x * ys).sum(dim=(1, 2)) / m
    cx = (x * xs).sum(dim=(1, 2)) / m
    dy = ys - cy.view(n, 1, 1)
    dx = xs - cx.view(n, 1, 1)
    mu11 = (x * dx * dy).sum(dim=(1, 2)) / m
    mu02 = (x * dy * dy).sum(dim=(1, 2)) / m
    return mu11 / mu02.clamp_min(1e-6)


def ink(images_u8):
    """Per-image mean intensity in [0, 1]: bold digits have more ink."""
    return images_u8.float().mean(dim=(1, 2)) / 255.0


def zero_share(images_u8):
    """Per-image share of pixels exactly 0: a clean background (real MNIST about 0.8) rather than a grey haze."""
    return (images_u8 == 0).float().mean(dim=(1, 2))


# ----------------------------------------------------------------- style share

# The share classifier is trusted only when it tells the two sets apart on images it never saw: it must call
# at least this share of the held-out style images style, and at most that share of the held-out real ones.
STYLE_SHARE_MIN_STYLE = 0.95
STYLE_SHARE_MAX_REAL = 0.05


class StyleShareClassifier(nn.Module):
    """A small CNN (about 0.1M parameters), one logit: real digit (< 0) or the style set (> 0)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 1),
        )

    def forward(self, x):
        return self.net(x).squeeze(1)


@dataclasses.dataclass
class StyleShareCheck:
    """The share classifier and what it did on the held-out images of both sets."""
    model: StyleShareClassifier
    held_out_style_called_style: float  # must be >= STYLE_SHARE_MIN_STYLE
    held_out_real_called_style: float  # must be <= STYLE_SHARE_MAX_REAL
    num_held_out_style: int
    num_held_out_real: int

    @property
    def reliable(self):
        """Both shares within their bounds, as the report prints them (to 0.1%): a share shown as 95.0% passes a
        95% bound, whatever the digits after it."""
        style, real = (round(100 * share, 1) for share in (self.held_out_style_called_style,
                                                           self.held_out_real_called_style))
        return style >= 100 * STYLE_SHARE_MIN_STYLE and real <= 100 * STYLE_SHARE_MAX_REAL

    def summary(self):
        return {"reliable": self.reliable, "held_out_style_called_style": self.held_out_style_called_style,
                "held_out_real_called_style": self.held_out_real_called_style,
                "num_held_out_style": self.num_held_out_style, "num_held_out_real": self.num_held_out_real,
                "needs": f">= {STYLE_SHARE_MIN_STYLE:.0%} of held-out style, <= {STYLE_SHARE_MAX_REAL:.0%} of "
                         "held-out real called style"}


@torch.no_grad()
def called_style(model, images_u8, batch=1000):
    """bool (N,): which of uint8 (N, 28, 28) images the share classifier calls style."""
    model.eval()
    return torch.cat([model(to_model_range(images_u8[i:i + batch])) > 0 for i in range(0, len(images_u8), batch)])


def style_share(model, images_u8):
    """The share of ``images_u8`` that the share classifier calls style."""
    return called_style(model, images_u8).float().mean().item()


def train_style_share(real_train, style_train, real_held, style_held, steps=600, batch=64, seed=0, log=print):
    """Train the real-vs-style classifier on the two training splits (uint8 (N, 28, 28) each) and check it on
    the held-out ones; returns a StyleShareCheck.

    Every batch is half real, half style, drawn with replacement: a style set of a few hundred images
    weighs as much as 60,000 real digits. Both halves are shifted by up to 2 pixels, so that where a
    digit sits in its frame is no cue."""
    if min(len(real_train), len(style_train), len(real_held), len(style_held)) == 0:
        raise ValueError("train_style_share needs images in all four sets")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's global random stream is left as it was
        torch.manual_seed(seed)
        model = StyleShareClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        x_real, x_style = to_model_range(real_train), to_model_range(style_train)
        target = torch.cat([torch.zeros(batch // 2), torch.ones(batch - batch // 2)])
        t0 = time.time()
        model.train()
        for _ in range(steps):
            ir = torch.randint(0, len(x_real), (batch // 2,), generator=gen)
            is_ = torch.randint(0, len(x_style), (batch - batch // 2,), generator=gen)
            x = _shift_augment(torch.cat([x_real[ir], x_style[is_]]), gen)
            loss = F.binary_cross_entropy_with_logits(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    check = StyleShareCheck(model.eval(), style_share(model, style_held), style_share(model, real_held),
                            len(style_held), len(real_held))
    log(f"style share: classifier trained on {len(real_train)} real and {len(style_train)} style images "
        f"({steps} steps, {time.time() - t0:.0f} s): held out, it calls {100 * check.held_out_style_called_style:.1f}% "
        f"of {len(style_held)} style and {100 * check.held_out_real_called_style:.1f}% of {len(real_held)} real "
        f"digits style ({'reliable' if check.reliable else 'UNRELIABLE'})")
    return check
