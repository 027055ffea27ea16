"""A local web page to play with the model: sample digits, mix adapters, fine-tune an adapter on your own digits.

    python app.py                                   # http://127.0.0.1:7860: out/ckpt.pt and every adapter under out/
    python app.py --lora-dir ~/adapters --port 7861 # also list the adapters in another folder
    python app.py --host 0.0.0.0                    # reachable from other machines (loopback only by default)

Three parts, on one page (Gradio, served from this machine; nothing is fetched from the internet):
    Sample        labels, samples per label, seed, sampler, steps, guidance: the grid shows the current x0 estimate
                  as it denoises, then the final grid, the same one `denoise.py` gives for the same settings and
                  seed (a column per label); "Save" writes its .png and .npz (with the settings) under --out-dir
    Adapters      every adapter under --out-dir and --lora-dir, each with a weight slider (-1..2) and its style,
                  rank and size; several at once, as `denoise.py --lora A:w --lora B:w`; a weight sweep of one
                  adapter, and the base against the adapters on the same noise
    Your style    images or a zip labelled by folder or file name (7/a.png, 7_a.png), or digits drawn on the
                  page; shows what the model will train on, then runs `lora_finetune.py --data` in the
                  background (one at a time), with its progress, and lists the new adapter when it is done

The model and the adapters are loaded once; a slider only changes a weight. The page reads and writes only
under --out-dir and the --lora-dir folders.
"""

import atexit
import dataclasses
import io
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import torch

from adapter import WEIGHTS_NAME, adapter_size, apply_adapter, load_adapter, resolve_kohya_names
from checkpoint import load_pipeline
from cli import ArgumentParser, add_preset_arg, add_runtime_args, bounded, path_arg, runtime_from_args
from config import DEFAULT_CKPT, DEFAULT_OUT_DIR, SEED_MAX, LoraConfig, SampleConfig, preset_config
from dataset import tile_grid, to_uint8
from diffusion import generate
from errors import UserError, run_main
from files import atomic_write, check_writable_dir
from lora import set_lora_weight
from runtime import pick_device, resolve_precision

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PORT = 7860
WEIGHT_MIN, WEIGHT_MAX = -1.0, 2.0  # the sliders' range: below 0 the adapter's style is reversed
SWEEP_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
MAX_SLOTS = 12  # weight sliders on the page; adapters beyond these are listed but have none
MAX_IMAGES = 200  # samples one request may ask for (labels x per label)
MAX_PER_LABEL = 20
MAX_GUIDANCE = 20.0
UPSCALE = 4  # 28-pixel digits shown 4x, nearest-neighbour (pictures are for people)
# uploads: a page on the user's own machine, but a file dropped on it can still be anything
MAX_UPLOAD_FILES = 2000  # images in one fine-tune (files, or entries of a zip)
MAX_FILE_BYTES = 5 * 2**20  # one image
MAX_UPLOAD_BYTES = 100 * 2**20  # everything uploaded at once, zips unpacked
MAX_IMAGE_SIDE = 4096
MIN_TRAIN_IMAGES = 4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
APP_DIR = "app"  # under --out-dir: saved grids, style data, fine-tunes and the page's upload cache


class PageError(UserError):
    """A request the page refuses: shown on the page in one line, the server keeps serving."""


# ------------------------------------------------------------------ paths

def safe_path(path, roots, base=None):
    """``path`` resolved (symlinks, ``..``) if it lies inside one of ``roots``, else a PageError.

    A relative path is taken from ``base`` (default: the first root). The check is on the real path,
    so a symlink inside a root that points out of it is refused like ``../`` or an absolute path."""
    text = str(path).strip()
    if not text or "\x00" in text:
        raise PageError(f"path {text!r} is empty or not a path")
    real_roots = [os.path.realpath(r) for r in roots]
    full = text if os.path.isabs(text) else os.path.join(base or real_roots[0], text)
    real = os.path.realpath(full)
    for root in real_roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    raise PageError(f"path {text!r} is outside the folders this page may use ({', '.join(real_roots)}); "
                    "pick a path inside one of them")


def check_name(name, what="name"):
    if not isinstance(name, str) or not NAME_RE.match(name.strip()):
        raise PageError(f"{what} {name!r}: use 1 to 40 letters, digits, - or _ (no spaces, no slashes)")
    return name.strip()


# ------------------------------------------------------------------ adapters

@dataclasses.dataclass
class AdapterEntry:
    """One adapter the page lists: where it is, what it is, its weight now, or why it is not loaded."""
    name: str  # the name it is held by in the model
    path: str
    style: str | None
    r: int
    size: int  # bytes of the shared files
    weight: float = 0.0
    problem: str | None = None  # set when it is listed but not attached (another base, unreadable)

    def describe(self):
        style = self.style or "unknown style"
        return f"style {style}, rank {self.r}, {self.size / 1024:.0f} KB"


