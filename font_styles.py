"""Digits rendered from a TrueType font matplotlib ships, as style data: ``--style font:NAME``.

    font_names()                                      # the names font:NAME accepts
    data = load_font("font:DejaVu Serif Bold", per_label=20, seed=0)   # StyleData, made MNIST-like
    write_font_folder("font:DejaVu Serif", "my_digits", per_label=20)   # PNG files a user's folder would hold

Each page is a scan as a user would make it (dark ink on white, size, position and stroke jittered by a
seeded generator); styles.mnist_like then makes it MNIST-like, as it does a user's images.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np
import torch

from files import atomic_write
from pictures import font_dir
from styles import NUM_LABELS, StyleData, StyleDataError, mnist_like, visible_entries

FONT_PER_LABEL = 20  # images per label rendered for --style font:NAME (render-style --per-label's default)
FONT_PER_LABEL_MAX = 1000  # the pages are all rendered before the first is written: 0.26 GB at this many
FONT_CANVAS = 160  # side of a rendered glyph's page, in pixels: room for the largest size and offset below
FONT_SIZES = (72, 104)  # jitter: font size in pixels, uniform (after the fit it changes the stroke's share)
FONT_STROKES = (0, 1)  # jitter: extra stroke width in pixels (Pillow's stroke_width), one drawn uniformly
# jitter: offset of the glyph on its page, in pixels either way. It varies the pages render-style writes, as
# scans vary; the crop and the centring by mass take it out again, as they did for MNIST's writers
FONT_SHIFT = 8


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


def load_font(spec, per_label, seed):
    name, pages = render_font(spec, per_label, seed)
    images, inverted = [], 0
    for label, page in pages:
        arr, inv = mnist_like(page.astype(np.float32) / 255.0, f"{name} digit {label}")
        images.append(arr)
        inverted += inv
    labels = torch.tensor([label for label, _ in pages], dtype=torch.int64)
    return StyleData(torch.from_numpy(np.stack(images)), labels, name, inverted)


def write_font_folder(spec, folder, per_label=FONT_PER_LABEL, seed=0):
    """Render ``spec`` ("font:NAME") into ``folder``/0..9/NNNN.png (dark on white pages, the layout
    load_style_data reads). Everything is rendered before the first file is written; ``folder`` must
    not exist or be empty. Returns (font name, number of files)."""
    folder = str(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or visible_entries(os.listdir(folder))):
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
