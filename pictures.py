"""Pictures people look at, and the samples .npz beside them: one layout, one font, one scale.

    save_grid(images, "out/samples.png", nrow=10)          # denoise.py's grid: a column per label
    preview_png({"base": a, "adapter": b}, labels, "out/lora/previews/step_0050.png", "step 50")
    data_preview_png(images, labels, "out/lora/data_preview.png", title="...")   # a row per label of a data set
    process_figure(frames, labels, "out/samples_process.png")                   # noise -> digit, a row per label
    write_samples_npz("out/samples.npz", images, labels)    # read back with read_samples_npz
    settings = read_png_settings("out/samples.png")         # what save_grid wrote under SETTINGS_KEY, checked

Every picture for people draws 28-pixel digits upscaled nearest-neighbour (PREVIEW_SCALE in files, PAGE_SCALE
on the page) with DejaVu Sans labels, so a digit stays a digit and a label is readable at a glance. Nothing
here samples or trains: the callers hand in uint8 images.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib

import numpy as np
import torch

from files import atomic_write
from inputs import InputError, npz_members, read_regular

DIGIT_SIZE = 28
PREVIEW_SCALE = 3  # in files: 28-pixel digits drawn 84 pixels high, nearest-neighbour: readable at a glance
PAGE_SCALE = 4  # on the page, where the grid sits beside widgets and a browser may shrink it
PAGE_LABEL_SIZE = 22  # pixels: the labels drawn into the page's pictures
PREVIEW_PAD = 4
GRID_PAD = 2  # between the tiles of a plain grid (save_grid): a 28x28 digit takes 30 pixels
GRID_BACKGROUND = 64  # dark grey between tiles, so a black digit's edge shows


# ------------------------------------------------------------------ the font

def font_dir():
    """matplotlib's TrueType folder: the same fonts on every machine, unlike the system's."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


def label_font(size):
    """DejaVu Sans at ``size`` pixels, from matplotlib's own fonts: the text of every picture for people."""
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(font_dir(), "DejaVuSans.ttf"), size)


# ------------------------------------------------------------------ the grid

def tile_grid(images_u8, nrow=10, pad=GRID_PAD):
    """uint8 images (N, H, W) tiled row-major, ``nrow`` per row, on a dark grey canvas: uint8 (rows, cols)."""
    n, h, w = images_u8.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), GRID_BACKGROUND, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images_u8[i]
    return canvas


def column_order(num_labels, n_per_label):
    """Indices that turn samples drawn label by label (``n_per_label`` each) into rows of one per label."""
    return torch.arange(num_labels * n_per_label).view(num_labels, n_per_label).T.flatten()


def label_columns(images, num_labels, n_per_label):
    """denoise.py's layout: one column per label, ``n_per_label`` rows, as one uint8 picture (numpy)."""
    return tile_grid(images[column_order(num_labels, n_per_label)], nrow=num_labels).numpy()


def save_grid(images_u8, path, nrow=10, pad=GRID_PAD, text=None):
    """Tile uint8 images (N, H, W) into one PNG, row-major, ``nrow`` per row, written atomically.

    ``text`` ({key: value}) goes into the PNG as text chunks, readable with Pillow (``Image.open(p).text``),
    as AUTOMATIC1111 stores a picture's settings under "parameters"."""
    save_picture(tile_grid(images_u8, nrow, pad).numpy(), path, text)


