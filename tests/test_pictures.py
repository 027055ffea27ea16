"""pictures.py: the grid's column order, the samples .npz written and read back by its one writer and reader."""
import json

import numpy as np
import pytest
import torch

import pictures
from errors import UserError


class NpzError(UserError):
    pass


def test_label_columns_puts_each_label_in_its_column():
    # drawn label by label, 2 each: 0 0 1 1 2 2; the picture holds a column per label
    images = torch.stack([torch.full((28, 28), 10 * i, dtype=torch.uint8) for i in range(6)])
    picture = pictures.label_columns(images, 3, 2)
    cell = 28 + pictures.GRID_PAD
    got = [[int(picture[pictures.GRID_PAD + r * cell, pictures.GRID_PAD + c * cell]) for c in range(3)]
           for r in range(2)]
    assert got == [[0, 20, 40], [10, 30, 50]]


def test_samples_npz_round_trip_keeps_images_labels_and_settings(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = pictures.write_samples_npz(tmp_path / "s.npz", images, labels, {"seed": 7, "sampler": "ddim"})
    got_images, got_labels = pictures.read_samples_npz(path, NpzError, num_classes=10, size=28)
    assert np.array_equal(got_images, images) and got_images.dtype == np.uint8
    assert np.array_equal(got_labels, labels) and got_labels.dtype == np.int64
    with np.load(path) as z:
        assert json.loads(str(z["settings"])) == {"seed": 7, "sampler": "ddim"}


@pytest.mark.parametrize("arrays, exact, message", [
    (dict(images=np.zeros((2, 28, 28)), labels=np.arange(2)), True, "dtype float64"),
    (dict(images=np.full((2, 28, 28), 0.5), labels=np.arange(2)), False, "whole numbers"),
    (dict(images=np.zeros((2, 28, 28), np.uint8), labels=np.arange(2)[::-1] + 9), False, "found 9..10"),
    (dict(images=np.zeros((2, 32, 32), np.uint8), labels=np.arange(2)), False, "expected (N, 28, 28)"),
    (dict(images=np.array([object()] * 2), labels=np.arange(2)), False, "holds Python objects"),
])
def test_reader_names_the_file_and_the_problem(tmp_path, arrays, exact, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(NpzError, match="bad.npz") as e:
        pictures.read_samples_npz(str(path), NpzError, num_classes=10, size=28, exact_dtype=exact)
    assert message in str(e.value)


def test_whole_float_images_are_taken_as_uint8_unless_exact(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, images=np.full((2, 28, 28), 255.0), labels=np.arange(2))
    images, _ = pictures.read_samples_npz(str(path), NpzError)
    assert images.dtype == np.uint8 and images.max() == 255
