"""Configuration: one dataclass per concern, presets as differences from the default.

Every script builds its command line from these fields (``--batch-size``,
``--channels 32,64,128``, ``--ema-decay 0.999``), so a flag and its default can
never drift apart. ``--preset NAME`` applies a preset first; explicit flags win.

    fast      the default: sized for a laptop CPU (the README gives measured times)
    tutorial  the original tutorial's network (48x48, channels 64..1024, a small
              cross-attention in each of its nine blocks, T=1000, batch 400), with
              DDPM's optimiser (Adam 2e-4, clipping 1.0): for a GPU
    tiny      seconds, for tests
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields


@dataclass
class ModelConfig:
    img_size: int = 28  # side of the square image the UNet sees; data is resized to it
    in_channels: int = 1  # MNIST is grey
    patch_size: int = 2  # fold p x p pixels into channels before the UNet (28x28x1 -> 14x14x4 for p=2)
    num_classes: int = 10  # labels 0..num_classes-1; index num_classes is the "null" label for guidance
    channels: tuple = (64, 128)  # feature channels per UNet level; each level after the first halves the resolution
    num_res_blocks: int = 1  # residual blocks per level (more = deeper, slower)
    attn_levels: tuple = (1,)  # levels (0-based) that get a transformer block; full resolution attention is costly
    num_heads: int = 4  # attention heads in every transformer block
    context_tokens: int = 4  # tokens the label is embedded into; >=2 or the cross-attention softmax is constant and Wq/Wk never learn
    context_dim: int = 64  # width of each label token (the "text encoder" output width in Stable Diffusion)
    time_dim: int = 128  # width of the time embedding MLP
    dropout: float = 0.0  # dropout inside residual blocks
    arch: str = "sd"  # sd: Stable Diffusion's UNet | tutorial: the tutorial's (a small cross-attention per block)
    attn_dim: int = 0  # arch tutorial: width of Wq, Wk, Wv (the tutorial's 16); 0: the block's channels
    ff_dim: int = 0  # arch tutorial: hidden width of the feed-forward after the cross-attention (the tutorial's 32); 0: none
    # arch sd: add a fixed 2-D sine position code to every transformer block's tokens (unet.position_code), so that
    # attention, and a LoRA on Wq/Wk/Wv, knows where each token sits (Stable Diffusion has none; checkpoints saved
    # before this setting existed have none: SAVED_BEFORE). README, "Levers measured", says what it changed
    pos_emb: bool = True

    def __post_init__(self):
        _choice(self, "arch", ("sd", "tutorial"))
        if self.arch == "sd" and (self.attn_dim or self.ff_dim):
            raise ValueError("attn_dim and ff_dim size the tutorial's cross-attention blocks; they need arch tutorial")
        if min(self.attn_dim, self.ff_dim) < 0:
            raise ValueError(f"attn_dim and ff_dim must be >= 0, got {self.attn_dim}, {self.ff_dim}")
        self.channels = tuple(int(c) for c in self.channels)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        if not self.channels or min(self.channels) <= 0:
            raise ValueError(f"channels must be positive integers, got {self.channels}")
        downs = len(self.channels) - 1
        if self.patch_size <= 0 or self.img_size <= 0 or self.img_size % (self.patch_size * 2 ** downs):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size * 2**{downs} "
                             f"for {len(self.channels)} UNet levels; pick another --img-size, --patch-size "
                             "or fewer --channels")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channels)]
        if bad:
            raise ValueError(f"attn_levels {bad} out of range 0..{len(self.channels) - 1}")
        if self.context_tokens < 2:
            raise ValueError(f"context_tokens must be >= 2 (got {self.context_tokens}): with one key the "
                             "cross-attention softmax is always 1 and Wq/Wk get zero gradient")
        widths = [self.attn_dim or self.channels[a] for a in self.attn_levels]
        if any(w % self.num_heads for w in widths):
            what = "attn_dim" if self.attn_dim else "channels at attention levels"
            raise ValueError(f"{what} must be divisible by num_heads={self.num_heads}")
        _positive(self, "num_classes", "num_res_blocks", "num_heads", "context_dim", "time_dim", "in_channels")
        if self.arch == "tutorial" and self.pos_emb:
            raise ValueError("pos_emb adds a position code to the sd arch's transformer blocks; the tutorial arch "
                             "has none: pass --no-pos-emb (or --preset tutorial)")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T of Ho et al. 2020
    # linear (Ho et al. 2020; what a checkpoint without this field used) | cosine (Nichol & Dhariwal 2021)
    schedule: str = "linear"
    beta_start: float = 1e-4  # linear schedule start, Ho et al. 2020
    beta_end: float = 0.02  # linear schedule end, Ho et al. 2020
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023); 0 turns it off (plain MSE on the noise)

    def __post_init__(self):
        _positive(self, "timesteps")
        _choice(self, "schedule", ("linear", "cosine"))
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0, got {self.min_snr_gamma}")


@dataclass
class TrainConfig:
    dataset: str = "auto"  # auto | mnist | mnist-5k | fashion-mnist
    data_dir: str = "data"  # where torchvision keeps downloads
    out_dir: str = "out"  # checkpoints and sample grids go here
    max_steps: int = 1000  # optimizer steps in all; an epoch is one pass over the data
    # minutes: instead of --max-steps, as many steps as fit, from a step timed here before the run (the
    # steps chosen are printed and saved, so --max-steps N repeats the run exactly); 0: off
    time_budget: float = 0.0
    batch_size: int = 128  # global batch (see batch_scope)
    batch_scope: str = "global"  # under torchrun: hold the "global" batch fixed, or the "per-rank" batch
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up, then cosine decay (Loshchilov & Hutter 2017)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.999  # EMA of the weights, used for sampling (warmed up as (1+n)/(10+n))
    label_drop: float = 0.1  # share of labels replaced by the null label, for classifier-free guidance
    seed: int = 0  # seeds weights, data order and noise
    device: str = "auto"  # auto | cpu | cuda | mps (auto tries cuda, then mps, then cpu)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware does it fast)
    save_every: int = 1  # write the checkpoint every N epochs (always at the end and on Ctrl-C)
    sample_every: int = 1  # write a sample grid every N epochs (0: only at the end)
    snapshot_every: int = 0  # also keep out/ckpt_stepNNNNNN.pt every N epochs (for time-to-quality curves); 0 off
    compile: bool = False  # torch.compile the model (opt-in; see bench.py)

    def __post_init__(self):
        _positive(self, "max_steps", "batch_size", "save_every")
        _choice(self, "batch_scope", ("global", "per-rank"))
        _choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        _choice(self, "precision", ("auto", "fp32", "bf16", "fp16"))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_drop < 1:
            raise ValueError(f"label_drop must be in [0, 1), got {self.label_drop}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.time_budget < float("inf"):
            raise ValueError(f"time_budget must be a number of minutes >= 0, got {self.time_budget}")
        if min(self.warmup_steps, self.sample_every, self.snapshot_every) < 0:
            raise ValueError("warmup_steps, sample_every and snapshot_every must be >= 0")


@dataclass
class SampleConfig:
    sampler: str = "ddim"  # ddim (fast, Song et al. 2021) | ddpm (ancestral, Algorithm 2 of Ho et al. 2020)
    steps: int = 50  # denoising steps for ddim (ddpm always uses all T)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 ~ DDPM
    guidance: float = 2.0  # classifier-free guidance w (Ho & Salimans 2022): eps_c + w*(eps_c - eps_u); 0 = off
    # guide only the steps with lo <= t/T <= hi (Kynkaanniemi et al. 2024); the steps outside it run the
    # conditional half alone. The README's "Levers measured" gives what it did here (it cost accuracy)
    guidance_interval: tuple = (0.0, 1.0)

    def __post_init__(self):
        _choice(self, "sampler", ("ddim", "ddpm"))
        _positive(self, "steps")
        if self.eta < 0 or self.guidance < 0:
            raise ValueError("eta and guidance must be >= 0")
        self.guidance_interval = tuple(float(v) for v in self.guidance_interval)
        if len(self.guidance_interval) != 2 or not 0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 1:
            raise ValueError(f"guidance_interval must be two numbers lo,hi with 0 <= lo <= hi <= 1, "
                             f"got {self.guidance_interval}")


# The fine-tune's default t range for each style (fractions of T). A slant is decided at middle noise, and
# t from 0..0.8 gave it no more slant but a larger distance to real italic digits; a bold adapter never
# trained at the least noisy steps speckles its strokes there (88.6% accuracy against 94.2% with them).
# README, "Levers measured"
STYLE_T_RANGE = {"italic": (0.2, 0.8), "none": (0.2, 0.8), "bold": (0.0, 0.8)}


@dataclass
class LoraConfig:
    r: int = 4  # rank of the update A.B
    alpha: float = 4.0  # the update is scaled by alpha / r
    targets: tuple = ("Wq", "Wk", "Wv")  # names of the nn.Linear layers to adapt
    lora_dropout: float = 0.0  # dropout on the LoRA path only
    style: str = "italic"  # none | italic | bold: the transform applied to the fine-tuning digits
    lora_steps: int = 300  # optimizer steps of the fine-tune
    lora_lr: float = 1e-2  # LoRA learning rate (AdamW, constant after warm-up); README, "Levers measured"
    lora_batch_size: int = 128  # global batch for the fine-tune
    # the fine-tune draws t from [lo*T, hi*T) instead of all T steps: a style such as a slant is decided
    # at middle noise, not in the last few steps (diffusers' --timestep_bias_strategy range does the same).
    # Empty (the default): the style's own range, STYLE_T_RANGE
    lora_t_range: tuple = field(default=(), metadata={"item": float, "help": "(default by style: " + "; ".join(
        f"{style} {lo:g},{hi:g}" for style, (lo, hi) in STYLE_T_RANGE.items()) + ")"})

    def __post_init__(self):
        self.targets = tuple(str(t) for t in self.targets)
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {self.r}; try --r 4")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("targets is empty; name at least one layer, e.g. --targets Wq,Wk,Wv")
        _choice(self, "style", ("none", "italic", "bold"))
        _positive(self, "lora_steps", "lora_batch_size")
        self.lora_t_range = tuple(float(v) for v in self.lora_t_range or STYLE_T_RANGE[self.style])
        if len(self.lora_t_range) != 2 or not 0 <= self.lora_t_range[0] < self.lora_t_range[1] <= 1:
            raise ValueError(f"lora_t_range must be two numbers lo,hi with 0 <= lo < hi <= 1, got {self.lora_t_range}")
        if self.lora_lr <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_lr must be > 0 and lora_dropout in [0, 1)")


def _positive(cfg, *names):
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ValueError(f"{n} must be > 0, got {getattr(cfg, n)}")


def _choice(cfg, name, allowed):
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}")


# Presets are differences from the dataclass defaults, keyed by dataclass.
PRESETS: dict[str, dict[type, dict]] = {
    "fast": {},
    "tutorial": {
        # the tutorial's UNet: one block per level at 48, 24, 12, 6, 3 pixels, each followed by a cross-attention
        # to the label (q, k, v 16 wide, one head, a feed-forward 32 wide), nine in all; 4 label tokens of 32
        ModelConfig: dict(img_size=48, patch_size=1, channels=(64, 128, 256, 512, 1024), attn_levels=(0, 1, 2, 3, 4),
                          num_heads=1, context_dim=32, time_dim=256, arch="tutorial", attn_dim=16, ff_dim=32,
                          pos_emb=False),
        DiffusionConfig: dict(min_snr_gamma=0.0),
        # DDPM's own optimiser (Adam 2e-4, warm-up, clipping 1.0, EMA 0.9999), not the tutorial's
        # Adam 1e-3, which collapses this model: the README's "Measured on a GPU" says how it was seen
        TrainConfig: dict(batch_size=400, lr=2e-4, max_steps=30000, warmup_steps=1000, min_lr_ratio=1.0,
                          ema_decay=0.9999, sample_every=10, save_every=10),  # a checkpoint is 0.54 GB here
        # the tutorial's rank 8 on its nine cross-attentions' Wq, Wk, Wv; alpha = r keeps this project's
        # alpha / r = 1 (the tutorial's alpha 1 scales the update by 1/8: --alpha 1)
        LoraConfig: dict(r=8, alpha=8.0, lora_batch_size=400, lora_steps=3000, lora_lr=1e-3, lora_t_range=(0.0, 1.0)),
    },
    "tiny": {
        ModelConfig: dict(channels=(8, 16), num_heads=2, context_tokens=2, context_dim=8,
                          time_dim=16),
        DiffusionConfig: dict(timesteps=50),
        TrainConfig: dict(max_steps=4, batch_size=16, warmup_steps=1, dataset="mnist-5k"),
        SampleConfig: dict(steps=5),
        LoraConfig: dict(lora_steps=4, lora_batch_size=16, r=2, alpha=2.0),
    },
}


# Settings added after checkpoints were first written, with the value every checkpoint saved before them was built
# with: a saved config that lacks the key means this value, not today's default.
SAVED_BEFORE: dict[type, dict] = {
    ModelConfig: {"pos_emb": False},
    LoraConfig: {"lora_t_range": (0.0, 1.0)},  # a fine-tune saved before --lora-t-range drew t from every step
}


def saved_value(cls, saved, name):
    """The value of field ``name`` in a checkpoint's saved ``cls`` settings (a dict), for fields it may lack."""
    defaults = {f.name: f.default for f in fields(cls)}
    return {**defaults, **SAVED_BEFORE.get(cls, {}), **saved}[name]


def from_saved(cls, saved):
    """``cls`` rebuilt from a checkpoint's saved settings, older checkpoints' missing keys read as SAVED_BEFORE."""
    return cls(**{**SAVED_BEFORE.get(cls, {}), **saved})


def preset_config(cls, preset="fast", **overrides):
    """An instance of ``cls`` with ``preset``'s values, then ``overrides``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return cls(**{**PRESETS[preset].get(cls, {}), **overrides})


def config_dict(*cfgs):
    """The plain dict stored in checkpoints: {"model": {...}, "diffusion": {...}, ...}."""
    key = {ModelConfig: "model", DiffusionConfig: "diffusion", TrainConfig: "train",
           SampleConfig: "sample", LoraConfig: "lora"}
    return {key[type(c)]: dataclasses.asdict(c) for c in cfgs}
