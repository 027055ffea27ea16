"""The page's model and adapters: sampling as denoise.py samples, adapters held side by side by name, a weight
sweep, the base against the adapters, and saving a grid. No Gradio here; app.py wires the page's widgets to it.

    studio = Studio("out/ckpt.pt", "out", ["~/adapters"], device=torch.device("cpu"))
    request = studio.request(labels=["3", "7"], n_per_label=2, seed=5)   # checked: one PageError line if wrong
    grid = studio.sample(request, {"italic": 0.5})   # denoise.py --labels 3,7 --n-per-label 2 --seed 5 --lora ..:0.5
    grid = studio.img2img(drawn, request, 0.6, {"italic": 1})   # denoise.py --init drawn.png --strength 0.6 ...

The Studio holds what every visitor shares: the model, loaded once, and the adapters attached to it. What one
visitor chose (the weights, the grid, the drawings) is passed in on every call and never kept here, so that
two visitors' weights never mix: each call sets every adapter's weight from its own ``weights`` (an adapter it
does not name is at 0) under the model's lock.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import math
import os
import queue
import re
import threading

import numpy as np
import torch

from adapter import adapter_name, apply_adapter, resolve_kohya_names
from adapter_formats import adapter_size, find_adapter_folders, load_adapter
from cli import LORA_TAG, lora_tag_spec
from pipeline import load_pipeline
from config import DEFAULT_OUT_DIR, SEED_MAX, WEIGHT_RANGE, SampleConfig, preset_config
from dataset import to_model_range, to_uint8
from diffusion import generate
from errors import UserError
from files import atomic_write, check_writable_dir
from lora import set_lora_weight
from pictures import (PAGE_SCALE, SETTINGS_KEY, annotate, label_columns, save_picture, settings_text, tile_grid,
                      weight_sweep_picture, write_samples_npz)
from styles import StyleDataError, preprocess_image, read_digit

SWEEP_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)  # the sweep's columns: the span the sliders show
MAX_IMAGES = 200  # samples one request may ask for (labels x per label): a minute of CPU at the default steps
MAX_PER_LABEL = 20
FAST_STEPS = 4  # the fast switch: a speed adapter's lcm steps (97.1% on the default base; experiments/speed_lora)
MAX_IMAGE_BYTES = 64 << 20  # an image to start from, as sent: denoise.py's --init bound
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
APP_DIR = "app"  # under --out-dir: saved grids, style data, fine-tunes and the page's upload cache
MAX_NUMBERED = 999  # a saved name taken: NAME-2 ... NAME-999, then a refusal


class PageError(UserError):
    """A request the page refuses: shown on the page in one line, the server keeps serving."""


# ------------------------------------------------------------------ paths and names

def inside(real, roots):
    """Whether the resolved path ``real`` is one of ``roots`` (resolved) or lies below one."""
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def safe_path(path, roots, base=None):
    """``path`` resolved (symlinks, ``..``) if it lies inside one of ``roots``, else a PageError.

    A relative path is taken from ``base`` (default: the first root). The check is on the real path,
    so a symlink inside a root that points out of it is refused like ``../`` or an absolute path."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise PageError(f"path {shown(path)} is empty or not a path; give a folder inside the page's folders")
    text = path.strip()
    real_roots = [os.path.realpath(r) for r in roots]
    real = os.path.realpath(text if os.path.isabs(text) else os.path.join(base or real_roots[0], text))
    if inside(real, real_roots):
        return real
    raise PageError(f"path {text!r} is outside the folders this page may use ({', '.join(real_roots)}); "
                    "pick a path inside one of them")