def find_adapter_folders(root, skip=()):
    """Folders under ``root`` holding an adapter (adapter_model.safetensors), hidden folders and ``skip`` left out.

    Symlinked folders are not followed: a link inside a root can point anywhere."""
    found = []
    root = os.path.realpath(root)
    skip = {os.path.realpath(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        if dirpath.count(os.sep) - root.count(os.sep) >= 4:
            dirnames[:] = []
        if WEIGHTS_NAME in filenames and os.path.realpath(dirpath) not in skip:
            found.append(dirpath)
    return found


# ------------------------------------------------------------------ samples

@dataclasses.dataclass
class SampleSettings:
    labels: tuple = tuple(range(10))
    n_per_label: int = 1
    seed: int = 0
    sampler: str = SampleConfig.sampler
    steps: int = SampleConfig.steps
    guidance: float = SampleConfig.guidance

    def config(self):
        return dataclasses.replace(SampleConfig(), sampler=self.sampler, steps=self.steps, guidance=self.guidance)


@dataclasses.dataclass
class Grid:
    """A sampled grid: the images as denoise.py's .npz holds them, the tiled picture, and what made it."""
    images: torch.Tensor  # uint8 (N, H, W), label by label, n_per_label each
    labels: torch.Tensor  # int64 (N,)
    picture: np.ndarray  # uint8 (rows, cols): denoise.py's samples.png, a column per label
    settings: dict
    display: np.ndarray  # uint8: the picture upscaled, with the labels above the columns


def label_columns(images, num_labels, n_per_label):
    """denoise.py's layout: one column per label, ``n_per_label`` rows, as one uint8 picture."""
    order = torch.arange(len(images)).view(num_labels, n_per_label).T.flatten()
    return tile_grid(images[order], nrow=num_labels).numpy()


def annotate(picture, col_titles=(), row_titles=(), cell=30, pad=2, title=None):
    """The picture upscaled UPSCALE x with a label above each column and left of each row."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(picture).resize((picture.shape[1] * UPSCALE, picture.shape[0] * UPSCALE), Image.NEAREST)
    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: its small bitmap font
        font = ImageFont.load_default()
    top = 22 * (bool(col_titles) + bool(title))
    left = 36 if row_titles else 0
    width = img.width + left
    if title:  # a grid of one label is narrower than its title: widen the white margin, not the grid
        width = max(width, left + 8 + int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(title, font=font)))
    out = Image.new("L", (width, img.height + top), 255)
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((left + 4, 3), title, fill=0, font=font)
    step = (cell + pad) * UPSCALE
    for i, text in enumerate(col_titles):
        draw.text((left + pad * UPSCALE + i * step + 4, top - 19), str(text), fill=0, font=font)
    for i, text in enumerate(row_titles):
        draw.text((4, top + pad * UPSCALE + i * step + step // 3), str(text), fill=0, font=font)
    return np.asarray(out)


class Studio:
    """The model, its adapters and the fine-tune in progress, loaded once and shared by every request.

    Sampling and weight changes hold ``lock``: the adapters' weights are state of the one model."""

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
        self.finetune_precision = precision
        self.log = log
        self.lock = threading.RLock()
        self.pipe = load_pipeline(ckpt, device, weights)
        self.pipe.model.requires_grad_(False)
        os.makedirs(self.out_dir, exist_ok=True)
        self.adapters = {}  # name -> AdapterEntry, in the order found
        self.job = None  # the fine-tune in progress or last finished (FineTune)
        self.scan_adapters()

    @property
    def model(self):
        return self.pipe.model

    @property
    def num_classes(self):
        return self.pipe.model.num_classes

    # --------------------------------------------------------- adapters

    def scan_adapters(self):
        """Load the adapters not loaded yet from --out-dir and --lora-dir, attached at weight 0."""
        skip = [self.job.out] if self.job is not None and self.job.running() else []
        known = {e.path for e in self.adapters.values()}
        added = []
        for root in self.roots:
            for folder in find_adapter_folders(root, skip):
                if folder not in known:
                    added.append(self.add_adapter(folder))
                    known.add(folder)
        return added

    def _unique_name(self, path):
        rel = os.path.relpath(path, self.out_dir) if path.startswith(self.out_dir + os.sep) else os.path.basename(path)
        name = base = rel.replace(os.sep, "/").replace(".", "_")  # a module name holds no dot
        i = 2
        while name in self.adapters:
            name, i = f"{base}#{i}", i + 1
        return name

    def add_adapter(self, path):
        path = safe_path(path, self.roots)
        name = self._unique_name(path)
        try:
            ad = load_adapter(path)
            entry = AdapterEntry(name, path, ad.style, int(ad.r), adapter_size(path))
        except UserError as e:
            entry = AdapterEntry(name, path, None, 0, 0, problem=str(e))
            self.log(f"app: {path} is listed but not loaded: {e}")
            self.adapters[name] = entry
            return entry
        with self.lock:
            try:
                apply_adapter(self.model, resolve_kohya_names(ad, self.model), self.pipe.fingerprint, name=name,
                              weight=0.0, force_flag=None)
            except UserError as e:
                entry.problem = str(e)
        if entry.problem:
            self.log(f"app: {path} is listed but not loaded: {entry.problem}")
        self.adapters[name] = entry
        return entry

    def usable(self):
        return [e for e in self.adapters.values() if e.problem is None]

    def apply_weights(self, weights):
        """Set each named adapter's weight (others keep theirs); returns {name: weight} of every usable adapter."""
        weights = dict(weights or {})
        for name, w in weights.items():
            entry = self.adapters.get(name)
            if entry is None or entry.problem is not None:
                raise PageError(f"no loaded adapter named {name!r}; refresh the page")
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise PageError(f"weight of {name!r} is not a number: {w!r}") from None
            if not (math.isfinite(w) and WEIGHT_MIN <= w <= WEIGHT_MAX):
                raise PageError(f"weight of {name!r} must be in {WEIGHT_MIN:g}..{WEIGHT_MAX:g}, got {w}")
            weights[name] = w
        with self.lock:
            for name, w in weights.items():
                if self.adapters[name].weight != w:
                    set_lora_weight(self.model, w, name)
                    self.adapters[name].weight = w
            return {e.name: e.weight for e in self.usable()}

    # --------------------------------------------------------- sampling

    def check_settings(self, s):
        try:
            labels = tuple(int(v) for v in s.labels)
            n, seed, steps = int(s.n_per_label), int(s.seed), int(s.steps)
            guidance = float(s.guidance)
        except (TypeError, ValueError):
            raise PageError("labels, samples per label, seed and steps must be whole numbers, guidance a number") \
                from None
        if any(v != float(x) for v, x in ((n, s.n_per_label), (seed, s.seed), (steps, s.steps))):
            raise PageError("samples per label, seed and steps must be whole numbers")
        if not labels:
            raise PageError("pick at least one label")
        bad = [v for v in labels if not 0 <= v < self.num_classes]
        if bad:
            raise PageError(f"labels must be in 0..{self.num_classes - 1}, got {bad}")
        if not 1 <= n <= MAX_PER_LABEL or len(labels) * n > MAX_IMAGES:
            raise PageError(f"samples per label must be in 1..{MAX_PER_LABEL} and at most {MAX_IMAGES} in all, "
                            f"got {n} x {len(labels)}")
        if not 0 <= seed <= SEED_MAX:
            raise PageError(f"seed must be in 0..{SEED_MAX}, got {seed}")
        if s.sampler not in ("ddim", "ddpm"):
            raise PageError(f"sampler must be ddim or ddpm, got {s.sampler!r}")
        if s.sampler == "ddim" and not 1 <= steps <= self.pipe.diffusion.timesteps:
            raise PageError(f"steps must be in 1..{self.pipe.diffusion.timesteps} (the model's T), got {steps}")
        if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
            raise PageError(f"guidance must be in 0..{MAX_GUIDANCE:g}, got {s.guidance}")
        return SampleSettings(labels, n, seed, s.sampler, steps, guidance)

    def _generate(self, label_t, s, callback=None):
        kwargs = dict(device=self.device, precision=self.precision, cfg=s.config(), seed=s.seed,
                      data_size=self.pipe.data_size)
        images, _ = generate(self.model, self.pipe.diffusion, label_t, callback=callback, **kwargs)
        return images

    def sample(self, settings, weights=None, callback=None):
        """denoise.py's samples for ``settings`` at ``weights``: the same seeding, sampler call and layout."""
        s = self.check_settings(settings)
        with self.lock:
            used = self.apply_weights(weights)
            label_t = torch.tensor(s.labels).repeat_interleave(s.n_per_label)
            images = self._generate(label_t, s, callback)
        picture = label_columns(images, len(s.labels), s.n_per_label)
        on = {k: w for k, w in used.items() if w != 0}
        info = dict(dataclasses.asdict(s), labels=list(s.labels), weights=on, ckpt=self.ckpt, base_weights=self.weights,
                    precision=self.precision, adapters={k: self.adapters[k].path for k in on})
        title = f"{s.sampler} {s.steps if s.sampler == 'ddim' else self.pipe.diffusion.timesteps} steps, " \
                f"guidance {s.guidance:g}, seed {s.seed}" + (f", {_weights_text(on)}" if on else "")
        return Grid(images, label_t.to(torch.int64), picture, info, annotate(picture, s.labels, title=title))

    def preview_picture(self, x0, s):
        """The current x0 estimate (model range) as the grid will look."""
        images = to_uint8(x0, self.pipe.data_size)
        return annotate(label_columns(images, len(s.labels), s.n_per_label), s.labels)

    def sweep(self, settings, name, weights=None):
        """One adapter's weight across SWEEP_WEIGHTS (columns), a row per label, on the same noise."""
        s = self.check_settings(settings)
        if name not in self.adapters or self.adapters[name].problem is not None:
            raise PageError(f"pick a loaded adapter to sweep (got {name!r})")
        labels = sorted(set(s.labels))
        with self.lock:
            used = self.apply_weights(weights)
            cols = []
            try:
                for w in SWEEP_WEIGHTS:
                    set_lora_weight(self.model, w, name)
                    cols.append(self._generate(torch.tensor(labels), s))
            finally:
                set_lora_weight(self.model, used[name], name)
        grid = torch.stack(cols, dim=1).flatten(0, 1)  # (labels x weights, H, W): a row per label
        picture = tile_grid(grid, nrow=len(SWEEP_WEIGHTS)).numpy()
        return annotate(picture, [f"{w:g}" for w in SWEEP_WEIGHTS], labels,
                        title=f"{name}: its weight across the columns, a row per label")

    def compare(self, settings, weights=None):
        """The base (every adapter at 0) beside the adapters at ``weights``, on the same noise."""
        s = self.check_settings(settings)
        with self.lock:
            used = self.apply_weights(weights)
            on = {k: w for k, w in used.items() if w != 0}
            if not on:
                raise PageError("every adapter is at weight 0: move a slider first")
            self.apply_weights({k: 0.0 for k in used})
            try:
                base = self.sample(s).picture
            finally:
                self.apply_weights(used)
            mixed = self.sample(s).picture
        left, right = annotate(base, s.labels, title="base"), annotate(mixed, s.labels, title=_weights_text(on))
        gap = np.full((left.shape[0], 6 * UPSCALE), 255, dtype=np.uint8)
        return np.concatenate([left, gap, right], 1)

    def save(self, grid, name):
        """The grid as denoise.py writes it (NAME.png, NAME.npz), the .npz also holding the settings, under out/app/."""
        if grid is None:
            raise PageError("nothing to save yet: sample a grid first")
        name = check_name(name, "file name")
        folder = os.path.join(self.out_dir, APP_DIR)
        png = safe_path(os.path.join(folder, f"{name}.png"), [self.out_dir])
        npz = safe_path(os.path.join(folder, f"{name}.npz"), [self.out_dir])
        from PIL import Image

        atomic_write(png, lambda tmp: Image.fromarray(grid.picture, mode="L").save(tmp, format="PNG"))

        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=grid.images.numpy(), labels=grid.labels.numpy().astype(np.int64),
                                    settings=np.array(json.dumps(grid.settings)))
        atomic_write(npz, write_npz)
        return png, npz

    # --------------------------------------------------------- fine-tune

    def start_finetune(self, data, name, steps=None, session=None):
        return start_finetune(self, data, name, steps=steps, session=session)

    def close(self):
        if self.job is not None:
            self.job.stop()


def _weights_text(weights):
    return ", ".join(f"{k} {w:g}" for k, w in weights.items()) or "no adapter"


def sample_grid(studio, settings, weights=None):
    """The grid for ``settings`` (a SampleSettings) at adapter ``weights`` ({name: w}): denoise.py's, pixel for
    pixel."""
    return studio.sample(settings, weights)


def apply_weights(studio, weights):
    """Set adapter weights by name ({name: w}, w in -1..2); nothing is reloaded. Returns every adapter's weight."""
    return studio.apply_weights(weights)


def iter_sample(studio, settings, weights=None, every=None):
    """Yield (step, steps, picture) every ``every`` steps while sampling, then the finished Grid.

    Sampling runs in a thread that hands the x0 estimates over; closing the generator (the page went
    away) stops it at the next step."""
    s = studio.check_settings(settings)
    total = s.steps if s.sampler == "ddim" else studio.pipe.diffusion.timesteps
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
            q.put(("done", studio.sample(s, weights, callback)))
        except _Cancelled:
            q.put(("cancelled",))
        except BaseException as e:  # noqa: BLE001 -- handed to the page's thread, which raises it there
            q.put(("error", e))

    threading.Thread(target=work, daemon=True, name="sample").start()
    try:
        while True:
            item = q.get()
            if item[0] == "step":
                yield item[1], item[2], studio.preview_picture(item[3], s)
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


# ------------------------------------------------------------------ your style: data

def label_from_name(path):
    """The digit a file is labelled with: a folder named 0..9 (``7/a.png``) or a name starting ``7_`` / ``7-``."""
    parts = re.split(r"[\\/]", path)
    for folder in reversed(parts[:-1]):
        if re.fullmatch(r"\d", folder):
            return int(folder)
    m = re.match(r"^(\d)(?:[_\-. ]|$)", os.path.splitext(parts[-1])[0] + " ")
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Upload:
    images: np.ndarray  # uint8 (N, 28, 28), ink bright on dark
    labels: np.ndarray  # int64 (N,)
    names: list
    bad: list  # "name: why" of each file refused

    def __len__(self):
        return len(self.labels)


def _preprocess(image, name):
    import styles

    return np.asarray(styles.preprocess_image(image, where=name), dtype=np.uint8)


def _decode(name, data):
    """A PIL image from bytes, or the reason it is not one."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_FILE_BYTES:
        return None, f"larger than {MAX_FILE_BYTES // 2**20} MB"
    try:
        img = Image.open(io.BytesIO(data))
        if max(img.size) > MAX_IMAGE_SIDE:
            return None, f"{img.size[0]}x{img.size[1]} pixels, more than {MAX_IMAGE_SIDE} a side"
        img.load()
        return img, None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        return None, f"not a readable image ({type(e).__name__})"


def read_uploads(files, drawn=()):
    """Images and labels from uploaded files (images or zips; labelled by folder or file name) and drawn digits.

    ``files`` is a list of (name, path) or paths; ``drawn`` a list of (label, image). Every file that is not
    a labelled image is named in ``bad``; nothing is trained while any is."""
    entries, bad, total = [], [], 0  # entries: (name, bytes)
    for item in files or []:
        name, path = item if isinstance(item, tuple) else (os.path.basename(str(item)), str(item))
        size = os.path.getsize(path)
        total += size
        if total > MAX_UPLOAD_BYTES:
            raise PageError(f"uploads over {MAX_UPLOAD_BYTES // 2**20} MB in all; send fewer files")
        if name.lower().endswith(".zip"):
            try:
                with zipfile.ZipFile(path) as z:
                    infos = [i for i in z.infolist() if not i.is_dir() and not _hidden(i.filename)]
                    if len(entries) + len(infos) > MAX_UPLOAD_FILES:
                        raise PageError(f"more than {MAX_UPLOAD_FILES} files; send fewer")
                    for info in infos:
                        total += info.file_size
                        if total > MAX_UPLOAD_BYTES:
                            raise PageError(f"{name} unpacks to over {MAX_UPLOAD_BYTES // 2**20} MB; send fewer files")
                        if info.file_size > MAX_FILE_BYTES:
                            bad.append(f"{name}/{info.filename}: larger than {MAX_FILE_BYTES // 2**20} MB")
                            continue
                        entries.append((f"{name}/{info.filename}", z.read(info)))
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                bad.append(f"{name}: not a readable zip ({type(e).__name__})")
        else:
            if len(entries) + 1 > MAX_UPLOAD_FILES:
                raise PageError(f"more than {MAX_UPLOAD_FILES} files; send fewer")
            if size > MAX_FILE_BYTES:
                bad.append(f"{name}: larger than {MAX_FILE_BYTES // 2**20} MB")
                continue
            with open(path, "rb") as f:
                entries.append((name, f.read()))
    images, labels, names = [], [], []
    for name, data in entries:
        inner = name.split("/", 1)[1] if name.lower().split("/", 1)[0].endswith(".zip") and "/" in name else name
        label = label_from_name(inner)
        if label is None:
            bad.append(f"{name}: no label (put it in a folder 0..9 or start its name with the digit, e.g. 7_a.png)")
            continue
        if not inner.lower().endswith(IMAGE_EXTS):
            bad.append(f"{name}: not an image file ({', '.join(IMAGE_EXTS)})")
            continue
        img, why = _decode(name, data)
        if img is None:
            bad.append(f"{name}: {why}")
            continue
        try:
            images.append(_preprocess(img, name))
        except UserError as e:  # styles.StyleDataError: a blank image; its message names the file
            bad.append(str(e))
            continue
        labels.append(label)
        names.append(name)
    for i, (label, img) in enumerate(drawn or []):
        try:
            images.append(_preprocess(img, f"drawn #{i + 1}"))
        except UserError as e:
            bad.append(str(e))
            continue
        labels.append(int(label))
        names.append(f"drawn #{i + 1}")
    arr = np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)
    return Upload(arr, np.asarray(labels, dtype=np.int64), names, bad)


def _hidden(name):
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


def sketch_to_image(value):
    """A Sketchpad's value (dark strokes on a light or transparent canvas) as a grey PIL image, or None if blank."""
    from PIL import Image

    if value is None:
        return None
    arr = value.get("composite") if isinstance(value, dict) else value
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 4:
        # strokes are opaque, the empty canvas transparent: ink is the alpha where the stroke is dark
        alpha = arr[..., 3].astype(np.float32) / 255
        grey = arr[..., :3].astype(np.float32).mean(-1)
        ink = alpha * (255 - grey)
        arr = (255 - ink).clip(0, 255).astype(np.uint8)
    elif arr.ndim == 3:
        arr = arr[..., :3].mean(-1).astype(np.uint8)
    if arr.min() > 200:
        return None
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def prepare_style_data(studio, upload, name):
    """Write what the fine-tune reads (NAME.npz) and its preview picture under out/app/styles/; returns both paths."""
    if upload.bad:
        raise PageError(f"{len(upload.bad)} file(s) refused, nothing is trained: " + "; ".join(upload.bad[:10]))
    if len(upload) < MIN_TRAIN_IMAGES:
        raise PageError(f"{len(upload)} image(s): upload or draw at least {MIN_TRAIN_IMAGES}")
    name = check_name(name, "adapter name")
    folder = os.path.join(studio.out_dir, APP_DIR, "styles")
    npz = safe_path(os.path.join(folder, f"{name}.npz"), [studio.out_dir])
    preview = safe_path(os.path.join(folder, f"{name}_data.png"), [studio.out_dir])

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=upload.images, labels=upload.labels)
    atomic_write(npz, write_npz)
    import styles

    counts = np.bincount(upload.labels, minlength=10)
    styles.save_preview(upload.images, upload.labels, preview, title=f"{name}: {len(upload)} images",
                        notes={d: f"{c} images" for d, c in enumerate(counts) if c})
    return npz, preview


