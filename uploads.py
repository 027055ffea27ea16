"""The page's own style data: uploaded images and zips, and digits drawn on the page, read as --data reads a folder.

    up = read_uploads([("7_a.png", "/tmp/x"), ("set.zip", "/tmp/y")], drawn=[(4, pil_image)])
    up.bad                                   # "name: why" of every file refused; nothing is trained while any is
    npz, preview = write_style_data(up, "out/app/styles", "mine")   # what lora_finetune.py --data reads

Each image goes through styles.read_digit and is labelled by styles.label_from_name, so a file gives the same
digit and label here as in `lora_finetune.py --data FOLDER`. An upload can be anything, so every size is
counted while it is read, never taken from a header: a zip entry is read in chunks and dropped past
MAX_FILE_BYTES, and the whole upload stops at MAX_UPLOAD_BYTES unpacked; memory stays within those.
"""
from __future__ import annotations

import dataclasses
import io
import os
import struct
import zipfile
import zlib

import numpy as np

from errors import UserError
from pictures import data_preview_png, write_samples_npz
from style_training import MIN_STYLE_IMAGES
from styles import StyleDataError, label_from_name, preprocess_image, read_digit

MAX_UPLOAD_FILES = 2000  # images in one fine-tune (files, or entries of a zip)
MAX_FILE_BYTES = 5 * 2**20  # one image
MAX_UPLOAD_BYTES = 100 * 2**20  # everything uploaded at once, zips unpacked
MAX_DIRECTORY_BYTES = MAX_UPLOAD_FILES * 400  # a zip's table of contents: 46 bytes an entry, and its name
CHUNK = 2**16  # a zip entry is unpacked this much at a time: a lying header cannot make one read large
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # the file picker's filter
LABEL_HINT = "put it in a folder 0..9 or start its name with the digit, e.g. 7_a.png"


class UploadError(UserError):
    """An upload refused as a whole: over a limit. The message says which and what to send instead."""


@dataclasses.dataclass
class Upload:
    images: np.ndarray  # uint8 (N, 28, 28), ink bright on dark
    labels: np.ndarray  # int64 (N,)
    names: list
    bad: list  # "name: why" of each file refused

    def __len__(self):
        return len(self.labels)

    def counts(self):
        return np.bincount(self.labels, minlength=10)


class _Reader:
    """What has been read so far, against the limits: files and unpacked bytes."""

    def __init__(self):
        self.files = self.bytes = 0
        self.images, self.labels, self.names, self.bad = [], [], [], []

    def count_file(self):
        self.files += 1
        if self.files > MAX_UPLOAD_FILES:
            raise UploadError(f"more than {MAX_UPLOAD_FILES} files; send fewer")

    def read(self, f, name):
        """The bytes of the open file ``f``, counted as they come; None (and ``name`` in ``bad``) past
        MAX_FILE_BYTES, an UploadError past MAX_UPLOAD_BYTES in all."""
        parts, size = [], 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            self.bytes += len(chunk)
            if self.bytes > MAX_UPLOAD_BYTES:
                raise UploadError(f"the uploads unpack to over {MAX_UPLOAD_BYTES // 2**20} MB (at {name}); send "
                                  "fewer files")
            if size > MAX_FILE_BYTES:
                self.bad.append(f"{name}: larger than {MAX_FILE_BYTES // 2**20} MB unpacked")
                return None
            parts.append(chunk)

    def add(self, name, data, inner=None):
        """Decode and label one file's bytes; a refusal goes into ``bad``."""
        label = label_from_name(inner or name)
        if label is None:
            self.bad.append(f"{name}: no label ({LABEL_HINT})")
            return
        try:
            image, _ = read_digit(io.BytesIO(data), name)
        except StyleDataError as e:  # its message names the file
            self.bad.append(str(e))
            return
        self.images.append(image)
        self.labels.append(label)
        self.names.append(name)


def _hidden(name):
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


def _check_directory(name, path):
    """zipfile reads a zip's whole table of contents before its first entry: one larger than MAX_UPLOAD_FILES
    entries need is refused first, from the end record that says its size (a 100 MB upload could hold two
    million empty entries, a GB of Python objects)."""
    with open(path, "rb") as f:
        end = zipfile._EndRecData(f)  # zipfile's own reader of that record; None: not a zip
    if end is not None and end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
        raise UploadError(f"{name} lists more files than {MAX_UPLOAD_FILES} could ({end[zipfile._ECD_SIZE]:,} bytes "
                          "of file names); send fewer files")


def _read_zip(reader, name, path):
    try:
        _check_directory(name, path)
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.is_dir() or _hidden(info.filename):
                    continue
                reader.count_file()
                where = f"{name}/{info.filename}"
                try:
                    with z.open(info) as f:
                        data = reader.read(f, where)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
                    # a damaged entry, another compression, a password: that entry, not the rest
                    reader.bad.append(f"{where}: not readable from the zip ({str(e) or type(e).__name__})")
                    continue
                if data is not None:
                    reader.add(where, data, inner=info.filename)
    except UploadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, ValueError) as e:
        reader.bad.append(f"{name}: not a readable zip ({type(e).__name__})")


def read_uploads(files, drawn=()):
    """Images and labels from uploaded files (images or zips) and drawn digits.

    ``files`` is a list of (name, path), the name as the visitor's machine called it; ``drawn`` a list of
    (label, image). Every file that is not a labelled image is named in ``bad``."""
    reader = _Reader()
    for name, path in files or []:
        if name.lower().endswith(".zip"):
            _read_zip(reader, name, path)
            continue
        reader.count_file()
        with open(path, "rb") as f:
            data = reader.read(f, name)
        if data is not None:
            reader.add(name, data)
    for i, (label, img) in enumerate(drawn or []):
        try:
            reader.images.append(preprocess_image(img, f"drawn #{i + 1}"))
        except StyleDataError as e:
            reader.bad.append(str(e))
            continue
        reader.labels.append(int(label))
        reader.names.append(f"drawn #{i + 1}")
    images = np.stack(reader.images) if reader.images else np.zeros((0, 28, 28), np.uint8)
    return Upload(images, np.asarray(reader.labels, dtype=np.int64), reader.names, reader.bad)


def check_trainable(upload):
    """An UploadError unless ``upload`` can be trained on: no file refused, at least MIN_STYLE_IMAGES (the one
    minimum of --data and evaluate.py --style-data, so that what the page trains can be scored)."""
    if upload.bad:
        raise UploadError(f"{len(upload.bad)} file(s) refused, nothing is trained: " + "; ".join(upload.bad[:10]))
    if len(upload) < MIN_STYLE_IMAGES:
        raise UploadError(f"{len(upload)} image(s): upload or draw at least {MIN_STYLE_IMAGES}")


def write_style_data(upload, folder, name):
    """What the fine-tune reads (FOLDER/NAME.npz, as --data takes it) and its preview picture; returns both paths."""
    check_trainable(upload)
    npz = os.path.join(folder, f"{name}.npz")
    preview = os.path.join(folder, f"{name}_data.png")
    write_samples_npz(npz, upload.images, upload.labels)
    data_preview_png(upload.images, upload.labels, preview, title=f"{name}: {len(upload)} images",
                     notes={d: f"{c} images" for d, c in enumerate(upload.counts()) if c})
    return npz, preview


def sketch_to_image(value):
    """A Sketchpad's value (dark strokes on a light or transparent canvas) as a grey PIL image, or None if blank."""
    from PIL import Image

    if value is None:
        return None
    arr = value.get("composite") if isinstance(value, dict) else value
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
        return None
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