def check_adapter_files(folder, roots):
    """Every file and folder inside adapter ``folder``, links resolved, lies inside ``roots``; else a PageError
    naming the first that leaves them (a link to a file elsewhere would be read as if it were here)."""
    real_roots = [os.path.realpath(r) for r in roots]
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if not inside(os.path.realpath(p), real_roots):
                raise PageError(f"{p!r} links to {os.path.realpath(p)!r}, outside the page's folders; copy the "
                                "file in instead of linking it")
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def check_name(name, what="name"):
    if not isinstance(name, str) or not NAME_RE.match(name.strip()):
        raise PageError(f"{what} {shown(name)}: use 1 to 40 letters, digits, - or _ (no spaces, no slashes)")
    return name.strip()


# ------------------------------------------------------------------ what a request may ask

def shown(value):
    """``value`` as an error message quotes it: at most 60 characters (a request can send anything)."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return "a number too long to show"
    return text if len(text) <= 60 else text[:57] + "..."


def whole(value, what, lo, hi):
    """``value`` as an int if it is a whole number (an int, or a float such as 2.0) in lo..hi, else a PageError.

    Checked here, on what the page sent: a seed of 1.5 is refused, never rounded to 2."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise PageError(f"{what} must be a whole number, got {shown(value)}")
    if not lo <= value <= hi:
        raise PageError(f"{what} must be in {lo}..{hi}, got {shown(value)}")
    return int(value)


