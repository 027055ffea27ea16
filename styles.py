"""Style data sets: a user's own digits (a folder of images, an .npz) or a font's, made MNIST-like.

    DIR/0/*.png, DIR/1/*.jpg, ...     any subset of the labels 0..9, any format, size and mode Pillow reads
    DIR/7_a.png, DIR/3-b.jpg, ...     or labelled by name (label_from_name: the page's uploads follow one rule)
    FILE.npz                          images uint8 (N, 28, 28) and labels (N,), as denoise.py writes them
    font:NAME                         digits rendered from a TrueType font matplotlib ships (font_names())

    data = load_style_data("my_digits")            # StyleData: images uint8 (N, 28, 28), labels, name, inverted
    pictures.data_preview_png(data.images, data.labels, "out/lora/data_preview.png")   # pictures are pictures.py's
    write_font_folder("font:DejaVu Serif", "my_digits", per_label=20)   # PNG files a user's folder would hold

Every image goes through what made MNIST (LeCun et al. 1998): grey, ink bright on dark, cropped to the
ink, fitted into 20x20 keeping its aspect ratio (antialiased), and centred by its centre of mass in
28x28. Whatever is wrong with the data (an empty folder, a corrupt or blank image, an npz with the
wrong arrays, a font that does not exist) is one StyleDataError naming the file and the fix, raised
before anything is built or written.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import struct
import warnings
import zlib

import numpy as np
import torch

from errors import UserError
from files import atomic_write
from inputs import InputError, check_regular
from pictures import font_dir, read_samples_npz

NUM_LABELS = 10
SIZE = 28  # MNIST's side
FIT = 20  # MNIST's digits were fitted into 20x20 and centred by their centre of mass in 28x28
# the share of the range between paper and the brightest ink below which an image counts as blank: JPEG noise
# and paper grain stay under it, a pencil stroke does not
BLANK_CONTRAST = 0.1
# after levels (paper 0, brightest ink 1), what lies below this is paper grain and set to paper; the crop box
# holds the rows and columns with a pixel at least CROP_LEVEL, so a faint speck does not stretch it
FLOOR = 0.1
CROP_LEVEL = 0.2
FEW_PER_LABEL = 10  # fewer images than this for a label: said in the summary line (a weak style there)
FONT_PER_LABEL = 20  # images per label rendered for --style font:NAME (render-style --per-label's default)
FONT_PER_LABEL_MAX = 1000  # the pages are all rendered before the first is written: 0.26 GB at this many
FONT_CANVAS = 160  # side of a rendered glyph's page, in pixels: room for the largest size and offset below
FONT_SIZES = (72, 104)  # jitter: font size in pixels, uniform (after the fit it changes the stroke's share)
FONT_STROKES = (0, 1)  # jitter: extra stroke width in pixels (Pillow's stroke_width), one drawn uniformly
# jitter: offset of the glyph on its page, in pixels either way. It varies the pages render-style writes, as
# scans vary; the crop and the centring by mass take it out again, as they did for MNIST's writers
FONT_SHIFT = 8
IMAGE_EXTENSIONS_HINT = "PNG, JPEG, BMP, GIF, TIFF or WebP"
# a page is shrunk by whole factors (a box average) to at most this side before anything else: a phone's 12 MP
# photo of one digit becomes ~1000 px, which still leaves the 20x20 fit dozens of pixels a stroke
MAX_SIDE = 1024


class StyleDataError(UserError):
    """Style data that cannot be used: the message names the file (or font) and what to do."""


@dataclasses.dataclass
class StyleData:
    images: torch.Tensor  # (N, 28, 28) uint8, ink bright on dark, MNIST-like
    labels: torch.Tensor  # (N,) int64 in 0..9
    name: str  # the adapter's style field: "data:FOLDER", "data:FILE" (npz) or "font:NAME"
    inverted: int = 0  # how many images had a light background and were inverted

    def __len__(self):
        return len(self.labels)

    def counts(self):
        """Images per label, all ten labels (0 for a label the data lacks)."""
        return torch.bincount(self.labels, minlength=NUM_LABELS).tolist()

    def present(self):
        """The labels the data holds, sorted."""
        return [c for c, n in enumerate(self.counts()) if n]

    def summary(self):
        """One line: images per label and how many were inverted."""
        counts = self.counts()
        per = " ".join(f"{c}:{n}" for c, n in enumerate(counts) if n)
        few = [c for c, n in enumerate(counts) if 0 < n < FEW_PER_LABEL]
        note = f"; fewer than {FEW_PER_LABEL} for {','.join(map(str, few))} (a weaker style there)" if few else ""
        return (f"{self.name}: {len(self)} images ({per}), {self.inverted} inverted (light background){note}")


# ------------------------------------------------------------------ preprocessing

def _gray(img):
    """A PIL image of any mode as float32 (H, W) in [0, 1], 1 = white.

    Images with transparency: the alpha channel is the ink. A drawing app or a font export marks its
    paper transparent and its strokes opaque, whatever their colour, so alpha is right for white ink
    as for black; compositing on white would lose white ink. An RGBA image that is opaque all over says
    nothing with its alpha, and its colours are read as those of an RGB image."""
    if img.mode == "P":  # a palette: its colours, and its transparency when it has one
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            return 1.0 - alpha  # opaque ink as dark on a light page, as a scan would be (inverted below)
        img = img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode in ("I", "F"):
        # 32-bit integer or float pixels carry no range of their own: 8-bit, 16-bit or [0, 1] by their largest
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("it holds NaN or infinite pixel values")
        top = a.max()
        scale = 1.0 if img.mode == "F" and top <= 1.0 else 255.0 if top <= 255 else max(65535.0, top)
        return np.clip(a / scale, 0.0, 1.0).astype(np.float32)
    if img.mode != "L":
        img = img.convert("L")  # 1, RGB, CMYK, YCbCr, LAB, HSV: Pillow's ITU-R 601 luma
    return np.asarray(img, dtype=np.float32) / 255.0


def _array_gray(a):
    """An array (H, W), (H, W, 3) or (H, W, 4) of uint8, uint16, bool or float in [0, 1] -> float32 (H, W)."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("it holds NaN or infinite values")
        a = np.clip(a.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"pixels of dtype {a.dtype}: pass uint8, uint16, bool or float in [0, 1]")
    if a.ndim == 3 and a.shape[2] == 4 and a[..., 3].min() < 1.0:
        return 1.0 - a[..., 3]  # alpha is the ink, as for a PIL image (_gray)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as Pillow's "L"
    if a.ndim != 2 or min(a.shape) == 0:
        raise ValueError(f"shape {a.shape}: pass (H, W), (H, W, 3) or (H, W, 4)")
    return a


