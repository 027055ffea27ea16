"""The data a style fine-tune trains on: the style set (a folder, an .npz or a font), its held-out split, and
the training set grown from it, with real digits of the labels it lacks as a prior.

    data = load_style_data("my_digits")          # StyleData: images uint8 (N, 28, 28), labels, name, inverted
    train, held_out = split_style_data(data, 0.2, seed=0)
    s = training_set(train, mnist.images, mnist.labels, augment_mode="auto", prior_weight=1.0, min_size=128, seed=0)
    steps = sized_steps(len(data), preset_steps)

Reading and preprocessing the images is styles.py's, rendering a font's font_styles.py's.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from font_styles import FONT_PER_LABEL, load_font
from styles import NUM_LABELS, SIZE, StyleData, StyleDataError, load_folder, load_npz

# The one minimum of a style set, for the page's uploads and drawings, `lora_finetune.py --data` and
# `evaluate.py --style-data`: 10 images. The fine-tune itself would run on one (it repeats the set to a batch),
# so the minimum is what scoring the result needs. evaluate.py holds out a fifth of each label (STYLE_HELD_OUT)
# and reports the distance to them beside its floor measured at the same count, so a small set shows its own
# noise instead of being refused; it needs two held-out images for a covariance (STYLE_MIN_HELD_OUT), a fifth of
# ten. The 50 it asked for before made every adapter drawn on the page unscorable.
STYLE_HELD_OUT = 0.2
STYLE_MIN_HELD_OUT = 2
MIN_STYLE_IMAGES = round(STYLE_MIN_HELD_OUT / STYLE_HELD_OUT)


def check_style_count(data, what):
    """A StyleDataError unless ``data`` holds at least MIN_STYLE_IMAGES images; ``what`` names the set."""
    if len(data) < MIN_STYLE_IMAGES:
        raise StyleDataError(f"{what} has {len(data)} image(s): a style set needs at least {MIN_STYLE_IMAGES} "
                             "(add more, named as 7/a.png or 7_a.png)")
    return data


def load_style_data(spec, *, per_label=FONT_PER_LABEL, seed=0, log=print):
    """The style data set ``spec`` names: a folder of 0..9 subfolders, an .npz, or "font:NAME".

    Every image is read, checked and preprocessed here (nothing is written); ``log`` gets one summary
    line (images per label, how many were inverted). ``per_label`` and ``seed`` are for fonts."""
    spec = str(spec)
    if spec.startswith("font:"):
        data = load_font(spec, per_label, seed)
    elif not os.path.exists(spec):
        raise StyleDataError(f"{spec!r} not found: pass a folder of 0..9 subfolders of images, an .npz, or "
                             "font:NAME")
    elif os.path.isdir(spec):
        data = load_folder(spec)
    elif spec.lower().endswith(".npz"):
        data = load_npz(spec)
    else:
        raise StyleDataError(f"{spec!r} is a file but not an .npz: pass a folder of 0..9 subfolders of images, an "
                             ".npz (images, labels) or font:NAME")
    if log is not None:
        log(f"style: {data.summary()}")
    return data


def split_style_data(data, held_out_fraction, seed):
    """(train, held_out) StyleData: ``held_out_fraction`` of each label's images, drawn by ``seed``, held out;
    a label keeps at least one image for training."""
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(data), dtype=torch.bool)
    for c in data.present():
        idx = torch.nonzero(data.labels == c).flatten()
        k = min(len(idx) - 1, round(held_out_fraction * len(idx)))
        held[idx[torch.randperm(len(idx), generator=g)[:k]]] = True

    def part(mask):
        return StyleData(data.images[mask], data.labels[mask], data.name, 0)
    return part(~held), part(held)


AUGMENT_CHOICES = ("auto", "on", "off")
# --augment auto augments a set of fewer images than this: MNIST has ~6,000 a label, a hand-made set tens (the
# default is off: config.LoraConfig.augment says why)
AUGMENT_AUTO_BELOW = 1000
# an augmented set is grown to about this many images (the originals once, the rest random variants): a
# few thousand draws, so that a fine-tune of hundreds of steps of batch 128 sees each variant a few times
AUGMENT_POOL = 4096
AUGMENT_SHIFT = 2.0  # pixels either way; MNIST's centring by mass leaves digits this far apart
AUGMENT_DEGREES = 10.0  # rotation either way: a hand's slant varies this much
AUGMENT_SCALE = (0.9, 1.1)  # the 20x20 fit varies with the digit's shape by as much
# --lora-steps when not given: the preset's steps for STEPS_REFERENCE_IMAGES images (20 a label) or fewer, and
# for more, in proportion up to 1.5 times. On a typeface a smaller set needed no fewer steps, and doubling the
# steps of a larger one bought little for twice the time (experiments/own_style/notes.md, "the steps rule").
STEPS_REFERENCE_IMAGES = 200
STEPS_RANGE = (1.0, 1.5)


def sized_steps(num_images, preset_steps):
    """The fine-tune's steps for a style set of ``num_images``: proportional, within STEPS_RANGE of the preset's."""
    factor = min(max(num_images / STEPS_REFERENCE_IMAGES, STEPS_RANGE[0]), STEPS_RANGE[1])
    return max(1, round(preset_steps * factor))


def augment_on(mode, num_images):
    if mode not in AUGMENT_CHOICES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and num_images < AUGMENT_AUTO_BELOW)


def augment(images_u8, copies, seed):
    """The images once as they are, then ``copies - 1`` random variants of each: uint8 (N * copies, 28, 28).

    Small shifts, rotations and scalings only, drawn from a generator seeded by ``seed``; never a flip
    (a mirrored 7 is no 7, a mirrored 2 a 5)."""
    n = len(images_u8)
    if copies <= 1:
        return images_u8.clone()
    g = torch.Generator().manual_seed(seed)
    m = n * (copies - 1)
    angle = (torch.rand(m, generator=g) * 2 - 1) * math.radians(AUGMENT_DEGREES)
    scale = AUGMENT_SCALE[0] + torch.rand(m, generator=g) * (AUGMENT_SCALE[1] - AUGMENT_SCALE[0])
    shift = (torch.rand(m, 2, generator=g) * 2 - 1) * AUGMENT_SHIFT * 2 / SIZE  # pixels -> affine_grid's [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps each output point to the input point it samples: the inverse of the rotation and scaling
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = images_u8.float().div(255).unsqueeze(1).repeat(copies - 1, 1, 1, 1)  # (m, 1, 28, 28)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    variants = (x.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8)
    return torch.cat([images_u8, variants])


@dataclasses.dataclass
class TrainingSet:
    """What the fine-tune trains on: the style images (augmented or repeated) and the prior's real digits."""
    images: torch.Tensor  # (N, 28, 28) uint8: the style part first, then the prior part
    labels: torch.Tensor  # (N,) int64
    num_style: int  # the first num_style images are the style's
    copies: int  # each style image appears this many times (the original and copies - 1 variants or repeats)
    augmented: bool
    missing: list  # the labels the style set lacks
    prior_labels: list  # those the prior's real digits keep as they were ([] with prior weight 0)

    @property
    def num_prior(self):
        return len(self.labels) - self.num_style

    def summary(self, prior_weight):
        """One line: how the style part was grown and what the prior adds."""
        how = (f"augmented x{self.copies} (shifts of up to {AUGMENT_SHIFT:g} px, rotations of up to "
               f"{AUGMENT_DEGREES:g} deg, scalings {AUGMENT_SCALE[0]:g}..{AUGMENT_SCALE[1]:g}, no flips)"
               if self.augmented else f"repeated x{self.copies}" if self.copies > 1 else "as they are")
        missing = ",".join(map(str, self.missing))
        prior = (f" + {self.num_prior} real digits of {missing} (prior weight {prior_weight:g})" if self.num_prior
                 else " (every label given: no prior)" if not self.missing
                 else f" (prior weight 0: {missing} get no real digits and may drift)")
        return f"{len(self.labels)} images: {self.num_style} of the style, {how}{prior}"