def number(value, what, lo, hi):
    """``value`` as a float if it is a finite number in lo..hi, else a PageError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:  # NaN fails too
        raise PageError(f"{what} must be a number from {lo:g} to {hi:g}, got {shown(value)}")
    return float(value)


def check_labels(labels, num_classes):
    """The labels ticked (strings "0".."9" from the page, or ints) as a tuple of ints; a PageError otherwise."""
    if not isinstance(labels, (list, tuple)):
        raise PageError(f"labels must be a list of digits, got {shown(labels)}")
    if not labels:
        raise PageError("pick at least one label")
    out = []
    for v in labels:
        if isinstance(v, str) and re.fullmatch(r"[0-9]{1,5}", v):
            v = int(v)
        if isinstance(v, str):
            raise PageError(f"labels must be digits in 0..{num_classes - 1}, got {shown(v)}")
        out.append(whole(v, "each label", 0, num_classes - 1))
    return tuple(out)


def digit_image(image):
    """An image to start from, as the page has it (a PIL image or an array from a drawing or an upload, or an image
    file's bytes), made MNIST-like exactly as --data's images are: uint8 (28, 28); a PageError otherwise."""
    if image is None:
        raise PageError("no image to start from: draw or upload a digit first")
    try:
        if isinstance(image, (bytes, bytearray)):
            if len(image) > MAX_IMAGE_BYTES:
                raise PageError(f"the image is over {MAX_IMAGE_BYTES >> 20} MB; send a smaller one")
            return torch.from_numpy(read_digit(io.BytesIO(bytes(image)), "the image")[0])
        if isinstance(image, np.ndarray) or hasattr(image, "getbands"):  # an array, or a PIL image
            return torch.from_numpy(preprocess_image(image, "the image"))
    except StyleDataError as e:
        raise PageError(str(e)) from None
    raise PageError(f"the image must be a picture or an image file's bytes, got {shown(image)}")


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """A checked request: which labels, how many of each, the seed, and the sampler's settings."""
    labels: tuple
    n_per_label: int
    seed: int
    cfg: SampleConfig

    def steps_run(self, timesteps):
        return timesteps if self.cfg.sampler == "ddpm" else self.cfg.steps  # ddpm: every step, as denoise.py


@dataclasses.dataclass
class AdapterEntry:
    """One adapter the page lists: its name in the model, where it is, what it is, or why it is not loaded."""
    name: str
    path: str
    style: str | None
    r: int
    size: int  # bytes of the shared files
    where: str  # the folder as the page shows it (relative to its root)
    problem: str | None = None  # set when it is listed but not attached (another base, unreadable)
    kind: str | None = None  # None: a style; "lcm": a speed adapter, the fast switch's (adapter.KINDS)

    def describe(self):
        what = f"speed adapter (the fast switch: lcm, {FAST_STEPS} steps)" if self.kind == "lcm" else \
            f"style {self.style or 'unknown'}"
        return f"{self.where}: {what}, rank {self.r}, {self.size / 1024:.0f} KB"


@dataclasses.dataclass
class Grid:
    """A sampled grid: the images as denoise.py's .npz holds them, the tiled picture, and what made it."""
    images: torch.Tensor  # uint8 (N, H, W), label by label, n_per_label each
    labels: torch.Tensor  # int64 (N,)
    picture: np.ndarray  # uint8 (rows, cols): denoise.py's samples.png, a column per label
    settings: dict
    display: np.ndarray  # uint8: the picture upscaled, with the labels above the columns


def weights_text(weights):
    return ", ".join(f"{k} {w:g}" for k, w in weights.items()) or "no adapter"


# ------------------------------------------------------------------ the studio

class Studio:
    """The model and its adapters, loaded once and shared by every request; sampling holds ``lock``, since an
    adapter's weight is state of the one model."""

    def __init__(self, ckpt, out_dir=DEFAULT_OUT_DIR, lora_dirs=(), *, device="cpu", precision="fp32", weights="ema",
                 preset="fast", seed=0, log=print):
        check_writable_dir(out_dir, "--out-dir")
        self.out_dir = os.path.realpath(out_dir)
        self.lora_dirs = [os.path.realpath(d) for d in lora_dirs]
        for d in self.lora_dirs:
            if not os.path.isdir(d):
                raise PageError(f"--lora-dir {d!r} is not a folder")
        self.roots = [self.out_dir, *self.lora_dirs]
        self.ckpt = os.path.realpath(ckpt)
        self.device, self.precision, self.weights, self.preset = device, precision, weights, preset
        self.seed = seed  # the page's first seed
        self.log = log
        self.lock = threading.RLock()
        self.pipe = load_pipeline(ckpt, device, weights)
        self.pipe.model.requires_grad_(False)
        os.makedirs(self.out_dir, exist_ok=True)
        self.adapters = {}  # name -> AdapterEntry, in the order found
        self._set = {}  # name -> the weight the model holds now (a cache: every call sets its own)
        self.scan_adapters()

    @property
    def model(self):
        return self.pipe.model

    @property
    def num_classes(self):
        return self.pipe.model.num_classes

    @property
    def timesteps(self):
        return self.pipe.diffusion.timesteps

    # --------------------------------------------------------- adapters

    def scan_adapters(self, skip=()):
        """Attach the adapters under --out-dir and --lora-dir not listed yet (``skip``: folders being written);
        one that cannot be attached is listed with its reason. Returns the new entries."""
        known = {e.path for e in self.adapters.values()}
        added = []
        for root in self.roots:
            for folder in find_adapter_folders(root, skip):
                if os.path.realpath(folder) not in known:
                    added.append(self.add_adapter(folder, keep_problem=True))
                    known.add(added[-1].path)
        return added

    def add_adapter(self, path, keep_problem=False):
        """Attach the adapter folder ``path`` (inside the page's folders, every file in it too) at weight 0.

        One that cannot be attached is a PageError and leaves nothing behind, unless ``keep_problem`` (a
        scan): then it is listed with its reason, so the page can say why it has no slider."""
        path = safe_path(path, self.roots)
        if any(e.path == path for e in self.adapters.values()):
            raise PageError(f"{path!r} is listed already")
        root = next(r for r in self.roots if inside(path, [r]))
        where = os.path.relpath(path, os.path.dirname(root))
        name = adapter_name(path, self.adapters)
        try:
            check_adapter_files(path, self.roots)
            ad = load_adapter(path)
            with self.lock:
                apply_adapter(self.model, resolve_kohya_names(ad, self.model), self.pipe.fingerprint, name=name,
                              weight=0.0, force_flag=None)
        except UserError as e:
            if not keep_problem:
                raise PageError(f"{where} is not loaded: {e}") from None
            self.log(f"app: {path} is listed but not loaded: {e}")
            entry = AdapterEntry(name, path, None, 0, 0, where, problem=str(e))
        else:
            entry = AdapterEntry(name, path, ad.style, int(ad.r), adapter_size(path), where, kind=ad.kind)
            self._set[name] = 0.0
        self.adapters[name] = entry
        return entry

    def usable(self):
        return [e for e in self.adapters.values() if e.problem is None]

    def speed_adapters(self):
        """The loaded adapters of kind lcm (distill.py), which the fast switch turns on and off."""
        return [e for e in self.usable() if e.kind == "lcm"]

    def speed_adapter(self):
        """The first loaded speed adapter, which the fast switch turns on; a PageError naming the fix when there is
        none."""
        speed = self.speed_adapters()
        if not speed:
            raise PageError("no speed adapter under the page's folders: distil one with `python lora_finetune.py "
                            "--distill lcm --out out/lcm` (about 4 minutes), then press Look for new adapters")
        return speed[0]

    def check_weights(self, weights):
        """{name: weight} checked: each a loaded adapter, each weight a number within config.WEIGHT_RANGE (the
        one range --lora PATH:WEIGHT has; the sliders show a narrower span). Returns it with floats."""
        if weights is None:
            return {}
        if not isinstance(weights, dict):
            raise PageError(f"weights must be a mapping of adapter names to numbers, got {shown(weights)}")
        out = {}
        for name, w in weights.items():
            entry = self.adapters.get(name) if isinstance(name, str) else None
            if entry is None or entry.problem is not None:
                raise PageError(f"no loaded adapter named {shown(name)}; refresh the page")
            out[name] = number(w, f"the weight of {name!r}", *WEIGHT_RANGE)
        return out

    def weights_from_tags(self, text):
        """{name: weight} from the <lora:NAME:WEIGHT> tags in ``text`` (as denoise.py --lora takes them, and as
        AUTOMATIC1111 users type them), NAME a listed adapter's name or its folder's; checked as check_weights."""
        if not isinstance(text, str):
            raise PageError(f"the adapters must be written as <lora:NAME:WEIGHT>, got {shown(text)}")
        weights = {}
        for match in LORA_TAG.finditer(text):
            try:
                spec = lora_tag_spec(match.group(0))
            except argparse.ArgumentTypeError as e:
                raise PageError(str(e)) from None
            entry = next((e for e in self.usable() if spec.name in (e.name, os.path.basename(e.path), e.where)), None)
            if entry is None:
                names = ", ".join(e.name for e in self.usable()) or "none"
                raise PageError(f"{spec.text}: no loaded adapter named {spec.name!r}; the adapters here: {names}")
            weights[entry.name] = spec.weight
        return self.check_weights(weights)

    def _apply(self, weights):
        """Every loaded adapter at its weight in ``weights`` (checked), 0 where it has none; under ``lock``."""
        for e in self.usable():
            w = weights.get(e.name, 0.0)
            if self._set[e.name] != w:
                set_lora_weight(self.model, w, e.name)
                self._set[e.name] = w

    # --------------------------------------------------------- sampling

    def request(self, labels=None, n_per_label=1, seed=0, sampler=None, steps=None, guidance=None):
        """A SampleRequest from what the page sent, every value checked as sent (types, whole numbers, ranges);
        the sampler's settings through SampleConfig, with its limits. None: the preset's default."""
        defaults = preset_config(SampleConfig, self.preset)
        labels = check_labels(list(range(self.num_classes)) if labels is None else labels, self.num_classes)
        n = whole(n_per_label, "samples per label", 1, MAX_PER_LABEL)
        if len(labels) * n > MAX_IMAGES:
            raise PageError(f"{n} x {len(labels)} labels is over {MAX_IMAGES} samples; ask for fewer")
        seed = whole(seed, "seed", 0, SEED_MAX)
        steps = whole(defaults.steps if steps is None else steps, "steps", 1, self.timesteps)
        guidance = defaults.guidance if guidance is None else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise PageError(f"guidance must be a number, got {shown(guidance)}")
        try:
            guidance = float(guidance)
        except OverflowError:  # an int past float's range: SampleConfig names the bound it breaks
            guidance = math.inf if guidance > 0 else -math.inf
        try:
            cfg = dataclasses.replace(defaults, sampler=defaults.sampler if sampler is None else sampler,
                                      steps=steps, guidance=guidance)
        except (ValueError, TypeError) as e:
            raise PageError(str(e)) from None
        return SampleRequest(labels, n, seed, cfg)

    def _generate(self, labels, req, callback=None, **img2img):
        images, _ = generate(self.model, self.pipe.diffusion, labels, device=self.device, precision=self.precision,
                             cfg=req.cfg, seed=req.seed, data_size=self.pipe.data_size, callback=callback, **img2img)
        return images

    def _settings(self, req, on):
        """What drew a grid of ``req`` with the adapters ``on`` ({name: weight}), kept beside its images."""
        return dict(labels=list(req.labels), n_per_label=req.n_per_label, seed=req.seed,
                    **dataclasses.asdict(req.cfg), weights=on, ckpt=self.ckpt, base_weights=self.weights,
                    precision=self.precision, adapters={k: self.adapters[k].path for k in on})

    def sample(self, req, weights=None, callback=None):
        """denoise.py's samples for ``req`` at ``weights`` ({name: weight}): its seeding, sampler call and layout."""
        weights = self.check_weights(weights)
        label_t = torch.tensor(req.labels).repeat_interleave(req.n_per_label)
        with self.lock:
            self._apply(weights)
            images = self._generate(label_t, req, callback)
        picture = label_columns(images, len(req.labels), req.n_per_label)
        on = {k: w for k, w in weights.items() if w != 0}
        info = self._settings(req, on)
        title = f"{req.cfg.sampler} {req.steps_run(self.timesteps)} steps, guidance {req.cfg.guidance:g}, " \
                f"seed {req.seed}" + (f", {weights_text(on)}" if on else "")
        return Grid(images, label_t.to(torch.int64), picture, info, annotate(picture, req.labels, title=title))

    def img2img(self, image, req, strength, weights=None, callback=None):
        """img2img (SDEdit, Meng et al. 2021) as ``denoise.py --init IMAGE --strength S`` draws it: ``image``
        (digit_image) noised to t = strength x T and denoised towards each label of ``req`` at ``weights``. Strength
        0 gives the preprocessed input back, 1 is ``sample(req, weights)``. The Grid's display shows the input
        (as the model sees it) left of the results."""
        init = digit_image(image)
        strength = number(strength, "strength", 0.0, 1.0)
        weights = self.check_weights(weights)
        label_t = torch.tensor(req.labels).repeat_interleave(req.n_per_label)
        with self.lock:
            self._apply(weights)
            images = self._generate(label_t, req, callback, init=to_model_range(init[None], self.model.cfg.img_size),
                                    strength=strength)
        picture = label_columns(images, len(req.labels), req.n_per_label)
        on = {k: w for k, w in weights.items() if w != 0}
        info = {**self._settings(req, on), "strength": strength}
        # the input, then a column per label; the input's column only in the first row
        rows = torch.full((req.n_per_label, 1 + len(req.labels), *init.shape), 0, dtype=torch.uint8)
        rows[0, 0] = init
        rows[:, 1:] = images.view(len(req.labels), req.n_per_label, *init.shape).transpose(0, 1)
        title = f"from the image at strength {strength:g}, {req.cfg.sampler} {req.steps_run(self.timesteps)} " \
                f"steps, seed {req.seed}" + (f", {weights_text(on)}" if on else "")
        display = annotate(tile_grid(rows.flatten(0, 1), nrow=1 + len(req.labels)).numpy(), ["in", *req.labels],
                           title=title)
        return Grid(images, label_t.to(torch.int64), picture, info, display)

    def preview_picture(self, x0, req):
        """The current x0 estimate (model range) as the grid will look."""
        images = to_uint8(x0, self.pipe.data_size)
        return annotate(label_columns(images, len(req.labels), req.n_per_label), req.labels)

    def sweep(self, req, name, weights=None):
        """Adapter ``name``'s weight across SWEEP_WEIGHTS (columns), a row per label, on the same noise; the other
        adapters at ``weights``. The last picture of iter_sweep."""
        for picture in self.iter_sweep(req, name, weights):
            pass
        return picture

    def iter_sweep(self, req, name, weights=None):
        """The sweep's picture after each of its columns: a column is a full sampling run, so the page shows
        each as it finishes rather than one picture at the end (seven runs)."""
        weights = self.check_weights(weights)
        if not isinstance(name, str) or name not in self.adapters or self.adapters[name].problem is not None:
            raise PageError(f"pick a loaded adapter to sweep (got {shown(name)})")
        labels = torch.tensor(sorted(set(req.labels)))
        cols = {}
        for w in SWEEP_WEIGHTS:
            with self.lock:  # one column at a time: another tab's grid may run between two
                self._apply({**weights, name: w})
                cols[w] = self._generate(labels, req)
            yield weight_sweep_picture(cols, labels.tolist(),
                                       f"{name}: its weight across the columns, a row per label "
                                       f"({len(cols)} of {len(SWEEP_WEIGHTS)})")

    def compare(self, req, weights=None):
        """The base (every adapter at 0) beside the adapters at ``weights``, on the same noise."""
        on = {k: w for k, w in self.check_weights(weights).items() if w != 0}
        if not on:
            raise PageError("every adapter is at weight 0: move a slider first")
        base, mixed = self.sample(req).picture, self.sample(req, on).picture
        left, right = annotate(base, req.labels, title="base"), annotate(mixed, req.labels, title=weights_text(on))
        gap = np.full((left.shape[0], 6 * PAGE_SCALE), 255, dtype=np.uint8)
        return np.concatenate([left, gap, right], 1)

    def png_settings(self, grid):
        """The PNG text denoise.py writes for the same grid (denoise.png_settings: its "parameters" line, a key
        each, and the JSON --from-png reads), from ``grid``'s settings: each adapter as PATH:WEIGHT, unmerged."""
        s = grid.settings
        lora = [f"{s['adapters'][k]}:{w:g}" for k, w in s["weights"].items()]
        sample = {f.name: s[f.name] for f in dataclasses.fields(SampleConfig)}
        steps = self.timesteps if s["sampler"] == "ddpm" else s["steps"]
        labels = ",".join(map(str, s["labels"]))
        shown = {"ckpt": s["ckpt"], "lora": " ".join(lora) or "none", "lora_weight": 1.0, "merged": False,
                 "labels": labels, "n_per_label": s["n_per_label"], "seed": s["seed"], "sampler": s["sampler"],
                 "steps": steps, "guidance": s["guidance"], "eta": s["eta"], "precision": s["precision"]}
        exact = {"ckpt": s["ckpt"], "weights": s["base_weights"], "lora": lora, "lora_weight": 1.0, "merge": False,
                 "force": False, "labels": labels, "n_per_label": s["n_per_label"], "seed": s["seed"],
                 "precision": s["precision"], "sample": {**sample, "guidance_interval": list(sample["guidance_interval"])},
                 "init": None, "strength": None}
        return {"parameters": ", ".join(f"{k}: {v}" for k, v in shown.items()), **shown,
                SETTINGS_KEY: settings_text(exact)}

    def save(self, grid, name):
        """The grid as the page shows it (labelled, PAGE_SCALE x) with denoise.py's settings as PNG text, and its
        .npz (with the settings), under out/app/. Never over a file: NAME taken, it is NAME-2, NAME-3, ..."""
        if not isinstance(grid, Grid):
            raise PageError("nothing to save yet: sample a grid first")
        name = check_name(name, "file name")
        folder = os.path.join(self.out_dir, APP_DIR)
        with self.lock:  # two tabs saving one name get two numbers
            for i in range(1, MAX_NUMBERED + 1):
                stem = name if i == 1 else f"{name}-{i}"
                png = safe_path(os.path.join(folder, f"{stem}.png"), [self.out_dir])
                npz = safe_path(os.path.join(folder, f"{stem}.npz"), [self.out_dir])
                if not os.path.lexists(png) and not os.path.lexists(npz):
                    break
            else:
                raise PageError(f"{name}.png to {name}-{MAX_NUMBERED}.png are all taken; choose another name")
            save_picture(grid.display, png, self.png_settings(grid))
            write_samples_npz(npz, grid.images.numpy(), grid.labels.numpy(), grid.settings)
        return png, npz


def iter_sample(studio, req, weights=None, every=None):
    """Yield (step, steps, picture) every ``every`` steps while sampling, then the finished Grid.

    Sampling runs in a thread that hands the x0 estimates over; closing the generator (the page went
    away) stops it at the next step."""
    weights = studio.check_weights(weights)  # refused here, before a thread starts
    total = req.steps_run(studio.timesteps)
    every = every or max(1, total // 10)
    q = queue.Queue()
    cancel = threading.Event()

    def callback(i, n, x0):
        if cancel.is_set():
            raise _Cancelled
        if (i + 1) % every == 0 and i + 1 < n:
            q.put(("step", i + 1, n, x0.detach().float().cpu()))

    def work():
        try:
            q.put(("done", studio.sample(req, weights, callback)))
        except _Cancelled:
            q.put(("cancelled",))
        except BaseException as e:  # noqa: BLE001 -- handed to the page's thread, which raises it there
            q.put(("error", e))

    threading.Thread(target=work, daemon=True, name="sample").start()
    try:
        while True:
            item = q.get()
            if item[0] == "step":
                yield item[1], item[2], studio.preview_picture(item[3], req)
            elif item[0] == "done":
                yield item[1]
                return
            elif item[0] == "error":
                raise item[1]
            else:
                return
    finally:
        cancel.set()


class _Cancelled(Exception):
    pass


def bench_entry(studio, repeats=3):
    """Seconds for the page's first grid (10 digits, the default sampler), a slider redraw, the weight sweep of the
    first style adapter, img2img of one digit at strength 0.6 and, with a speed adapter, a redraw with the fast
    switch on (medians of ``repeats``); app.py --bench.

    Not run by the tests' timing: the machine they share makes the numbers meaningless there."""
    import time

    def median(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    req = studio.request()
    out = {}
    t = time.perf_counter()
    grid = studio.sample(req)
    out["first_grid_s"] = time.perf_counter() - t
    usable = studio.usable()
    styles = [e for e in usable if e.kind != "lcm"] or usable
    slider = itertools.cycle((0.5, 0.75))  # a new weight each call, as a slider moved back and forth
    weights = (lambda: {styles[0].name: next(slider)}) if styles else (lambda: None)
    out["redraw_s"] = median(lambda: studio.sample(req, weights()))
    if styles:
        out["sweep_s"] = median(lambda: studio.sweep(req, styles[0].name))
    digit = grid.images[0].numpy()
    out["img2img_s"] = median(lambda: studio.img2img(digit, studio.request(labels=[3], n_per_label=1), 0.6, weights()))
    speed = studio.speed_adapters()
    if speed:  # the fast switch on, a style slider moving beside it (when there is one besides)
        fast = studio.request(sampler="lcm", steps=FAST_STEPS)
        style = styles[0] if styles[0].kind != "lcm" else None  # styles falls back to every adapter
        out["fast_redraw_s"] = median(lambda: studio.sample(fast, {speed[0].name: 1.0, **(
            {style.name: next(slider)} if style else {})}))
    out["adapters"] = len(usable)
    return out
