"""Configuration: one dataclass per concern, presets as differences from the default.

Every script builds its command line from these fields (``--batch-size``,
``--channels 32,64,128``, ``--ema-decay 0.999``), so a flag and its default can
never drift apart. ``--preset NAME`` applies a preset first; explicit flags win.

Each field is declared with ``setting(default, help, ge=.., le=.., choices=..)``: its one-line
reason (the flag's --help), its bounds and its choices, once, beside it. ``check_settings``
checks every field against them in ``__post_init__``, so a value out of range fails when the
settings are built, at start-up, before any work; a new field is covered by declaring it.

    fast      the default: sized for a laptop CPU (the README gives measured times)
    tutorial  the original tutorial's network (48x48, channels 64..1024, a small
              cross-attention in each of its nine blocks, T=1000, batch 400), with
              DDPM's optimiser (Adam 2e-4, clipping 1.0): for a GPU
    tiny      seconds, for tests
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

# ------------------------------------------------------------------ settings and their bounds

DEVICES = ("auto", "cpu", "cuda", "mps")  # auto tries cuda, then mps, then cpu
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATASETS = ("auto", "mnist", "mnist-5k", "fashion-mnist")  # dataset.py reads each (a test holds the two lists equal)
SEED_MAX = 2 ** 63 - 1  # torch's generators take 64-bit seeds; the scripts add small offsets to the seed
WIDTH_MAX = 4096  # the widest layer: the tutorial's widest level is 1024, and a 4096-wide level's weights alone
#                   pass a GB; a million, as a typo, was an allocation failure minutes into start-up
STEPS_MAX = 10 ** 9  # more optimizer steps than any run here could take
BATCH_MAX = 65536  # more images than MNIST's 60,000: a larger batch is always a typo
TIME_BUDGET_MAX = 7 * 24 * 60  # minutes: a week
# an adapter's weight (strength): 1 as trained, 0 off, negative pushes the other way; bounded so that a typo
# (1e308) is refused at start-up instead of overflowing the merged weights into black pictures
WEIGHT_RANGE = (-10.0, 10.0)


def setting(default, help, *, group=None, ge=None, gt=None, le=None, lt=None, choices=None, item=None, path=False,
            unit="", why="", hint="", label="", aliases=()):
    """A dataclass field with its one-line ``help`` and its bounds, declared once, beside the field.

    ``check_settings`` validates every field from these (in ``__post_init__``), and cli.py builds the flag,
    its help text, its choices and its group from them, so a new field is covered by declaring it here.
    ge/gt/le/lt bound a number (each item of a tuple); ``choices`` lists a string's values; ``path``: a
    path, never empty; ``unit`` names what the number counts ("a number of minutes"); ``why`` says why
    the upper bound is where it is, ``hint`` what to pass instead (both go into the error); ``item``:
    the type of a tuple's items when the default is empty; ``group``: the section of --help (default:
    the class's); ``label``: what an error calls the field when its name alone says too little; ``aliases``:
    other flags that set it (the name other tools use)."""
    meta = {"help": help, "group": group, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
            "item": item, "path": path, "unit": unit, "why": why, "hint": hint, "label": label,
            "aliases": tuple(aliases) or None}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None and v is not False
                                            and not (isinstance(v, str) and not v)})


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def range_text(meta, integer=False):
    """The bounds in ``meta`` as people write them: "1..4096", "[0, 1)", ">= 0"; "" when unbounded."""
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if integer:  # an integer above 0 is at least 1
        lo = lo and ("[", lo[1] if lo[0] == "[" else lo[1] + 1)
        hi = hi and ("]", hi[1] if hi[0] == "]" else hi[1] - 1)
    if lo and hi:
        if integer and lo[0] == "[" and hi[0] == "]":
            return f"{_fmt(lo[1])}..{_fmt(hi[1])}"
        return f"{lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return ""


def _broken_bound(v, meta):
    """The bound ``v`` breaks ("> 0", "<= 4096"), or None. Written as ``not (v >= lo)`` so that NaN breaks it."""
    for key, text, ok in (("gt", ">", lambda b: v > b), ("ge", ">=", lambda b: v >= b),
                          ("lt", "<", lambda b: v < b), ("le", "<=", lambda b: v <= b)):
        if key in meta and not ok(meta[key]):
            return f"{text} {_fmt(meta[key])}"
    return None


def _is(value, kind):
    """Whether ``value`` is a ``kind`` as a setting holds it: True is no number, 1 no truth value, 5 no name."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _wrong_type(f, value):
    """What field ``f`` must hold, in words, when ``value`` is not of its type (a TOML's ``pos_emb = "no"`` is a
    string, which Python would take as true); "" when it is. A tuple may come as a list (JSON has no tuples)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, tuple):
        kind = f.metadata.get("item") or (type(default[0]) if default else str)
        if not isinstance(value, (tuple, list)) or not all(_is(v, kind) for v in value):
            return f"a list of {_PLURAL_WORDS[kind]}"
        return ""
    if _is(value, type(default)):
        return ""
    if isinstance(default, str) and f.metadata.get("path"):
        return "a path (a string)"
    if isinstance(default, str) and "choices" in f.metadata:
        return f"one of {', '.join(f.metadata['choices'])} (a string)"
    return _TYPE_WORDS[type(default)]


def check_types(cfg):
    """Every field of ``cfg`` holds a value of its type: ValueError naming the first that does not."""
    for f in fields(cfg):
        wrong = _wrong_type(f, getattr(cfg, f.name))
        if wrong:
            raise ValueError(f"{f.name} must be {wrong}, got {getattr(cfg, f.name)!r}")


_PLURAL_WORDS = {bool: "true or false values", int: "integers", float: "numbers", str: "strings (names)"}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string (a name)"}


def check_settings(cfg):
    """Every field of the dataclass ``cfg`` against its declared choices, path rule and bounds (``setting``).

    Raises ValueError naming the field, the bound it breaks and the value; cli.py turns it into one line."""
    check_types(cfg)
    for f in fields(cfg):
        meta, value, name = f.metadata, getattr(cfg, f.name), f.name
        hint = f"; {meta['hint']}" if "hint" in meta else ""
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"unknown {name} {value!r}: {name} must be one of {', '.join(meta['choices'])}")
        if meta.get("path") and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{name} is an empty path; give a file or folder name{hint}")
        if not any(k in meta for k in ("ge", "gt", "le", "lt")):
            continue
        example = f.default[0] if isinstance(f.default, tuple) and f.default else f.default
        integer = meta.get("item", type(example)) is int
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
            broken = _broken_bound(v, meta)
            if broken is None:
                continue
            why = f"; {meta['why']}" if "why" in meta and broken[0] == "<" else ""
            what = f"each of {name}" if isinstance(value, tuple) else meta.get("label", name)
            shown = ",".join(map(_fmt, value)) if isinstance(value, tuple) else value
            unit = f"{meta['unit']} " if "unit" in meta else ""
            raise ValueError(f"{what} must be {unit}{broken}, got {shown}{why}{hint}")


@dataclass
class ModelConfig:
    img_size: int = setting(28, "side of the square image the UNet sees; data is resized to it", ge=4, le=512,
                            why="the attention at full resolution grows with the fourth power of the side")
    in_channels: int = setting(1, "image channels (MNIST is grey)", ge=1, le=4)
    patch_size: int = setting(2, "fold p x p pixels into channels before the UNet (28x28x1 -> 14x14x4 for p=2)",
                              ge=1, le=16)
    num_classes: int = setting(10, "labels 0..num_classes-1; index num_classes is the \"null\" label for guidance",
                               ge=1, le=10000)
    channels: tuple = setting((64, 128), "feature channels per UNet level; each level after the first halves the "
                              "resolution", gt=0, le=WIDTH_MAX,
                              why="wider levels do not fit in memory (the tutorial's widest is 1024)")
    num_res_blocks: int = setting(1, "residual blocks per level (more = deeper, slower)", ge=1, le=16)
    attn_levels: tuple = setting((1,), "levels (0-based) that get a transformer block; full resolution attention "
                                 "is costly", ge=0, le=15)
    num_heads: int = setting(4, "attention heads in every transformer block; must divide the width they split",
                             ge=1, le=WIDTH_MAX)
    context_tokens: int = setting(4, "tokens the label is embedded into; >=2 or the cross-attention softmax is "
                                  "constant and Wq/Wk never learn", ge=2, le=256,
                                  hint="with one key the cross-attention softmax is always 1 and Wq/Wk get zero "
                                  "gradient")
    context_dim: int = setting(64, "width of each label token (the \"text encoder\" output width in Stable "
                               "Diffusion)", ge=1, le=WIDTH_MAX, why="wider tokens do not fit in memory")
    time_dim: int = setting(128, "width of the time embedding MLP", ge=1, le=WIDTH_MAX,
                            why="wider embeddings do not fit in memory")
    dropout: float = setting(0.0, "dropout inside residual blocks", ge=0.0, lt=1.0)
    arch: str = setting("sd", "sd: Stable Diffusion's UNet | tutorial: the tutorial's (a small cross-attention "
                        "per block)", choices=("sd", "tutorial"))
    attn_dim: int = setting(0, "arch tutorial: width of Wq, Wk, Wv (the tutorial's 16); 0: the block's channels",
                            ge=0, le=WIDTH_MAX, why="wider layers do not fit in memory")
    ff_dim: int = setting(0, "arch tutorial: hidden width of the feed-forward after the cross-attention (the "
                          "tutorial's 32); 0: none", ge=0, le=WIDTH_MAX, why="wider layers do not fit in memory")
    # unet.position_code: without it attention, and a LoRA on Wq/Wk/Wv, cannot tell where a token sits (Stable
    # Diffusion has none; checkpoints saved before this setting existed have none: SAVED_BEFORE)
    pos_emb: bool = setting(True, "arch sd: add a fixed 2-D sine position code to every transformer block's "
                            "tokens (experiments/cpu_levers says what it changed)")

    def __post_init__(self):
        check_types(self)  # before the tuples are rebuilt: int("64") or int(64.7) would hide a wrong value
        self.channels = tuple(int(c) for c in self.channels)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        if not self.channels or min(self.channels) <= 0:
            raise ValueError(f"channels must be positive integers, got {self.channels}")
        check_settings(self)
        if self.arch == "sd" and (self.attn_dim or self.ff_dim):
            raise ValueError("attn_dim and ff_dim size the tutorial's cross-attention blocks; they need arch tutorial")
        downs = len(self.channels) - 1
        if self.img_size % (self.patch_size * 2 ** downs):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size * 2**{downs} "
                             f"for {len(self.channels)} UNet levels; pick another --img-size, --patch-size "
                             "or fewer --channels")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.channels)]
        if bad:
            raise ValueError(f"attn_levels {bad} out of range 0..{len(self.channels) - 1}")
        widths = [self.attn_dim or self.channels[a] for a in self.attn_levels]
        if any(w % self.num_heads for w in widths):
            what = "attn_dim" if self.attn_dim else "channels at attention levels"
            raise ValueError(f"{what} must be divisible by num_heads={self.num_heads}: each head takes an equal "
                             f"share of the width ({', '.join(map(str, widths))})")
        if self.arch == "tutorial" and self.pos_emb:
            raise ValueError("pos_emb adds a position code to the sd arch's transformer blocks; the tutorial arch "
                             "has none: pass --no-pos-emb (or --preset tutorial)")


@dataclass
class DiffusionConfig:
    timesteps: int = setting(1000, "T of Ho et al. 2020: noise levels of the forward process", ge=1, le=100000,
                             group="model")
    schedule: str = setting("linear", "linear (Ho et al. 2020; what a checkpoint without this field used) | cosine "
                            "(Nichol & Dhariwal 2021)", choices=("linear", "cosine"), group="model")
    beta_start: float = setting(1e-4, "linear schedule start, Ho et al. 2020", gt=0.0, lt=1.0, group="model")
    beta_end: float = setting(0.02, "linear schedule end, Ho et al. 2020", gt=0.0, lt=1.0, group="model")
    min_snr_gamma: float = setting(5.0, "Min-SNR loss weighting (Hang et al. 2023); 0 turns it off (plain MSE on "
                                   "the objective's output)", ge=0.0, le=1e4, group="training",
                                   why="above the largest SNR of any schedule here it changes nothing")
    # diffusion.OBJECTIVES; what a checkpoint without this field used: SAVED_BEFORE
    objective: str = setting("v", "what the network predicts: eps (the noise, Ho et al. 2020) | v (Salimans & Ho "
                             "2022) | edm (Karras et al. 2022's preconditioned denoiser)", choices=("eps", "v", "edm"),
                             group="model")
    t_sampling: str = setting("uniform", "the noise levels training draws: uniform over the T steps | lognormal "
                              "(EDM's log-normal sigma, snapped to the nearest step)", choices=("uniform", "lognormal"),
                              group="training")
    zero_terminal_snr: bool = setting(False, "rescale the schedule so its last step is pure noise (Lin et al. 2024); "
                                      "needs --objective v or edm", group="model")
    # diffusion.Diffusion.loss; experiments/time_to_quality/bounded_loss gives what it did here (the black
    # background: 28% of pixels exactly 0 without it, 76% with it); a checkpoint without it: SAVED_BEFORE
    bounded_loss: bool = setting(True, "forgive an estimate of x0 past the data's range where the data sits at "
                                 "its end (black background, full ink): every sampler clips it to exactly that; "
                                 "--no-bounded-loss: plain MSE", group="training")

    def __post_init__(self):
        check_settings(self)
        if not self.beta_start < self.beta_end:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.zero_terminal_snr and self.objective == "eps":
            raise ValueError("zero_terminal_snr needs objective v or edm: at the last step, pure noise, the noise "
                             "tells nothing of the image; pass --objective v")


@dataclass
class TrainConfig:
    dataset: str = setting("auto", "the training digits (auto: mnist when on disk or downloadable, else mnist-5k)",
                           choices=DATASETS, group="data")
    data_dir: str = setting("data", "where torchvision keeps downloads", path=True, group="data")
    out_dir: str = setting("out", "checkpoints and sample grids go here", path=True, group="output")
    # the steps and the batch, chosen for time to quality on a laptop CPU: experiments/time_to_quality/recipe
    max_steps: int = setting(700, "optimizer steps in all; an epoch is one pass over the data", gt=0, le=STEPS_MAX)
    # the steps chosen are printed and saved, so --max-steps N repeats the run exactly
    time_budget: float = setting(0.0, "minutes: instead of --max-steps, as many steps as fit, from a step timed "
                                 "here before the run; 0: off", ge=0.0, le=float(TIME_BUDGET_MAX),
                                 unit="a number of minutes", why="at most a week; for a longer run give --max-steps")
    batch_size: int = setting(64, "global batch (see --batch-scope)", gt=0, le=BATCH_MAX)
    batch_scope: str = setting("global", "under torchrun: hold the \"global\" batch fixed, or the \"per-rank\" "
                               "batch", choices=("global", "per-rank"))
    lr: float = setting(2e-3, "peak learning rate", gt=0.0, le=1e10,
                        why="far above 1 a run diverges at once (and stops, saying so); beyond, a typo")
    weight_decay: float = setting(0.0, "AdamW weight decay (each step shrinks weights by lr * weight_decay)",
                                  ge=0.0, le=1.0, why="above 1 the decay outweighs the gradient")
    warmup_steps: int = setting(100, "linear warm-up, then cosine decay (Loshchilov & Hutter 2017)", ge=0,
                                le=STEPS_MAX)
    min_lr_ratio: float = setting(0.1, "cosine decays to lr * min_lr_ratio", ge=0.0, le=1.0,
                                  why="above 1 the rate would rise as it decays")
    grad_clip: float = setting(1.0, "max gradient norm; 0 turns clipping off", ge=0.0, le=1e6)
    ema_decay: float = setting(0.999, "EMA of the weights, used for sampling (warmed up as (1+n)/(10+n))", ge=0.0,
                               lt=1.0)
    label_drop: float = setting(0.1, "share of labels replaced by the null label, for classifier-free guidance",
                                ge=0.0, lt=1.0)
    save_every: int = setting(1, "write the checkpoint every N epochs (always at the end and on Ctrl-C)", gt=0,
                              le=STEPS_MAX, group="output")
    sample_every: int = setting(1, "write a sample grid every N epochs (0: only at the end)", ge=0, le=STEPS_MAX,
                                group="output")
    snapshot_every: int = setting(0, "also keep OUT_DIR/ckpt_stepNNNNNN.pt every N epochs (for time-to-quality "
                                  "curves); 0 off", ge=0, le=STEPS_MAX, group="output")
    compile: bool = setting(False, "torch.compile the model (opt-in; see bench.py)", group="runtime")

    def __post_init__(self):
        check_settings(self)


@dataclass
class SampleConfig:
    # samplers.SAMPLERS; a test holds the two lists equal
    sampler: str = setting("dpmpp-2m", "ddim (Song et al. 2021) | dpmpp-2m (DPM-Solver++, Lu et al. 2022) | heun (EDM, "
                           "Karras et al. 2022; two evaluations a step) | ddpm (ancestral, Algorithm 2 of Ho et al. "
                           "2020) | lcm (multistep consistency, for a speed adapter: --lora out/lcm, 1-8 steps)",
                           choices=("ddim", "dpmpp-2m", "heun", "ddpm", "lcm"))
    steps: int = setting(10, "denoising steps (ddpm always uses all T)", gt=0, le=100000)
    eta: float = setting(0.0, "DDIM noise: 0 deterministic, 1 ~ DDPM", ge=0.0, le=1.0,
                         why="above 1 the noise added outgrows the schedule and the images go black")
    # 1.75 with guidance_parallel 0.5: on the default base 99.3%, distance 13.99, ink 0.137 (real 0.135); plain
    # guidance 1.5 drew 99.1%, 12.80, ink 0.149, and plain 2 99.7%, 16.34, 0.156
    # (experiments/time_to_quality/projected_guidance)
    guidance: float = setting(1.75, "classifier-free guidance w (Ho & Salimans 2022): eps_c + w*(eps_c - eps_u); "
                              "0 = off; with --sampler lcm the speed adapter's input w instead (no second pass)", ge=0.0,
                              le=100.0, why="far above 10 every pixel saturates to 0 or 255")
    # Sadat et al. 2024 (adaptive projected guidance), diffusion.project_guidance; the tutorial's is 1
    guidance_parallel: float = setting(0.5, "the share of guidance's push along the conditional digit itself that is "
                                       "kept: that part draws the same strokes heavier, the rest changes their shape; "
                                       "1 = plain classifier-free guidance, 0 drops it", ge=0.0, le=1.0,
                                       why="above 1 guidance thickens the strokes more than plain guidance does")
    # Kynkaanniemi et al. 2024; experiments/sampler_guidance gives what it did here (it cost accuracy)
    guidance_interval: tuple = setting((0.0, 1.0), "guide only the steps with lo <= t/T <= hi; the steps outside "
                                       "it run the conditional half alone", ge=0.0, le=1.0)
    # Saharia et al. 2022 (Imagen), sec. 2.3; experiments/time_to_quality/levers_500 gives what it did here
    threshold: float = setting(0.0, "dynamic thresholding: each step's estimate x0 is clipped to s, the p-th quantile "
                               "of its |pixels| (at least 1), and divided by s; 0 = off (static clipping to [-1, 1]), "
                               "Imagen's p is 0.995", ge=0.0, lt=1.0, why="p = 1 would take the largest pixel")

    def __post_init__(self):
        check_types(self)
        self.guidance_interval = tuple(float(v) for v in self.guidance_interval)
        check_settings(self)
        if len(self.guidance_interval) != 2 or not self.guidance_interval[0] <= self.guidance_interval[1]:
            raise ValueError(f"guidance_interval must be two numbers lo,hi with 0 <= lo <= hi <= 1, "
                             f"got {self.guidance_interval}")


@dataclass
class RuntimeConfig:
    """Where and how a script runs, and its seed: the same three flags in every script (cli.add_runtime_args)."""
    device: str = setting("auto", "where to run: auto tries cuda, then mps, then cpu", choices=DEVICES)
    precision: str = setting("auto", "mixed precision of the forward pass; auto: on a CPU bf16 where it is done in "
                             "hardware (AMX/AVX512-BF16), else fp32; on CUDA bf16 (fp16 without bf16), or for "
                             "training the faster of bf16 and fp32 on this model, timed first", choices=PRECISIONS)
    seed: int = setting(0, "seeds weights, data order and noise: the same seed, the same run", ge=0, le=SEED_MAX,
                        why="torch's generators take 64-bit seeds")

    def __post_init__(self):
        check_settings(self)


# The fine-tune's default t range for each style (fractions of T). A slant is decided at middle noise, and
# the least noisy steps added no slant, only distance to real italic digits; a bold adapter never trained at
# those steps speckles its strokes there. The figures: experiments/lora_studies/notes.md (the t-range rows)
STYLE_T_RANGE = {"italic": (0.2, 0.8), "none": (0.2, 0.8), "bold": (0.0, 0.8),
                 # a user's own digits (--data, font:NAME) can change anything from the layout (decided at high
                 # noise) to the stroke (low noise, as bold showed); not measured here, so every step, as DreamBooth
                 "font:/data:": (0.0, 1.0)}
STYLES = ("none", "italic", "bold")  # dataset.apply_style's transforms of MNIST; font:NAME and --data are the others


R_MAX = WIDTH_MAX  # the LoRA rank r: no layer is wider, so a larger r adds nothing (and in a file it is damage)


def valid_r(value):
    """``value`` when it is a LoRA rank r, a whole number from 1 to R_MAX (True and 2.7 are not), else None: the
    one check of r, for the flags (through LoraConfig's bounds), the layers (lora.py) and the files."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= R_MAX:
        return None
    return value


@dataclass
class LoraConfig:
    r: int = setting(4, "rank of the update A.B", gt=0, le=R_MAX, hint="try --r 4", label="LoRA rank r",
                     aliases=("--rank",))
    alpha: float = setting(4.0, "the update is scaled by alpha / r", gt=0.0, le=1e4,
                           why="alpha / r far above 1 swamps the base model (alpha = r is the usual choice)")
    # a group resolves to module names when the layers are added (lora.resolve_targets), and the adapter file
    # records those names (PEFT's target_modules)
    targets: tuple = setting(("Wq", "Wk", "Wv"), "the layers to adapt: their names (Wq, or a whole dotted name) or a "
                             "group: attn (Wq,Wk,Wv), attn-all (+ Wo and the feed-forward), all (every Linear and "
                             "Conv2d of the blocks)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA path only", ge=0.0, lt=1.0)
    style: str = setting("italic", f"the fine-tuning digits: {', '.join(STYLES)} (transforms of MNIST), or "
                         "font:NAME (a font's digits, e.g. font:DejaVu Serif Bold; an unknown NAME lists them)")
    lora_steps: int = setting(300, "optimizer steps of the fine-tune; with --data or a font and no --lora-steps, "
                              "sized to the set: 300 for up to 200 images, more in proportion, at most 1.5 times",
                              gt=0, le=STEPS_MAX)
    lora_lr: float = setting(1e-2, "LoRA learning rate (AdamW, constant after warm-up); experiments/lora_studies",
                             gt=0.0, le=1e10, why="far above 1 a run diverges at once (and stops, saying so); "
                             "beyond, a typo")
    lora_batch_size: int = setting(128, "global batch for the fine-tune", gt=0, le=BATCH_MAX)
    # a style such as a slant is decided at middle noise, not in the last few steps (diffusers'
    # --timestep_bias_strategy range does the same)
    lora_t_range: tuple = setting((), "the fine-tune draws t from [lo*T, hi*T) instead of all T steps "
                                  "(default by style: " + "; ".join(f"{style} {lo:g},{hi:g}" for style, (lo, hi)
                                                                    in STYLE_T_RANGE.items()) + ")",
                                  item=float, ge=0.0, le=1.0)
    # own style data (styles.py): a folder or an .npz of the user's digits, made MNIST-like, instead of --style
    data: str = setting("", "a folder of 0..9 subfolders of images, or of images named by their digit (7_a.png; "
                        "any format, size, mode), or an .npz (images uint8 N x 28 x 28, labels): the fine-tune's "
                        "digits instead of --style's (default: none, --style's)", group="data")
    # off by default, as kohya's --flip_aug/--color_aug and diffusers' --random_flip are: on a typeface's digits
    # every variant tried lost style share and distance (experiments/own_style/notes.md, "What changed"); the
    # digits are centred by their mass, and a shifted or turned copy teaches the model to draw them off centre
    augment: str = setting("off", "small shifts, rotations and scalings of --data's or a font's digits (never "
                           "flips); auto: on for fewer than 1000 images", choices=("auto", "on", "off"), group="data")
    prior_weight: float = setting(1.0, "loss weight of real digits of the labels --data lacks, so that they stay "
                                  "as they were (DreamBooth's prior preservation); 0 turns it off", ge=0.0, le=4.0,
                                  why="a prior four times the style's own data drowns the style", group="data")

    def __post_init__(self):
        self.targets = tuple(str(t) for t in self.targets)
        if not self.targets:
            raise ValueError("targets is empty; name at least one layer, e.g. --targets Wq,Wk,Wv")
        check_settings(self)
        # font:NAME, and data:NAME, the name --data's digits are recorded under (styles.StyleData.name)
        own = bool(self.data) or self.style.startswith(("font:", "data:"))
        if not own and self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}: style must be one of {', '.join(STYLES)} or font:NAME")
        if self.style.startswith("data:") and not self.data:
            raise ValueError(f"style {self.style!r} is what --data records; pass --data FOLDER (or FILE.npz)")
        if self.data and self.style.startswith("font:"):
            raise ValueError(f"--data and --style {self.style} both give the fine-tune's digits; pass one")
        self.lora_t_range = tuple(float(v) for v in self.lora_t_range or STYLE_T_RANGE["font:/data:" if own
                                                                                        else self.style])
        if len(self.lora_t_range) != 2 or not 0 <= self.lora_t_range[0] < self.lora_t_range[1] <= 1:
            raise ValueError(f"lora_t_range must be two numbers lo,hi with 0 <= lo < hi <= 1, got {self.lora_t_range}")