def _border(gray):
    """The pixels of the image's outer ring (2% of the shorter side, at least one pixel): the paper."""
    h, w = gray.shape
    k = max(1, round(0.02 * min(h, w)))
    if 2 * k >= min(h, w):
        return gray.ravel()
    return np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[k:-k, :k].ravel(), gray[k:-k, -k:].ravel()])


def _fit_and_centre(x):
    """Float ink (h, w) in [0, 1], cropped -> float (28, 28): fitted into 20x20 keeping the aspect ratio
    (antialiased: Pillow's Lanczos widens its kernel by the reduction), then shifted by whole pixels so
    that the centre of mass lands on the centre, as MNIST was made."""
    from PIL import Image

    h, w = x.shape
    s = FIT / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    fitted = np.asarray(Image.fromarray(x.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    fitted = np.clip(fitted, 0.0, 1.0)
    mass = fitted.sum()
    fh, fw = fitted.shape
    if mass <= 0:  # Lanczos of a speck can ring to nothing: centre the box itself
        cy, cx = (fh - 1) / 2, (fw - 1) / 2
    else:
        cy = float((fitted.sum(axis=1) * np.arange(fh)).sum() / mass)
        cx = float((fitted.sum(axis=0) * np.arange(fw)).sum() / mass)
    centre = (SIZE - 1) / 2
    oy, ox = int(math.floor(centre - cy + 0.5)), int(math.floor(centre - cx + 0.5))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    # a lopsided digit can be pushed partly off the page; MNIST clipped it too
    y0, x0 = max(0, oy), max(0, ox)
    y1, x1 = min(SIZE, oy + fh), min(SIZE, ox + fw)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = fitted[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    return out


def _shrink(gray):
    """float (H, W) -> box-averaged by the least whole factor that brings its longer side to MAX_SIDE or less."""
    k = math.ceil(max(gray.shape) / MAX_SIDE)
    if k <= 1:
        return gray
    h, w = gray.shape[0] // k * k, gray.shape[1] // k * k
    return gray[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def _mnist_like(gray, where):
    """float (H, W) in [0, 1] -> (uint8 (28, 28) ink bright on dark, whether it was inverted)."""
    gray = _shrink(gray)
    border = _border(gray)
    paper = float(np.median(border))
    lo, hi = float(gray.min()), float(gray.max())
    # the ink is the extreme farther from the paper: white paper, grey paper with dark ink, a black slate
    inverted = paper > (lo + hi) / 2
    if inverted:
        gray, paper = 1.0 - gray, 1.0 - paper
    top = float(gray.max())
    if top - paper < BLANK_CONTRAST:
        raise StyleDataError(f"{where} has no ink (its brightest stroke is {round(255 * (top - paper))} grey levels "
                             f"from its paper): remove it, or rescan it darker")
    x = np.clip((gray - paper) / (top - paper), 0.0, 1.0)  # levels: paper 0, the brightest ink 1
    x = np.clip((x - FLOOR) / (1.0 - FLOOR), 0.0, 1.0)
    rows = np.flatnonzero((x >= CROP_LEVEL).any(axis=1))
    cols = np.flatnonzero((x >= CROP_LEVEL).any(axis=0))
    x = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    out = _fit_and_centre(x)
    return np.round(out * 255.0).astype(np.uint8), inverted


def preprocess_image(img, where="image"):
    """A PIL image (any mode) or an array (H, W[, 3 or 4]) -> uint8 (28, 28), ink bright on dark, MNIST-like.

    A light background (from the border's pixels) is inverted; the ink is cropped, fitted into 20x20
    keeping its aspect ratio and centred by its centre of mass. A blank image is a StyleDataError."""
    try:
        gray = _array_gray(img) if isinstance(img, np.ndarray) else _gray(img)
    except ValueError as e:
        raise StyleDataError(f"{where}: {e}") from None
    return _mnist_like(gray, where)[0]


# ------------------------------------------------------------------ a folder of images

def _regular_size(path):
    """The size of an image file; a FIFO, a device or a symlink loop is named as style data, never read."""
    try:
        return check_regular(path, "the style image")
    except InputError as e:
        raise StyleDataError(str(e)) from None


def open_image(source, where=None):
    """The single frame of ``source`` (a path, or a binary file object such as an upload's bytes) as a PIL image,
    fully decoded; a StyleDataError naming ``where`` (default: the path) otherwise. --data and the page's uploads
    both read images here."""
    from PIL import Image, UnidentifiedImageError

    where = where or repr(source)
    size = _regular_size(source) if isinstance(source, (str, os.PathLike)) else len(source.getbuffer())
    if size == 0:
        raise StyleDataError(f"{where} is empty (0 bytes): remove it, or save the image again")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; an image that large is not a digit either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                frames = getattr(img, "n_frames", 1)
                if frames > 1:
                    # refused rather than taking the first frame: in an animation (a stroke being drawn) the
                    # digit is whole only in some frame, and which one is the user's to say
                    raise StyleDataError(f"{where} has {frames} frames (animated or multi-page): save the "
                                         "frame that shows the digit as its own image")
                from PIL import ImageOps

                if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 of the size right away: seconds saved a photo
                    img.draft(None, (MAX_SIDE, MAX_SIDE))
                img.load()
                # a phone's photo stores its rotation in EXIF: apply it, or the digit lies on its side
                return ImageOps.exif_transpose(img)
    except StyleDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise StyleDataError(f"{where} has more pixels than Pillow's decompression-bomb limit ({limit:,}): "
                             "scale it down (a digit needs a few hundred pixels a side)") from None
    except UnidentifiedImageError:
        raise StyleDataError(f"{where} is not an image Pillow can read: remove it, or save it as "
                             f"{IMAGE_EXTENSIONS_HINT}") from None
    # a truncated or corrupt file fails while decoding, with whichever of these its decoder raises
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StyleDataError(f"{where} is truncated or corrupt ({why}): save the image again") from None


def read_digit(source, where=None):
    """An image file (a path or a binary file object) -> (uint8 (28, 28) MNIST-like, whether it was inverted):
    open_image, then preprocess_image's steps. --data's folders and the page's uploads both come through here."""
    where = where or repr(source)
    img = open_image(source, where)
    try:
        gray = _gray(img)
    except ValueError as e:
        raise StyleDataError(f"{where}: {e}; save it as an 8- or 16-bit image") from None
    return _mnist_like(gray, where)


def label_from_name(path):
    """The label a style image's path gives it, or None: the nearest folder named by one digit (``7/a.png``,
    ``digits/7/a.png``), else a file name that starts with the digit and then ``_``, ``-``, ``.`` or a space
    (``7_a.png``, ``7.png``). The one rule for --data's folders, the page's uploads and the zips they send."""
    parts = [p for p in re.split(r"[\\/]", str(path)) if p]
    for folder in reversed(parts[:-1]):
        if re.fullmatch(r"[0-9]", folder):
            return int(folder)
    m = re.match(r"([0-9])(?:[_\-. ]|$)", os.path.splitext(parts[-1])[0] + " ") if parts else None
    return int(m.group(1)) if m else None


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))  # .DS_Store, editors' backups


def _folder_files(folder):
    """[(label, path)] of DIR/0..9/* and of DIR's loose files named by their label (DIR/7_a.png), labelled by
    label_from_name and sorted; StyleDataError for anything else in DIR."""
    entries = _visible(os.listdir(folder))
    subdirs = [n for n in entries if os.path.isdir(os.path.join(folder, n))]
    loose = [n for n in entries if n not in subdirs]
    bad = [n for n in subdirs if not re.fullmatch(r"[0-9]", n)]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise StyleDataError(f"{folder!r}: subfolders must be named by their digit, 0..9; found {shown}: rename "
                             "them, or move them out")
    unlabelled = [n for n in loose if label_from_name(n) is None]
    if unlabelled:
        raise StyleDataError(f"{folder!r} holds files outside the 0..9 subfolders whose names give no label "
                             f"({unlabelled[0]!r}{f' and {len(unlabelled) - 1} more' if len(unlabelled) > 1 else ''}"
                             "): put each image in the subfolder of its label, e.g. 7/, or start its name with "
                             "the digit, 7_a.png")
    files = [(label_from_name(n), os.path.join(folder, n)) for n in loose]
    for sub in subdirs:
        for n in _visible(os.listdir(os.path.join(folder, sub))):
            p = os.path.join(folder, sub, n)
            if os.path.isdir(p):
                raise StyleDataError(f"{p!r} is a folder: images go directly into {os.path.join(folder, sub)!r}")
            files.append((label_from_name(os.path.join(sub, n)), p))
    if not files:
        raise StyleDataError(f"{folder!r} holds no images: put them in subfolders named by their label, "
                             f"{os.path.join(folder, '7', 'a.png')!r} and so on")
    return files


def _load_folder(folder):
    images, labels, inverted = [], [], 0
    for label, path in _folder_files(folder):
        arr, inv = read_digit(path)
        images.append(arr)
        labels.append(label)
        inverted += inv
    name = "data:" + (os.path.basename(os.path.normpath(os.path.abspath(folder))) or "data")
    return StyleData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), name, inverted)


