"""A user's own digits made MNIST-like: one image decoder, one labelling rule, a folder of images, an .npz.

    DIR/0/*.png, DIR/1/*.jpg, ...     any subset of the labels 0..9, any format, size and mode Pillow reads
    DIR/7_a.png, DIR/3-b.jpg, ...     or labelled by name (label_from_name: the page's uploads follow one rule)
    FILE.npz                          images uint8 (N, 28, 28) and labels (N,), as denoise.py writes them

    digit = read_digit("my_digits/7/a.png")       # uint8 (28, 28), ink bright on dark, and whether it was inverted
    data = load_folder("my_digits")                # StyleData: images uint8 (N, 28, 28), labels, name, inverted

A font's digits are font_styles.py's, the set a fine-tune trains on (any of the three, split, grown,
with a prior) style_training.py's, and its pictures pictures.py's.

Every image goes through what made MNIST (LeCun et al. 1998): grey, ink bright on dark, cropped to the
ink, fitted into 20x20 keeping its aspect ratio (antialiased), and centred by its centre of mass in
28x28. Whatever is wrong with the data (an empty folder, a corrupt or blank image, an npz with the
wrong arrays, or in font_styles.py a font that does not exist) is one StyleDataError naming the file and the fix, raised
before anything is built or written.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import warnings
import zlib

import numpy as np
import torch

from errors import UserError
from inputs import InputError, check_regular
from pictures import read_samples_npz

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


def mnist_like(gray, where):
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
    return mnist_like(gray, where)[0]


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
    return mnist_like(gray, where)


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


def visible_entries(names):
    return sorted(n for n in names if not n.startswith("."))  # .DS_Store, editors' backups


def _folder_files(folder):
    """[(label, path)] of DIR/0..9/* and of DIR's loose files named by their label (DIR/7_a.png), labelled by
    label_from_name and sorted; StyleDataError for anything else in DIR."""
    entries = visible_entries(os.listdir(folder))
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
        for n in visible_entries(os.listdir(os.path.join(folder, sub))):
            p = os.path.join(folder, sub, n)
            if os.path.isdir(p):
                raise StyleDataError(f"{p!r} is a folder: images go directly into {os.path.join(folder, sub)!r}")
            files.append((label_from_name(os.path.join(sub, n)), p))
    if not files:
        raise StyleDataError(f"{folder!r} holds no images: put them in subfolders named by their label, "
                             f"{os.path.join(folder, '7', 'a.png')!r} and so on")
    return files


def load_folder(folder):
    images, labels, inverted = [], [], 0
    for label, path in _folder_files(folder):
        arr, inv = read_digit(path)
        images.append(arr)
        labels.append(label)
        inverted += inv
    name = "data:" + (os.path.basename(os.path.normpath(os.path.abspath(folder))) or "data")
    return StyleData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), name, inverted)


# ------------------------------------------------------------------ an .npz

def load_npz(path):
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