@dataclass
class DistillConfig:
    """lora_finetune.py --distill lcm: a speed adapter by latent consistency distillation (distill.py, Luo et al.
    2023); its rank, targets and rate are LoraConfig's, its steps and batch its own (a step costs about five of
    the fine-tune's network passes)."""
    # 300 of 128, 2.2 times the work, drew about as well (97.4% against 97.1% at lcm-4; experiments/speed_lora)
    distill_steps: int = setting(240, "optimizer steps of the distillation (about 4 minutes of a 2-core laptop in "
                                 "fp32 at batch 64)", gt=0, le=STEPS_MAX)
    distill_batch_size: int = setting(64, "global batch of the distillation", gt=0, le=BATCH_MAX)
    # LCM draws w from [w_min, w_max] around the guidance it samples at (ours: SampleConfig.guidance, 1.75). The
    # adapter reads its input w only loosely and draws as guided as its teacher was on average: lcm-4 at w 1.75,
    # 1..3 drew 97.7 / 97.7 / 96.8% (3 seeds), 1..5 98.1 / 98.0 / 98.5%, 1..7 98.3 / 97.5% (experiments/speed_lora)
    distill_w: tuple = setting((1.0, 5.0), "the teacher's guidance w is drawn from lo,hi; the adapter takes w as an "
                               "input (--guidance when sampling with --sampler lcm)", item=float, ge=0.0, le=20.0)
    # plain, LCM's teacher: projected at 0.5, as the default sampler, drew thinner digits (lcm-4 97.4% against 97.7%)
    distill_guidance_parallel: float = setting(1.0, "the teacher's guidance projected as the sampler's "
                                               "--guidance-parallel (1 = plain classifier-free guidance)", ge=0.0,
                                               le=1.0)
    distill_ema: float = setting(0.95, "EMA decay of the target network's adapter tensors (LCM's 0.95)", ge=0.0,
                                 lt=1.0)
    distill_loss: str = setting("huber", "the consistency loss: huber (pseudo-Huber, LCM's) or l2",
                                choices=("huber", "l2"))
    distill_huber_c: float = setting(1e-3, "pseudo-Huber's c: sqrt(d^2 + c^2) - c, quadratic below c", gt=0.0,
                                     le=1.0)

    def __post_init__(self):
        self.distill_w = tuple(float(v) for v in self.distill_w)
        check_settings(self)
        if len(self.distill_w) != 2 or not self.distill_w[0] <= self.distill_w[1]:
            raise ValueError(f"distill_w must be two numbers lo,hi with lo <= hi, got {self.distill_w}")