# ------------------------------------------------------------------ an .npz

def _load_npz(path):
    """images uint8 (N, 28, 28) and labels (N,) in 0..9, as denoise.py writes them; taken at their size, with
    a light background inverted (they are already MNIST-sized: no crop or fit)."""
    fix = (f"it needs images uint8 (N, {SIZE}, {SIZE}) and labels (N,) in 0..9, as denoise.py writes them (other "
           "sizes: write them as image files into a folder of 0..9 subfolders and pass the folder)")
    images, labels = read_samples_npz(path, StyleDataError, num_classes=NUM_LABELS, size=SIZE, exact_dtype=True,
                                      fix=fix, what="the style data")
    out, inverted = [], 0
    for i, img in enumerate(images):
        g = img.astype(np.float32) / 255.0
        paper = float(np.median(_border(g)))
        if paper > (float(g.min()) + float(g.max())) / 2:
            img, paper, inverted = 255 - img, 1.0 - paper, inverted + 1
        if int(img.max()) - round(255 * paper) < round(255 * BLANK_CONTRAST):
            raise StyleDataError(f"{path!r}: image {i} (label {labels[i]}) has no ink: drop it from the file")
        out.append(img)
    name = "data:" + os.path.splitext(os.path.basename(path))[0]
    return StyleData(torch.from_numpy(np.stack(out)), torch.from_numpy(labels.astype(np.int64)), name, inverted)