def training_set(style, prior_images, prior_labels, *, augment_mode, prior_weight, min_size, seed):
    """The style set grown to a training set, with real digits of the labels it lacks mixed in.

    Augmented (AUGMENT_POOL images) or repeated (at least ``min_size``, the global batch), so that an
    epoch holds whole batches. Prior preservation (Ruiz et al. 2022, DreamBooth): labels the style set
    lacks keep what they were by training on real digits of them too, prior_weight * (style part) of them
    drawn from ``prior_images``. The loss is a mean over the batch, so a prior share w / (1 + w) of the
    data makes it (L_style + w L_prior) / (1 + w) in expectation: DreamBooth's L_style + w L_prior up to a
    constant factor, which Adam's update does not see."""
    n = len(style)
    on = augment_on(augment_mode, n)
    missing = [c for c in range(NUM_LABELS) if c not in style.present()]
    present = [c for c in missing if (prior_labels == c).any()]  # the missing labels the real digits hold
    with_prior = bool(present) and prior_weight > 0
    # a prior draws prior_weight times the style part: repeated to AUGMENT_POOL, ten sevens bring thousands of
    # real digits, not a hundred that the fine-tune would learn by heart (experiments/own_style/notes.md,
    # "What changed")
    grow = on or with_prior
    copies = max(math.ceil(min_size / n), math.ceil(AUGMENT_POOL / n) if grow else 1, 2 if on else 1)
    images = augment(style.images, copies, seed) if on else style.images.repeat(copies, 1, 1)
    labels = style.labels.repeat(copies)
    num_prior = round(prior_weight * len(labels)) if with_prior else 0
    if num_prior:
        g = torch.Generator().manual_seed(seed + 1)
        # as many of each missing label (the first few one more), so that a small set's prior misses none;
        # within a label every real digit once before any twice: whole permutations, as many as needed
        num_prior = max(num_prior, len(present))
        order = []
        for i, c in enumerate(present):
            pool = torch.nonzero(prior_labels == c).flatten()
            count = num_prior // len(present) + (i < num_prior % len(present))
            order.append(torch.cat([pool[torch.randperm(len(pool), generator=g)]
                                    for _ in range(math.ceil(count / len(pool)))])[:count])
        order = torch.cat(order)
        images = torch.cat([images, prior_images[order]])
        labels = torch.cat([labels, prior_labels[order]])
    return TrainingSet(images, labels, n * copies, copies, on, missing, missing if num_prior else [])