# Presets are differences from the dataclass defaults, keyed by dataclass.
PRESETS: dict[str, dict[type, dict]] = {
    "fast": {},
    "tutorial": {
        # the tutorial's UNet: one block per level at 48, 24, 12, 6, 3 pixels, each followed by a cross-attention
        # to the label (q, k, v 16 wide, one head, a feed-forward 32 wide), nine in all; 4 label tokens of 32
        ModelConfig: dict(img_size=48, patch_size=1, channels=(64, 128, 256, 512, 1024), attn_levels=(0, 1, 2, 3, 4),
                          num_heads=1, context_dim=32, time_dim=256, arch="tutorial", attn_dim=16, ff_dim=32,
                          pos_emb=False),
        # the tutorial predicts the noise with a plain MSE and samples with DDIM-50
        DiffusionConfig: dict(min_snr_gamma=0.0, objective="eps", bounded_loss=False),
        SampleConfig: dict(sampler="ddim", steps=50, guidance_parallel=1.0),
        # DDPM's own optimiser (Adam 2e-4, warm-up, clipping 1.0, EMA 0.9999), not the tutorial's
        # Adam 1e-3, which collapses this model: experiments/tutorial_gpu says how it was seen
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
        DistillConfig: dict(distill_steps=4, distill_batch_size=16),
    },
}