# ------------------------------------------------------------------ fonts

def _key(name):
    """A font name compared loosely: case, spaces, hyphens and underscores ignored."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@functools.lru_cache(maxsize=None)
def _font_table():
    """{display name: file} of the TrueType fonts matplotlib ships (the same on every machine, unlike the
    system's) that draw ten distinct, non-blank digits; symbol fonts and Last Resort's boxes fall out."""
    from PIL import ImageFont

    table = {}
    folder = font_dir()
    for fname in sorted(os.listdir(folder)):
        if not fname.lower().endswith(".ttf"):
            continue
        path = os.path.join(folder, fname)
        try:
            font = ImageFont.truetype(path, 32)
        except OSError:  # a font file FreeType cannot read: not offered
            continue
        family, style = font.getname()
        if not _draws_digits(path):
            continue
        glyphs = [_draw_glyph(font, str(d), 48, 0, (0, 0)) for d in range(NUM_LABELS)]
        if any(g.max() == 0 for g in glyphs) or len({g.tobytes() for g in glyphs}) < NUM_LABELS:
            continue
        style = "" if style in ("Regular", "Book", "Roman", "Normal") else style
        table[f"{family} {style}".strip()] = path
    return table


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _draws_digits(path):
    """Whether the characters 0..9 map to glyphs named as digits (PostScript names: "zero", "sevenoldstyle").
    TeX's symbol fonts (cmsy10, cmex10) map them to a prime, brackets and the like; a font without glyph
    names is judged by its drawings alone."""
    from matplotlib.ft2font import FT2Font

    try:
        ft = FT2Font(path)
        charmap = ft.get_charmap()
        names = [ft.get_glyph_name(charmap[ord(str(d))]) if ord(str(d)) in charmap else None
                 for d in range(NUM_LABELS)]
    except (OSError, RuntimeError, ValueError):  # a file FreeType cannot read: not offered
        return False
    if any(n is None for n in names):
        return False
    return not any(names) or all(n.startswith(d) for n, d in zip(names, DIGIT_NAMES))


def font_names():
    """The names ``font:NAME`` accepts, sorted."""
    return sorted(_font_table(), key=str.lower)


def find_font(name):
    """(display name, file) of a shipped font, by name ("DejaVu Serif Bold") or file stem ("DejaVuSerif-Bold")."""
    table = _font_table()
    by_key = {_key(n): n for n in table}
    by_key.update({_key(os.path.splitext(os.path.basename(p))[0]): n for n, p in table.items()})
    found = by_key.get(_key(name))
    if found is None:
        raise StyleDataError(f"font {name!r} is not among the fonts matplotlib ships; choose one of: "
                             f"{', '.join(font_names())}")
    return found, table[found]


def _draw_glyph(font, char, canvas, stroke, offset):
    """One character, ink 255 on 0, centred on a square page of side ``canvas`` plus ``offset``: uint8 array."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text((canvas / 2 + offset[0], canvas / 2 + offset[1]), char, fill=255, font=font,
                             anchor="mm", stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


def render_font(spec, per_label=FONT_PER_LABEL, seed=0, labels=range(NUM_LABELS)):
    """("font:NAME" resolved, [(label, page)]): ``per_label`` pages of each digit, dark ink on a white
    FONT_CANVAS page as a scan would be, with size, position and stroke drawn from a generator seeded
    by ``seed`` (the same seed, the same pages)."""
    from PIL import ImageFont

    name, path = find_font(spec[len("font:"):] if spec.startswith("font:") else spec)
    if not 1 <= per_label <= FONT_PER_LABEL_MAX:
        raise StyleDataError(f"images per label (--per-label) must be in 1..{FONT_PER_LABEL_MAX}, got {per_label}")
    if not 0 <= seed < 2 ** 63:
        raise StyleDataError(f"the seed must be in 0..2**63-1, got {seed}")
    rng = np.random.default_rng(seed)
    fonts = {}
    pages = []
    for label in labels:
        for _ in range(per_label):
            size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
            stroke = int(rng.choice(FONT_STROKES))
            offset = tuple(int(v) for v in rng.integers(-FONT_SHIFT, FONT_SHIFT + 1, size=2))
            if size not in fonts:
                fonts[size] = ImageFont.truetype(path, size)
            pages.append((label, 255 - _draw_glyph(fonts[size], str(label), FONT_CANVAS, stroke, offset)))
    return "font:" + name, pages


def _load_font(spec, per_label, seed):
    name, pages = render_font(spec, per_label, seed)
    images, inverted = [], 0
    for label, page in pages:
        arr, inv = _mnist_like(page.astype(np.float32) / 255.0, f"{name} digit {label}")
        images.append(arr)
        inverted += inv
    labels = torch.tensor([label for label, _ in pages], dtype=torch.int64)
    return StyleData(torch.from_numpy(np.stack(images)), labels, name, inverted)


def write_font_folder(spec, folder, per_label=FONT_PER_LABEL, seed=0):
    """Render ``spec`` ("font:NAME") into ``folder``/0..9/NNNN.png (dark on white pages, the layout
    load_style_data reads). Everything is rendered before the first file is written; ``folder`` must
    not exist or be empty. Returns (font name, number of files)."""
    folder = str(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or _visible(os.listdir(folder))):
        raise StyleDataError(f"{folder!r} already exists and is not an empty folder; pass a new folder")
    name, pages = render_font(spec, per_label, seed)
    from PIL import Image

    count = {}
    for label, page in pages:
        i = count[label] = count.get(label, -1) + 1
        path = os.path.join(folder, str(label), f"{i:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp, page=page: Image.fromarray(page).save(tmp, format="PNG"))
    return name, len(pages)


# ------------------------------------------------------------------ loading, splitting

def load_style_data(spec, *, per_label=FONT_PER_LABEL, seed=0, log=print):
    """The style data set ``spec`` names: a folder of 0..9 subfolders, an .npz, or "font:NAME".

    Every image is read, checked and preprocessed here (nothing is written); ``log`` gets one summary
    line (images per label, how many were inverted). ``per_label`` and ``seed`` are for fonts."""
    spec = str(spec)
    if spec.startswith("font:"):
        data = _load_font(spec, per_label, seed)
    elif not os.path.exists(spec):
        raise StyleDataError(f"{spec!r} not found: pass a folder of 0..9 subfolders of images, an .npz, or "
                             "font:NAME")
    elif os.path.isdir(spec):
        data = _load_folder(spec)
    elif spec.lower().endswith(".npz"):
        data = _load_npz(spec)
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


# ------------------------------------------------------------------ the training set

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
    # real digits, not a hundred that the fine-tune would learn by heart (the others' distance grew 37% so)
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