# ------------------------------------------------------------------ your style: the fine-tune

PROGRESS_RE = re.compile(r"(\d+)/(\d+) \[[^\]]*?loss=([0-9.eE+-]+|nan)")


def _death_signal():
    """A function the child runs between fork and exec: SIGTERM to it when the thread that started it dies,
    even by kill -9 of the server (Linux's PR_SET_PDEATHSIG); None elsewhere, where atexit and Stop remain.

    Looked up here, in the parent: between fork and exec a threaded process must not import or load."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


_JOBS = set()


@atexit.register
def _stop_all():
    for job in list(_JOBS):
        job.stop()


class FineTune:
    """``lora_finetune.py --data`` as a child process of the server, its output in a log file.

    The child is started and waited on by one dedicated thread, so its parent-death signal is tied to a
    thread that lives exactly as long as it; stopping the server, atexit or the page's Stop end it."""

    def __init__(self, cmd, out, log_path, session=None):
        self.cmd, self.out, self.log_path, self.session = cmd, out, log_path, session
        self.proc = None
        self.returncode = None
        self.started = time.time()
        self._ready = threading.Event()
        self._error = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="finetune")
        self.thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise PageError(f"could not start the fine-tune: {self._error}")

    def _run(self):
        try:
            with open(self.log_path, "wb") as log:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=HERE, env=env, preexec_fn=_death_signal())
                _JOBS.add(self)
                self._ready.set()
                self.returncode = self.proc.wait()
        except OSError as e:
            self._error = e
            self._ready.set()
        finally:
            _JOBS.discard(self)

    def running(self):
        return self.proc is not None and self.returncode is None and self.proc.poll() is None

    def stop(self, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def status(self):
        """{'step', 'steps', 'loss', 'done', 'ok', 'tail', 'previews'} read from the log and the output folder."""
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-200_000:].decode("utf-8", "replace")
        except OSError:
            text = ""
        found = PROGRESS_RE.findall(text)
        step, steps, loss = (int(found[-1][0]), int(found[-1][1]), float(found[-1][2])) if found else (0, None, None)
        lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
        done = not self.running() and self.proc is not None
        previews = []
        if os.path.isdir(self.out):
            for dirpath, _, filenames in os.walk(self.out):
                previews += [os.path.join(dirpath, n) for n in filenames if n.endswith(".png")]
        previews.sort(key=lambda p: os.path.getmtime(p))
        return {"step": step, "steps": steps, "loss": loss, "done": done,
                "ok": done and self.proc.returncode == 0, "returncode": self.proc.returncode if done else None,
                "tail": lines[-3:], "previews": previews}