# Settings added after checkpoints were first written, with the value every checkpoint saved before them was built
# with: a saved config that lacks the key means this value, not today's default.
SAVED_BEFORE: dict[type, dict] = {
    ModelConfig: {"pos_emb": False},
    DiffusionConfig: {"objective": "eps", "t_sampling": "uniform", "zero_terminal_snr": False, "bounded_loss": False},
    LoraConfig: {"lora_t_range": (0.0, 1.0)},  # a fine-tune saved before --lora-t-range drew t from every step
    SampleConfig: {"guidance_parallel": 1.0},  # a PNG's settings from before: plain guidance drew it
}


# Settings that moved out of a class into RuntimeConfig: a TrainConfig saved before the move holds them.
MOVED_TO_RUNTIME: dict[type, tuple] = {TrainConfig: ("device", "precision", "seed")}


def saved_value(cls, saved, name):
    """The value of field ``name`` in a checkpoint's saved ``cls`` settings (a dict), for fields it may lack."""
    defaults = {f.name: f.default for f in fields(cls)}
    return {**defaults, **SAVED_BEFORE.get(cls, {}), **saved}[name]


def from_saved(cls, saved):
    """``cls`` rebuilt from a checkpoint's saved settings, older checkpoints' missing keys read as SAVED_BEFORE
    and keys since moved to RuntimeConfig left out."""
    moved = MOVED_TO_RUNTIME.get(cls, ())
    return cls(**{**SAVED_BEFORE.get(cls, {}), **{k: v for k, v in saved.items() if k not in moved}})