def save_picture(picture, path, text=None):
    """A uint8 picture (numpy, as annotate draws it) as a PNG with ``text`` ({key: value}) as its text chunks,
    as save_grid writes them; atomically."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    atomic_write(path, lambda tmp: Image.fromarray(picture, mode="L").save(tmp, format="PNG", pnginfo=info))
    return path


# ------------------------------------------------------------------ a picture's settings, back from its PNG

SETTINGS_KEY = "sd-settings"  # the PNG text chunk holding the settings that drew a picture, as JSON
SETTINGS_VERSION = 1
PNG_MAX_BYTES = 64 << 20  # a grid of 10,000 digits is a few MB; more is not one of our pictures
SETTINGS_MAX_BYTES = 64 << 10  # the settings are a few hundred bytes; a long list of adapters fits many times
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# every key the settings hold and the JSON types its value may have (None: JSON null); the values' ranges are
# checked where they are used, by the same checks as the flags they came from
_NUM, _STR = (int, float), (str,)
PNG_SETTINGS_FIELDS = {
    "version": (int,), "ckpt": _STR, "weights": _STR, "lora": (list,), "lora_weight": _NUM, "merge": (bool,),
    "force": (bool,), "labels": _STR, "n_per_label": (int,), "seed": (int,), "precision": _STR, "sample": (dict,),
    "init": (str, type(None)), "strength": (int, float, type(None)),
}
SETTINGS_FIX = "pass a PNG that denoise.py wrote (it keeps its settings as PNG text), or give the flags yourself"


def settings_text(settings):
    """``settings`` ({key: value}, PNG_SETTINGS_FIELDS' keys) as the JSON save_grid stores under SETTINGS_KEY."""
    return json.dumps({"version": SETTINGS_VERSION, **settings}, sort_keys=True, ensure_ascii=True)


def _png_text(data, where):
    """{key: bytes} of the tEXt chunks of a PNG's bytes, each chunk's CRC checked (a byte changed by hand or by
    a damaged copy is refused, not half-read); an InputError if the bytes are no PNG or end mid-chunk."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError(f"{where} is not a PNG file; {SETTINGS_FIX}")
    out, pos = {}, len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise InputError(f"{where} ends inside a chunk header (truncated); {SETTINGS_FIX}")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise InputError(f"{where} ends inside its {kind!r} chunk (truncated); {SETTINGS_FIX}")
        if kind == b"tEXt":
            body = data[pos + 8:pos + 8 + length]
            if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
                raise InputError(f"{where}: a text chunk is damaged (its checksum does not match); {SETTINGS_FIX}")
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value
        elif kind == b"IEND":
            break
        pos = end
    return out


def read_png_settings(path, flag="--from-png"):
    """The settings save_grid stored in the PNG ``path`` (under SETTINGS_KEY), as a dict with exactly the keys of
    PNG_SETTINGS_FIELDS, each of its JSON type. At most PNG_MAX_BYTES are read, and no pixel is decoded. A file
    that is no PNG, holds no settings of ours, or holds them damaged or changed is one InputError naming it."""
    where = f"{flag} {str(path)!r}"
    chunks = _png_text(read_regular(path, flag, PNG_MAX_BYTES), where)
    raw = chunks.get(SETTINGS_KEY)
    if raw is None:
        raise InputError(f"{where} holds no {SETTINGS_KEY!r} text (not written by denoise.py, or its text was "
                         f"stripped); {SETTINGS_FIX}")
    if len(raw) > SETTINGS_MAX_BYTES:
        raise InputError(f"{where}: its settings are {len(raw):,} bytes, more than the {SETTINGS_MAX_BYTES:,} they "
                         f"can be; {SETTINGS_FIX}")
    try:
        settings = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{where}: its settings are not JSON ({str(e).splitlines()[0]}); {SETTINGS_FIX}") from None
    if not isinstance(settings, dict):
        raise InputError(f"{where}: its settings are not a JSON object; {SETTINGS_FIX}")
    if settings.get("version") != SETTINGS_VERSION:
        raise InputError(f"{where}: settings version {settings.get('version')!r}, this code reads version "
                         f"{SETTINGS_VERSION}; {SETTINGS_FIX}")
    missing = sorted(set(PNG_SETTINGS_FIELDS) - set(settings))
    unknown = sorted(set(settings) - set(PNG_SETTINGS_FIELDS))
    if missing or unknown:
        raise InputError(f"{where}: its settings lack {missing} and hold unknown {unknown}; {SETTINGS_FIX}")
    for key, kinds in PNG_SETTINGS_FIELDS.items():
        value = settings[key]
        # bool is an int to Python, never to these settings: true is no seed
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise InputError(f"{where}: setting {key!r} is {json.dumps(value)[:40]}, which is not of its type; "
                             f"{SETTINGS_FIX}")
    if not all(isinstance(v, str) for v in settings["lora"]):
        raise InputError(f"{where}: setting 'lora' must be a list of PATH:WEIGHT texts; {SETTINGS_FIX}")
    return settings


def annotate(picture, col_titles=(), row_titles=(), cell=DIGIT_SIZE + GRID_PAD, pad=GRID_PAD, title=None):
    """A tiled picture (uint8 numpy) upscaled PAGE_SCALE x with a label above each column and left of each row."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(picture).resize((picture.shape[1] * PAGE_SCALE, picture.shape[0] * PAGE_SCALE),
                                          Image.NEAREST)
    # labels this large because a browser shrinks a 10-column grid about twofold beside the page's controls
    font = label_font(PAGE_LABEL_SIZE)
    top = (PAGE_LABEL_SIZE + 8) * (bool(col_titles) + bool(title))
    left = 2 * PAGE_LABEL_SIZE + 8 if row_titles else 0
    width = img.width + left
    if title:  # a grid of one label is narrower than its title: widen the white margin, not the grid
        width = max(width, left + 8 + int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(title, font=font)))
    out = Image.new("L", (width, img.height + top), 255)
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((left + 4, 3), title, fill=0, font=font)
    step = (cell + pad) * PAGE_SCALE
    for i, text in enumerate(col_titles):
        draw.text((left + pad * PAGE_SCALE + i * step + 4, top - PAGE_LABEL_SIZE - 5), str(text), fill=0, font=font)
    for i, text in enumerate(row_titles):
        draw.text((4, top + pad * PAGE_SCALE + i * step + step // 3), str(text), fill=0, font=font)
    return np.asarray(out)


# ------------------------------------------------------------------ previews: a row per model, a column per label

PREVIEW_LEFT = 96  # room for the row names
PREVIEW_TOP = 56  # room for the title and the column labels


def preview_size(num_rows, num_cols, side=DIGIT_SIZE):
    """(width, height) in pixels of ``preview_png``'s picture for rows x columns of ``side``-pixel images."""
    cell = side * PREVIEW_SCALE + PREVIEW_PAD
    return PREVIEW_LEFT + num_cols * cell + PREVIEW_PAD, PREVIEW_TOP + num_rows * cell + PREVIEW_PAD


def preview_png(rows, labels, path, title):
    """A grid a person reads at a glance: one row per entry of ``rows`` ({name: uint8 (C, H, W)}), one
    column per label, each image upscaled PREVIEW_SCALE times nearest-neighbour, the row names on the
    left, the labels above, ``title`` on top; written atomically."""
    from PIL import Image, ImageDraw

    names = list(rows)
    num_cols, side = len(labels), next(iter(rows.values())).shape[-1]
    width, height = preview_size(len(names), num_cols, side)
    cell = side * PREVIEW_SCALE + PREVIEW_PAD
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    font, small = label_font(15), label_font(13)
    draw.text((PREVIEW_PAD, 6), title, fill=0, font=font)
    for c, label in enumerate(labels):
        text = str(int(label))
        draw.text((PREVIEW_LEFT + c * cell + (cell - draw.textlength(text, font=small)) / 2, PREVIEW_TOP - 22),
                  text, fill=0, font=small)
    for r, name in enumerate(names):
        y = PREVIEW_TOP + r * cell
        draw.text((PREVIEW_PAD, y + cell // 2 - 8), name, fill=0, font=small)
        imgs = rows[name]
        for c in range(num_cols):
            tile = Image.fromarray(imgs[c].cpu().numpy()).resize(
                (side * PREVIEW_SCALE, side * PREVIEW_SCALE), Image.NEAREST)
            canvas.paste(tile, (PREVIEW_LEFT + c * cell + PREVIEW_PAD, y + PREVIEW_PAD))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


def weight_sweep_png(images_by_weight, labels, path, title):
    """denoise.py's lora_weight_sweep.png: a row per adapter weight ({weight: uint8 (C, H, W)}), a column per label."""
    return preview_png({f"weight {w:g}": imgs for w, imgs in images_by_weight.items()}, labels, path, title)


def weight_sweep_picture(images_by_weight, labels, title):
    """The page's sweep: a row per label, a column per weight ({weight: uint8 (C, H, W)}), annotated (numpy)."""
    weights = list(images_by_weight)
    grid = torch.stack([images_by_weight[w] for w in weights], dim=1).flatten(0, 1)  # (labels x weights, H, W)
    return annotate(tile_grid(grid, nrow=len(weights)).numpy(), [f"{w:g}" for w in weights], labels, title=title)


# ------------------------------------------------------------------ a data set: a row per label

DATA_PREVIEW_NAME = "data_preview.png"  # beside the adapter: what the fine-tune trains on
DATA_PREVIEW_LABEL_WIDTH = 120  # the left column: the label and its note
DATA_PREVIEW_TITLE_HEIGHT = 28
DATA_PREVIEW_PER_ROW = 12


def data_preview_size(num_rows, num_cols=DATA_PREVIEW_PER_ROW):
    """(width, height) of the picture data_preview_png draws for ``num_rows`` labels of up to ``num_cols`` digits."""
    cell = DIGIT_SIZE * PREVIEW_SCALE + PREVIEW_PAD
    return (DATA_PREVIEW_LABEL_WIDTH + num_cols * cell + PREVIEW_PAD,
            DATA_PREVIEW_TITLE_HEIGHT + num_rows * cell + PREVIEW_PAD)


def data_preview_png(images, labels, path, *, title="", notes=None, per_row=DATA_PREVIEW_PER_ROW):
    """A PNG of what the model trains on: a row per label (the first ``per_row`` of its images), the label
    and ``notes[label]`` (e.g. "12 images", "MNIST") at the left, ``title`` on top; digits upscaled
    PREVIEW_SCALE times, nearest-neighbour. Written atomically. Returns its (width, height)."""
    from PIL import Image, ImageDraw

    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    rows = sorted(set(labels.tolist()))
    width, height = data_preview_size(len(rows), per_row)
    canvas = Image.new("L", (width, height), 40)
    draw = ImageDraw.Draw(canvas)
    big, small = label_font(28), label_font(13)
    draw.text((PREVIEW_PAD, DATA_PREVIEW_TITLE_HEIGHT // 2), title, fill=255, font=small, anchor="lm")
    side = DIGIT_SIZE * PREVIEW_SCALE
    cell = side + PREVIEW_PAD
    for r, label in enumerate(rows):
        top = DATA_PREVIEW_TITLE_HEIGHT + r * cell
        draw.text((PREVIEW_PAD + 4, top + cell // 2 - 10), str(label), fill=255, font=big, anchor="lm")
        if notes and notes.get(label):
            draw.text((PREVIEW_PAD + 4, top + cell // 2 + 18), notes[label], fill=200, font=small, anchor="lm")
        for c, i in enumerate(torch.nonzero(labels == label).flatten()[:per_row].tolist()):
            digit = Image.fromarray(images[i].numpy()).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(digit, (DATA_PREVIEW_LABEL_WIDTH + c * cell, top + PREVIEW_PAD))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return width, height


def training_preview_png(path, style, tset, prior_weight):
    """data_preview.png for a fine-tune: a row per label of the style's preprocessed images (a styles.StyleData,
    as the model sees them, before augmentation) and of the prior's real digits (from ``tset``, a
    style_training.TrainingSet), each row saying which, and a title with the set."""
    counts = style.counts()
    prior_rows = tset.prior_labels
    images = torch.cat([style.images, tset.images[tset.num_style:]])
    labels = torch.cat([style.labels, tset.labels[tset.num_style:]])
    notes = {c: f"{counts[c]} images" for c in style.present()}
    notes.update({c: "MNIST (prior)" for c in prior_rows})
    how = (f"augmented to x{tset.copies}" if tset.augmented else
           f"repeated x{tset.copies}" if tset.copies > 1 else "as they are")
    prior = f"; real digits of {','.join(map(str, prior_rows))} at prior weight {prior_weight:g}" if prior_rows else ""
    title = (f"{style.name}: {len(style)} images, {style.inverted} inverted, {how}{prior}; "
             f"what the fine-tune trains on, {PREVIEW_SCALE}x nearest-neighbour")
    return data_preview_png(images, labels, path, title=title, notes=notes)


# ------------------------------------------------------------------ the denoising process

PROCESS_MAX_ROWS = 20  # rows of the denoising-process figure: matplotlib takes seconds per hundred axes


def process_rows(labels, n_per_label):
    """Indices of the samples the process figure shows: the first sample of each label asked for.

    ``--n-per-label 50`` draws 50 samples a label, but the figure keeps one row per label (at
    most PROCESS_MAX_ROWS), so it stays readable and is written in a second, whatever the count."""
    return [i * n_per_label for i in range(min(len(labels), PROCESS_MAX_ROWS))]


def process_figure(frames, labels, path, show=False):
    """One row per label, columns from pure noise to the final digit (the tutorial's figure).

    ``frames`` is a list of uint8 (rows, H, W) tensors, one per column; ``labels`` one per row."""
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    rows, cols = len(labels), len(frames)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(frames[c][r].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(labels[r]), rotation=0, labelpad=10)
    axes[0][0].set_title("noise", fontsize=8)
    axes[0][-1].set_title("digit", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    if show:
        plt.show()
    plt.close(fig)


# ------------------------------------------------------------------ the samples .npz

SAMPLES_NPZ_FIX = "it needs images uint8 (N, H, W) and labels (N,) as denoise.py writes them"


def write_samples_npz(path, images, labels, settings=None):
    """images uint8 (N, H, W) and labels int64 (N,), and ``settings`` ({key: value}) as one JSON string when
    given, compressed and written atomically: what denoise.py, the page and a user's style set share."""
    arrays = {"images": np.asarray(images, dtype=np.uint8), "labels": np.asarray(labels).astype(np.int64)}
    if settings is not None:
        arrays["settings"] = np.array(json.dumps(settings))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)
    return path


def check_samples_labels(path, labels, count, num_classes, error):
    """The labels of an .npz of digits (denoise.py's, or a user's style set): ``count`` whole numbers in
    0..num_classes-1 (num_classes None: not known yet, only >= 0); ``error`` is the caller's UserError class."""
    if labels.shape != (count,):
        raise error(f"{path!r}: labels have shape {labels.shape}, expected ({count},)")
    # only real numbers, and nothing a cast would change: NaN, fractions, imaginary parts, strings
    if labels.dtype.kind not in "iu":
        raise error(f"{path!r}: labels must be integers, found dtype {labels.dtype}")
    if labels.min() < 0 or num_classes is not None and labels.max() >= num_classes:
        raise error(f"{path!r}: labels must be in 0..{'C-1' if num_classes is None else num_classes - 1}, found "
                    f"{labels.min()}..{labels.max()}")


def _whole_uint8(path, images, error):
    """Images of another dtype as uint8 when the cast changes nothing (whole numbers in 0..255); ``error`` else."""
    if images.dtype.kind not in "iuf":
        raise error(f"{path!r}: images must be uint8 in 0..255, found dtype {images.dtype}")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise error(f"{path!r}: images hold NaN or infinite values; they must be uint8 in 0..255")
    if images.min() < 0 or images.max() > 255 or (images.dtype.kind == "f" and (images % 1 != 0).any()):
        raise error(f"{path!r}: images must be whole numbers in 0..255 as uint8 (found {images.dtype} "
                    f"{images.min()}..{images.max()})")
    return images.astype(np.uint8)


def read_samples_npz(path, error, *, num_classes=None, size=None, exact_dtype=False, fix=SAMPLES_NPZ_FIX,
                     what="the .npz"):
    """(images uint8 (N, H, W), labels int64 (N,)) of an .npz as write_samples_npz writes it, checked; every
    problem is one ``error`` (the caller's UserError class) naming the file and ``fix``.

    ``num_classes`` and ``size`` None: the checks that need them are left out (before a data set is loaded).
    Images of another dtype are taken when a cast to uint8 changes nothing, unless ``exact_dtype``.
    Pickled arrays are refused: loading one would run code. Shapes and dtypes are checked from the members'
    headers first (inputs.npz_members, naming the file as ``what``), before any array is read."""
    expected = "(N, H, W)" if size is None else f"(N, {size}, {size})"
    try:
        members = npz_members(path, what)
    except InputError as e:
        raise error(str(e)) from None
    shape, dtype = members.get("images", ((), None))
    if "images" in members and (exact_dtype and dtype != np.uint8 or len(shape) != 3
                                or size is not None and tuple(shape[1:]) != (size, size)):
        raise error(f"{path!r}: images have shape {shape} and dtype {dtype}, expected {expected}; {fix}")
    if "images" in members and "labels" in members and tuple(members["labels"][0]) != tuple(shape[:1]):
        raise error(f"{path!r}: labels have shape {members['labels'][0]}, the images {shape}; {fix}")
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise error(f"{path!r} holds a single array (.npy), not an .npz; {fix}")
        with z:
            missing = sorted({"images", "labels"} - set(z.files))
            if missing:
                raise error(f"{path!r} lacks {missing} (it has {sorted(z.files)}); {fix}")
            images, labels = z["images"], z["labels"]
    except error:
        raise
    # not a zip, a damaged member, a pickled object
    except (ValueError, OSError, EOFError, zlib.error, struct.error, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{path!r} is not a readable .npz ({why}); {fix}") from None
    if exact_dtype and images.dtype != np.uint8:
        raise error(f"{path!r}: images have dtype {images.dtype}; {fix} (convert with "
                    "np.clip(images, 0, 255).astype(np.uint8))")
    if images.ndim != 3 or size is not None and images.shape[1:] != (size, size):
        raise error(f"{path!r}: images have shape {images.shape}, expected {expected}; {fix}")
    if len(images) == 0:
        raise error(f"{path!r} holds no images (no samples); {fix}")
    check_samples_labels(path, labels, len(images), num_classes, error)
    if images.dtype != np.uint8:
        images = _whole_uint8(path, images, error)
    return images, labels.astype(np.int64)