def start_finetune(studio, data, name, steps=None, session=None):
    """Start ``lora_finetune.py --data DATA --out out/app/adapters/NAME`` in the background; one at a time.

    ``data`` is an Upload (checked and written under out/app/styles/ first) or the path of a prepared .npz."""
    name = check_name(name, "adapter name")
    if studio.job is not None and studio.job.running():
        raise PageError(f"a fine-tune is already running ({os.path.basename(studio.job.out)}); wait for it to "
                        "finish or stop it")
    out = safe_path(os.path.join(studio.out_dir, APP_DIR, "adapters", name), [studio.out_dir])
    if os.path.exists(out):
        raise PageError(f"an adapter named {name!r} exists ({out}); choose another name")
    if isinstance(data, Upload):
        data, _ = prepare_style_data(studio, data, name)
    data = safe_path(data, studio.roots)
    if steps is not None:
        steps = int(steps)
        if not 1 <= steps <= 100_000:
            raise PageError(f"steps must be in 1..100000, got {steps}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    log_path = os.path.join(studio.out_dir, APP_DIR, "adapters", f"{name}.log")
    cmd = [sys.executable, os.path.join(HERE, "lora_finetune.py"), "--preset", studio.preset, "--ckpt", studio.ckpt,
           "--weights", studio.weights, "--data", data, "--out", out, "--device", studio.device.type,
           "--precision", studio.finetune_precision]
    if steps is not None:
        cmd += ["--lora-steps", str(steps)]
    studio.job = FineTune(cmd, out, log_path, session)
    return studio.job


def finish_finetune(studio):
    """Once the fine-tune in progress is done: its adapter in the list (if it wrote one); returns the new entries."""
    job = studio.job
    if job is None or job.running():
        return []
    if job.proc is not None and job.proc.returncode == 0 and os.path.isdir(job.out):
        if not any(e.path == job.out for e in studio.adapters.values()):
            return [studio.add_adapter(job.out)]
    return []


# ------------------------------------------------------------------ bench

def bench_entry(studio, repeats=3):
    """Seconds for the page's first grid (10 digits, the default sampler) and for a slider redraw; for bench.py.

    Not run by the tests' timing: the machine they share makes the numbers meaningless there."""
    s = SampleSettings()
    out = {}
    t = time.perf_counter()
    studio.sample(s)
    out["first_grid_s"] = time.perf_counter() - t
    usable = studio.usable()
    times = []
    for i in range(repeats):
        weights = {usable[0].name: 0.5 + 0.25 * (i % 2)} if usable else None
        t = time.perf_counter()
        studio.sample(s, weights)
        times.append(time.perf_counter() - t)
    out["redraw_s"] = sorted(times)[len(times) // 2]
    out["adapters"] = len(usable)
    return out


# ------------------------------------------------------------------ the page

def offline_env(out_dir):
    """Settings that keep Gradio from reaching the internet and writing outside --out-dir; before importing it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["GRADIO_SSR_MODE"] = "False"
    os.environ["GRADIO_MCP_SERVER"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(os.path.realpath(out_dir), APP_DIR, ".uploads")


def _page_errors(fn):
    """A handler whose refusals (PageError, any UserError) are one line on the page, never a traceback."""
    import functools
    import inspect

    import gradio as gr

    def convert(e):
        return gr.Error(str(e), print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as e:
                raise convert(e) from None
        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise convert(e) from None
    return call


def build(studio):
    """The page: the Gradio layout and its wiring to the functions above."""
    import gradio as gr

    slots = []  # slot i shows the i-th usable adapter

    def slot_names():
        return [e.name for e in studio.usable()][:MAX_SLOTS]

    def weights_from(values):  # checked by apply_weights, which names what is wrong
        return dict(zip(slot_names(), values))

    def settings_from(labels, n, seed, sampler, steps, guidance):  # checked by Studio.check_settings
        return SampleSettings(tuple(labels or ()), n, seed, sampler, steps, guidance)

    def slot_updates():
        names = slot_names()
        ups = []
        for i in range(MAX_SLOTS):
            if i < len(names):
                e = studio.adapters[names[i]]
                ups.append(gr.update(visible=True, label=e.name, info=e.describe(), value=e.weight))
            else:
                ups.append(gr.update(visible=False, value=0.0))
        return ups

    def adapter_note():
        lines = []
        usable = studio.usable()
        if not usable:
            lines.append("No adapter found under the page's folders yet: fine-tune one below, or start the page "
                         "with `--lora-dir FOLDER`.")
        if len(usable) > MAX_SLOTS:
            lines.append(f"{len(usable) - MAX_SLOTS} more adapter(s) have no slider: "
                         + ", ".join(e.name for e in usable[MAX_SLOTS:]))
        for e in studio.adapters.values():
            if e.problem:
                lines.append(f"- `{e.name}` not loaded: {e.problem}")
        return "\n".join(lines)

    defaults = preset_config(SampleConfig, studio.preset)
    with gr.Blocks(title="MNIST diffusion + LoRA", analytics_enabled=False) as demo:
        grid_state = gr.State(None)
        drawn_state = gr.State([])
        gr.Markdown(f"## Digits from `{os.path.relpath(studio.ckpt)}` ({studio.weights} weights, "
                    f"{studio.device.type}, {studio.precision})")
        with gr.Row():
            with gr.Column(scale=1):
                labels = gr.CheckboxGroup([str(i) for i in range(studio.num_classes)],
                                          value=[str(i) for i in range(studio.num_classes)], label="labels",
                                          elem_id="labels")
                n_per_label = gr.Slider(1, MAX_PER_LABEL, value=1, step=1, label="samples per label",
                                        elem_id="n_per_label")
                seed = gr.Number(studio.seed, precision=0, label="seed", elem_id="seed")
                sampler = gr.Radio(["ddim", "ddpm"], value=defaults.sampler, label="sampler",
                                   info="ddpm always runs all T steps")
                steps = gr.Slider(1, studio.pipe.diffusion.timesteps, value=min(defaults.steps,
                                  studio.pipe.diffusion.timesteps), step=1, label="steps (ddim)", elem_id="steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=defaults.guidance, step=0.1, label="guidance",
                                     elem_id="guidance")
                sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
                with gr.Row():
                    save_name = gr.Textbox("app_samples", label=f"save as (under {studio.out_dir}/{APP_DIR}/)",
                                           elem_id="save_name")
                    save_btn = gr.Button("Save grid + .npz", elem_id="save")
            with gr.Column(scale=2):
                image = gr.Image(label="samples (a column per label)", format="png", type="numpy", interactive=False,
                                 elem_id="grid", buttons=["download"])
                status = gr.Markdown(elem_id="status")
        gr.Markdown("### Adapters")
        with gr.Row():
            with gr.Column(scale=1):
                for i in range(MAX_SLOTS):
                    slots.append(gr.Slider(WEIGHT_MIN, WEIGHT_MAX, value=0.0, step=0.05, visible=False,
                                           elem_id=f"weight_{i}"))
                note = gr.Markdown(adapter_note())
                sweep_pick = gr.Dropdown(choices=slot_names(), value=(slot_names() or [None])[0],
                                         label="adapter to sweep")
                with gr.Row():
                    sweep_btn = gr.Button("Weight sweep", elem_id="sweep")
                    compare_btn = gr.Button("Base vs adapters", elem_id="compare")
                    refresh_btn = gr.Button("Look for new adapters")
                with gr.Row():
                    add_path = gr.Textbox(label="or add an adapter folder (inside the page's folders)",
                                          elem_id="add_path")
                    add_path_btn = gr.Button("Add", elem_id="add_adapter")
            with gr.Column(scale=2):
                extra = gr.Image(label="sweep / comparison", format="png", type="numpy", interactive=False,
                                 elem_id="extra")
        gr.Markdown("### Your style: fine-tune an adapter on your own digits")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(file_count="multiple", label="images or a zip, labelled 7/a.png or 7_a.png",
                                file_types=[*IMAGE_EXTS, ".zip"], type="filepath", elem_id="uploads")
                with gr.Row():
                    sketch = gr.Sketchpad(label="or draw a digit", type="numpy", canvas_size=(280, 280),
                                          elem_id="sketch")
                    with gr.Column():
                        sketch_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="its label")
                        add_btn = gr.Button("Add drawing")
                        clear_btn = gr.Button("Clear drawings")
                style_name = gr.Textbox("my_style", label="adapter name", elem_id="style_name")
                ft_steps = gr.Number(preset_config(LoraConfig, studio.preset).lora_steps, precision=0,
                                     label="fine-tune steps", elem_id="ft_steps")
                with gr.Row():
                    check_btn = gr.Button("Check data", elem_id="check")
                    train_btn = gr.Button("Fine-tune", variant="primary", elem_id="train")
                    stop_btn = gr.Button("Stop", elem_id="stop")
            with gr.Column(scale=2):
                style_msg = gr.Markdown(elem_id="style_msg")
                data_preview = gr.Image(label="what the model will train on", format="png", type="filepath",
                                        interactive=False, elem_id="data_preview")
                ft_progress = gr.Markdown(elem_id="ft_progress")
                ft_preview = gr.Image(label="fine-tune previews", format="png", type="filepath", interactive=False)

        sample_inputs = [labels, n_per_label, seed, sampler, steps, guidance, *slots]

        @_page_errors
        def do_sample(labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v, *weights):
            s = settings_from(labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v)
            t = time.perf_counter()
            for item in iter_sample(studio, s, weights_from(weights)):
                if isinstance(item, Grid):
                    yield item.display, item, (f"done in {time.perf_counter() - t:.1f} s, "
                                               f"{_weights_text(item.settings['weights'])}")
                else:
                    step, total, picture = item
                    yield picture, gr.skip(), f"denoising: step {step} of {total}"

        sample_btn.click(do_sample, sample_inputs, [image, grid_state, status], concurrency_id="model")
        for sl in slots:
            sl.release(do_sample, sample_inputs, [image, grid_state, status], concurrency_id="model")

        @_page_errors
        def do_save(grid, name):
            png, npz = studio.save(grid, name)
            return f"saved {png} and {npz}"

        save_btn.click(do_save, [grid_state, save_name], status)

        @_page_errors
        def do_sweep(pick, labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v, *weights):
            s = settings_from(labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v)
            return studio.sweep(s, pick, weights_from(weights))

        sweep_btn.click(do_sweep, [sweep_pick, *sample_inputs], extra, concurrency_id="model")

        @_page_errors
        def do_compare(labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v, *weights):
            s = settings_from(labels_v, n_v, seed_v, sampler_v, steps_v, guidance_v)
            return studio.compare(s, weights_from(weights))

        compare_btn.click(do_compare, sample_inputs, extra, concurrency_id="model")

        def do_refresh():
            studio.scan_adapters()
            names = slot_names()
            return [*slot_updates(), gr.update(value=adapter_note()),
                    gr.update(choices=names, value=names[0] if names else None)]

        refresh_outputs = [*slots, note, sweep_pick]
        refresh_btn.click(do_refresh, None, refresh_outputs)

        @_page_errors
        def do_add_path(path):
            if any(e.path == safe_path(path, studio.roots) for e in studio.adapters.values()):
                raise PageError(f"{path!r} is listed already")
            entry = studio.add_adapter(path)
            if entry.problem:
                raise PageError(f"{path!r} is not loaded: {entry.problem}")
            return do_refresh()

        add_path_btn.click(do_add_path, add_path, refresh_outputs)
        demo.load(do_refresh, None, refresh_outputs)

        @_page_errors
        def do_add(value, label, drawn):
            img = sketch_to_image(value)
            if img is None:
                raise PageError("the sketchpad is empty: draw a digit first")
            drawn = [*drawn, (int(label), img)]
            return drawn, f"{len(drawn)} drawing(s) added", None

        add_btn.click(do_add, [sketch, sketch_label, drawn_state], [drawn_state, style_msg, sketch])
        clear_btn.click(lambda: ([], "drawings cleared"), None, [drawn_state, style_msg])

        def upload_of(paths, drawn):
            return read_uploads([(os.path.basename(p), p) for p in paths or []], drawn)

        @_page_errors
        def do_check(paths, drawn, name):
            up = upload_of(paths, drawn)
            if up.bad:
                raise PageError(f"{len(up.bad)} file(s) refused, nothing is trained: " + "; ".join(up.bad[:10]))
            _, preview = prepare_style_data(studio, up, name)
            counts = np.bincount(up.labels, minlength=10)
            return (f"{len(up)} images ready: " + ", ".join(f"{d}: {c}" for d, c in enumerate(counts) if c),
                    preview)

        check_btn.click(do_check, [files, drawn_state, style_name], [style_msg, data_preview])

        @_page_errors
        def do_train(paths, drawn, name, steps_v, request: gr.Request):
            up = upload_of(paths, drawn)
            job = start_finetune(studio, up, name, steps_v, session=getattr(request, "session_hash", None))
            preview = os.path.join(studio.out_dir, APP_DIR, "styles", f"{check_name(name)}_data.png")
            shown = shlex.join(["python", "lora_finetune.py", *job.cmd[2:]])
            yield (f"fine-tune started: `{shown}`", preview, gr.skip(), gr.skip(),
                   *[gr.skip()] * len(refresh_outputs))
            while job.running():
                time.sleep(1.0)
                st = job.status()
                yield (gr.skip(), gr.skip(), _progress_html(st), st["previews"][-1] if st["previews"] else gr.skip(),
                       *[gr.skip()] * len(refresh_outputs))
            job.thread.join(5)
            st = job.status()
            finish_finetune(studio)
            if st["ok"]:
                msg = f"done: adapter `{os.path.relpath(job.out, studio.out_dir)}` is in the list above"
            else:
                msg = f"the fine-tune stopped (exit code {st['returncode']}): " + " / ".join(st["tail"])
            yield (gr.skip(), gr.skip(), _progress_html(st) + "\n\n" + msg,
                   st["previews"][-1] if st["previews"] else gr.skip(), *do_refresh())

        train_btn.click(do_train, [files, drawn_state, style_name, ft_steps],
                        [style_msg, data_preview, ft_progress, ft_preview, *refresh_outputs])

        def do_stop():
            if studio.job is None or not studio.job.running():
                return "no fine-tune is running"
            studio.job.stop()
            return "fine-tune stopped"

        stop_btn.click(do_stop, None, ft_progress)

        def on_unload(request: gr.Request):
            # the page that started a fine-tune went away: its run stops with it
            job = studio.job
            if job is not None and job.running() and job.session == getattr(request, "session_hash", None):
                job.stop()

        demo.unload(on_unload)
    return demo


def _progress_html(st):
    steps = st["steps"] or 0
    loss = f", loss {st['loss']:.4f}" if st["loss"] is not None else ""
    return f"<progress value='{st['step']}' max='{max(steps, 1)}'></progress> step {st['step']} of {steps or '?'}{loss}"


# ------------------------------------------------------------------ command line

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    model, out, page = p.group("model"), p.group("output"), p.group("page")
    model.add_argument("--ckpt", default=DEFAULT_CKPT, type=path_arg, help="base checkpoint from train.py")
    model.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (better) or raw weights")
    model.add_argument("--lora-dir", action="append", default=None, type=path_arg, metavar="FOLDER",
                       help="also list the adapters in FOLDER (read only); repeat for several")
    out.add_argument("--out-dir", default=DEFAULT_OUT_DIR, type=path_arg,
                     help="adapters are listed from here; saved grids, style data and fine-tunes go under OUT_DIR/app/")
    page.add_argument("--host", default="127.0.0.1",
                      help="address to listen on; 0.0.0.0 opens the page to every machine that can reach this one")
    page.add_argument("--port", type=bounded(int, ge=1, le=65535), default=DEFAULT_PORT, help="port to listen on")
    page.add_argument("--share", action="store_true",
                      help="also ask gradio.live for a public link (off: nothing leaves this machine)")
    page.add_argument("--bench", action="store_true",
                      help="time the page's first grid of 10 digits and a weight-slider redraw, print them as JSON "
                           "and exit, serving nothing (the figures the README gives)")
    add_preset_arg(p)  # the page's sampler defaults and the fine-tune's settings
    add_runtime_args(p)  # --seed: the page's first seed
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None):
    return run_main(serve, parse_args(argv))


def serve(args, block=True):
    rcfg = runtime_from_args(args)
    device = pick_device(rcfg.device)
    precision = resolve_precision(rcfg.precision, device)  # sampling: the rule, never timed (as denoise.py)
    studio = Studio(args.ckpt, args.out_dir, args.lora_dir or [], device=device, precision=precision,
                    weights=args.weights, preset=args.preset, seed=rcfg.seed)
    studio.finetune_precision = rcfg.precision  # as asked: on CUDA, auto times the fine-tune's step
    if args.bench:
        try:
            print(json.dumps({"device": str(device), "precision": precision, **bench_entry(studio)}))
        finally:
            studio.close()
        return None
    offline_env(args.out_dir)
    try:
        import gradio  # noqa: F401 -- only here, so the functions above work without it
    except ImportError:
        studio.close()
        raise PageError("the page needs Gradio: pip install -r requirements-app.txt") from None
    print(f"app: {args.ckpt} [{args.weights}] on {device} ({precision}), {len(studio.usable())} adapter(s): "
          + (", ".join(e.name for e in studio.usable()) or "none"))
    demo = build(studio)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES,
            prevent_thread_lock=not block, ssr_mode=False, show_error=False, quiet=not block, footer_links=[],
            allowed_paths=[os.path.join(studio.out_dir, APP_DIR)])
    except OSError as e:
        studio.close()
        raise PageError(f"cannot listen on {args.host}:{args.port} ({e}); pass another --port") from None
    if not block:
        return demo, studio
    studio.close()
    return None


if __name__ == "__main__":
    main()