def saved_runtime(runtime=None, train=None):
    """The saved RuntimeConfig settings (a dict): ``runtime`` where it was saved, else the keys a TrainConfig
    saved before RuntimeConfig existed holds (``train``); RuntimeConfig's defaults for any missing."""
    if runtime is not None:
        return dict(runtime)
    return {k: train[k] for k in MOVED_TO_RUNTIME[TrainConfig] if k in (train or {})}


def preset_config(cls, preset="fast", **overrides):
    """An instance of ``cls`` with ``preset``'s values, then ``overrides``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return cls(**{**PRESETS[preset].get(cls, {}), **overrides})


# each class's section in a checkpoint's config, in config.json and in a --config file
SECTIONS: dict[type, str] = {ModelConfig: "model", DiffusionConfig: "diffusion", TrainConfig: "train",
                             SampleConfig: "sample", LoraConfig: "lora", RuntimeConfig: "runtime",
                             DistillConfig: "distill"}


def config_dict(*cfgs):
    """The plain dict stored in checkpoints: {"model": {...}, "diffusion": {...}, ...}."""
    return {SECTIONS[type(c)]: dataclasses.asdict(c) for c in cfgs}


# default paths: each spelled once, here; train.py writes DEFAULT_CKPT, the later stages read it
DEFAULT_OUT_DIR = TrainConfig.out_dir  # train.py --out-dir, and the folder every other output goes under
DEFAULT_DATA_DIR = TrainConfig.data_dir  # where torchvision keeps MNIST (and evaluate.py its classifier)
CKPT_NAME = "ckpt.pt"  # the checkpoint train.py writes in its --out-dir
DEFAULT_CKPT = f"{DEFAULT_OUT_DIR}/{CKPT_NAME}"  # the base every later stage reads by default
DEFAULT_ADAPTER = f"{DEFAULT_OUT_DIR}/lora"  # the adapter folder lora_finetune.py writes, denoise.py --lora reads
