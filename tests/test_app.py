"""The page: its rooms (studio.py, uploads.py, jobs.py) against denoise.py and lora_finetune.py --data, its path,
upload and argument checks, its fine-tune process, and the real page driven in headless Chromium (slow)."""
import inspect
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import app
import denoise
import jobs
import lora_finetune
import studio as studio_mod
import pictures
import styles
import style_training
import uploads
from adapter_formats import load_adapter
from config import LoraConfig, RuntimeConfig, SampleConfig, preset_config
from conftest import ROOT
from studio import PageError, Studio

CPU = torch.device("cpu")
TINY_STEPS = preset_config(SampleConfig, "tiny").steps


@pytest.fixture
def out_dir(tmp_path, tiny_adapter):
    """An --out-dir holding one adapter, out/lora, copied from the shared tiny fine-tune."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(tiny_adapter, out / "lora")
    return out


@pytest.fixture
def studio(tiny_ckpt, out_dir):
    return Studio(tiny_ckpt, out_dir, device=CPU, precision="fp32", preset="tiny", log=lambda *a: None)


@pytest.fixture
def page(studio, tiny_ckpt):
    runner = jobs.Runner(str(tiny_ckpt), "ema", "tiny", RuntimeConfig(device="cpu", precision="fp32"),
                         os.path.join(studio.out_dir, "app", "adapters"))
    yield app.Page(studio, runner)
    runner.stop()


def denoise_npz(ckpt, out, *extra):
    denoise.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--device", "cpu", "--precision", "fp32",
                  "--steps", str(TINY_STEPS), "--frames", "0", *extra])
    name = "lora_samples" if "--lora" in extra else "samples"
    with np.load(out / f"{name}.npz") as f:
        return f["images"], f["labels"], np.asarray(Image.open(out / f"{name}.png"))


# ------------------------------------------------------------------ sampling as denoise.py does

def test_sample_grid_is_denoise_grid(studio, tiny_ckpt, tmp_path):
    images, labels, png = denoise_npz(tiny_ckpt, tmp_path / "d", "--labels", "3,7", "--n-per-label", "2",
                                      "--seed", "5")
    grid = studio.sample(studio.request(["3", "7"], 2, 5))
    assert np.array_equal(grid.images.numpy(), images) and np.array_equal(grid.labels.numpy(), labels)
    assert np.array_equal(grid.picture, png)  # same layout: a column per label
    again = studio.sample(studio.request([3, 7], 2, 5))
    other = studio.sample(studio.request([3, 7], 2, 6))
    assert np.array_equal(again.display, grid.display) and not np.array_equal(other.images, grid.images)
    # the picture shown is the grid, 4x, under a strip of labels
    up = pictures.PAGE_SCALE
    h, w = (n * up for n in grid.picture.shape)
    assert np.array_equal(grid.display[-h:, :w][::up, ::up], grid.picture)
    for sampler in ("dpmpp-2m", "ddpm"):  # every sampler the page offers, as denoise.py runs it
        images, _, _ = denoise_npz(tiny_ckpt, tmp_path / sampler, "--labels", "3", "--sampler", sampler)
        assert np.array_equal(studio.sample(studio.request([3], sampler=sampler)).images.numpy(), images)
    one = studio.sample(studio.request([3]))  # narrower than its title, which is kept whole
    assert one.display.shape[1] > one.picture.shape[1] * up
    assert np.array_equal(one.display[-one.picture.shape[0] * up:, :one.picture.shape[1] * up][::up, ::up],
                          one.picture)


def test_adapter_weight_is_applied_as_denoise_applies_it(studio, tiny_ckpt, out_dir, tmp_path):
    assert [e.name for e in studio.usable()] == ["lora"]
    base = studio.sample(studio.request())
    images, _, _ = denoise_npz(tiny_ckpt, tmp_path / "d", "--lora", f"{out_dir / 'lora'}:0.5")
    half = studio.sample(studio.request(), {"lora": 0.5})
    assert np.array_equal(half.images.numpy(), images)
    assert not np.array_equal(half.images, base.images)
    assert half.settings["weights"] == {"lora": 0.5}
    # a call that names no weight is the base exactly: each call sets its own weights, nothing stays from the last
    assert np.array_equal(studio.sample(studio.request()).images, base.images)
    # beyond the sliders' span, within the one range an adapter's weight has (denoise.py --lora PATH:-3 takes it)
    assert studio.check_weights({"lora": -3}) == {"lora": -3.0}


def test_model_and_adapters_load_once(tiny_ckpt, out_dir, monkeypatch):
    loads, adapter_loads = [], []
    real, real_adapter = studio_mod.load_pipeline, studio_mod.load_adapter
    monkeypatch.setattr(studio_mod, "load_pipeline", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(studio_mod, "load_adapter", lambda *a, **k: adapter_loads.append(a) or real_adapter(*a, **k))
    s = Studio(tiny_ckpt, out_dir, device=CPU, precision="fp32", preset="tiny")
    model = s.model
    for w in (0.5, 1.0, -1.0, 2.0):
        s.sample(s.request([1]), {"lora": w})
    s.scan_adapters()  # nothing new: nothing read again
    assert len(loads) == 1 and len(adapter_loads) == 1 and s.model is model


@pytest.mark.parametrize("weights, message", [
    ({"lora": 10.5}, "from -10 to 10"), ({"lora": float("nan")}, "from -10 to 10"), ({"lora": True}, "from -10"),
    ({"lora": "x"}, "from -10 to 10, got 'x'"), ({"nope": 1.0}, "no loaded adapter named 'nope'"),
    ([("lora", 1.0)], "must be a mapping")])
def test_bad_weights_are_refused(studio, weights, message):
    with pytest.raises(PageError, match=message):
        studio.sample(studio.request(), weights)


@pytest.mark.parametrize("request_args, message", [
    (dict(labels=[]), "at least one label"), (dict(labels=["11"]), "each label must be in 0..9"),
    (dict(labels=None), None), (dict(labels="3"), "a list of digits"), (dict(labels=["a"]), "digits in 0..9"),
    (dict(n_per_label=0), "samples per label must be in 1..20"), (dict(n_per_label=1.5), "whole number"),
    (dict(seed=-1), "seed must be in"), (dict(seed=1.5), "seed must be a whole number, got 1.5"),
    (dict(seed="5"), "seed must be a whole number, got '5'"), (dict(seed=10 ** 5000), "too long to show"),
    (dict(sampler="euler"), "sampler must be one of ddim, "),
    (dict(steps=0), "steps must be in 1..50"), (dict(steps=51), "steps must be in 1..50"),
    (dict(guidance=float("inf")), "guidance must be"), (dict(guidance=101.0), "guidance must be <= 100"),
    (dict(guidance="2"), "guidance must be a number")])
def test_malformed_requests_are_page_errors(studio, request_args, message):
    if message is None:  # None is "every label", as the page starts
        assert studio.request(**request_args).labels == tuple(range(10))
        return
    with pytest.raises(PageError, match=message) as e:
        studio.request(**request_args)
    assert "\n" not in str(e.value)


def test_iter_sample_shows_estimates_then_the_grid(studio):
    req = studio.request([2, 4])
    items = list(studio_mod.iter_sample(studio, req, {"lora": 1.0}, every=1))
    final = items[-1]
    assert isinstance(final, studio_mod.Grid)
    assert np.array_equal(final.images, studio.sample(req, {"lora": 1.0}).images)
    steps = items[:-1]
    assert [s for s, _, _ in steps] == list(range(1, TINY_STEPS))  # every step but the last, which is the grid
    assert all(total == TINY_STEPS and pic.ndim == 2 for _, total, pic in steps)
    assert not np.array_equal(steps[0][2], final.display)  # an early estimate is not the result


def test_sweep_and_compare(studio):
    sweep = studio.sweep(studio.request([1, 2]), "lora")
    cell = (28 + 2) * pictures.PAGE_SCALE
    assert sweep.shape[0] >= 2 * cell and sweep.shape[1] >= len(studio_mod.SWEEP_WEIGHTS) * cell
    with pytest.raises(PageError, match="move a slider first"):
        studio.compare(studio.request())
    both = studio.compare(studio.request(), {"lora": 1.0})
    half = both.shape[1] // 2
    assert not np.array_equal(both[:, :half - 20], both[:, -(half - 20):])


def test_save_writes_grid_npz_and_settings_under_out_dir(studio, out_dir):
    grid = studio.sample(studio.request([3], seed=2), {"lora": 0.5})
    png, npz = studio.save(grid, "mine")
    # the picture as the page shows it, labelled, with denoise.py's PNG text for the same settings
    assert png == str(out_dir / "app" / "mine.png") and np.array_equal(np.asarray(Image.open(png)), grid.display)
    cli = out_dir.parent / "d"
    denoise.main(["--ckpt", grid.settings["ckpt"], "--out-dir", str(cli), "--device", "cpu", "--precision", "fp32",
                  "--labels", "3", "--seed", "2", "--frames", "0", "--lora", f"{out_dir / 'lora'}:0.5",
                  "--sampler", grid.settings["sampler"], "--steps", str(grid.settings["steps"])])
    mine, theirs = Image.open(png).text, Image.open(cli / "lora_samples.png").text
    assert mine.keys() == theirs.keys()
    assert {k: mine[k] for k in ("labels", "seed", "sampler", "steps", "guidance", "eta", "precision")} == \
        {k: theirs[k] for k in ("labels", "seed", "sampler", "steps", "guidance", "eta", "precision")}
    assert mine["lora"] == f"{os.path.realpath(out_dir / 'lora')}:0.5"
    # denoise.py --from-png on the page's PNG draws the very images
    denoise.main(["--from-png", png, "--out-dir", str(out_dir.parent / "again"), "--device", "cpu", "--frames", "0"])
    with np.load(out_dir.parent / "again" / "lora_samples.npz") as f:
        assert np.array_equal(f["images"], grid.images.numpy())
    # saving again never overwrites: the next number
    png2, npz2 = studio.save(grid, "mine")
    assert png2.endswith("mine-2.png") and npz2.endswith("mine-2.npz") and os.path.exists(png)
    with np.load(npz) as f:
        assert np.array_equal(f["images"], grid.images.numpy()) and f["labels"].tolist() == [3]
        settings = json.loads(str(f["settings"]))
    assert settings["seed"] == 2 and settings["labels"] == [3] and settings["weights"] == {"lora": 0.5}
    for bad in ("../x", "a/b", "", "/etc/x"):
        with pytest.raises(PageError, match="letters, digits"):
            studio.save(grid, bad)
    with pytest.raises(PageError, match="sample a grid first"):
        studio.save(None, "x")


def test_a_dropped_png_names_the_settings_the_page_cannot_set(page, studio, out_dir, tmp_path):
    """The page has widgets for the sampler, steps and guidance only: a PNG drawn otherwise (here plain guidance,
    --guidance-parallel 1) gets its widgets back and a line that names the rest and how to redraw it exactly; the
    page's own PNG gets none; a PNG from before the setting existed reads it as denoise.py reads it (plain)."""
    import handlers

    names = ["lora"]
    own, _ = studio.save(studio.sample(studio.request([3], seed=2)), "own")
    msg, labels, n, seed, sampler, steps, guidance, *slots = handlers.do_png_info(page, names, own)
    assert "no control" not in msg and (labels, seed, slots[0]) == (["3"], 2, 0.0)

    denoise.main(["--ckpt", str(studio.ckpt), "--out-dir", str(tmp_path / "d"), "--device", "cpu", "--precision",
                  "fp32", "--labels", "3", "--seed", "5", "--frames", "0", "--steps", str(TINY_STEPS),
                  "--guidance-parallel", "1"])
    png = str(tmp_path / "d" / "samples.png")
    msg, labels, n, seed, *_ = handlers.do_png_info(page, names, png)
    assert seed == 5 and "guidance_parallel 1.0 (here 0.5)" in msg
    assert "`python denoise.py --from-png samples.png` redraws it exactly" in msg
    sample = pictures.read_png_settings(png)["sample"]
    assert handlers.not_on_the_page(sample, studio.request().cfg) == ["guidance_parallel 1.0 (here 0.5)"]
    del sample["guidance_parallel"]  # written before the setting existed: plain guidance, as denoise.py reads it
    assert handlers.not_on_the_page(sample, studio.request().cfg) == ["guidance_parallel 1.0 (here 0.5)"]
    sample["guidance_parallel"] = 0.5
    assert handlers.not_on_the_page(sample, studio.request().cfg) == []
    sample["guidance_interval"] = [0.0, 0.5]
    assert handlers.not_on_the_page(sample, studio.request().cfg) == ["guidance_interval [0.0, 0.5] (here (0.0, 1.0))"]
    sample["guidance_parallel"] = 5  # out of range: refused by name, as denoise.py --from-png refuses it
    with pytest.raises(PageError, match="sampler settings are wrong.*guidance_parallel"):
        handlers.not_on_the_page(sample, studio.request().cfg)


# ------------------------------------------------------------------ paths

def test_safe_path_refuses_paths_outside_its_folders(tmp_path):
    root, other = tmp_path / "out", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "link_out").symlink_to(other)
    (root / "link_in").symlink_to(root / "sub")
    roots = [str(root)]
    assert studio_mod.safe_path("sub/a.png", roots) == str(root / "sub" / "a.png")
    assert studio_mod.safe_path(str(root / "new"), roots) == str(root / "new")
    assert studio_mod.safe_path("link_in/a", roots) == str(root / "sub" / "a")  # a link that stays inside
    for bad in ("../other/a", "sub/../../other", str(other / "a"), "/etc/passwd", "link_out/a", "link_out",
                str(tmp_path / "out2"), "", "a\x00b", None, 5):
        with pytest.raises(PageError):
            studio_mod.safe_path(bad, roots)
    assert studio_mod.safe_path(str(other / "a"), [str(root), str(other)]) == str(other / "a")


def test_adapters_are_found_under_out_dir_and_lora_dirs_not_through_links(tiny_ckpt, tiny_adapter, tmp_path):
    out, extra, outside = tmp_path / "out", tmp_path / "shared", tmp_path / "outside"
    shutil.copytree(tiny_adapter, out / "styles" / "italic")
    shutil.copytree(tiny_adapter, extra / "lora")
    shutil.copytree(tiny_adapter, outside / "hidden")
    (out / "linked").symlink_to(outside)
    s = Studio(tiny_ckpt, out, [extra], device=CPU, precision="fp32")
    assert sorted(s.adapters) == ["italic", "lora"]  # named as denoise.py --lora names them: the folder's name
    assert s.adapters["lora"].path == str(extra / "lora") and s.adapters["lora"].where == "shared/lora"
    entry = s.adapters["italic"]
    assert entry.style == "italic" and entry.r == 2 and entry.size > 0 and entry.problem is None
    assert entry.describe().startswith("out/styles/italic: style italic")
    with pytest.raises(PageError, match="outside the folders"):
        s.add_adapter(str(outside / "hidden"))


def test_an_adapter_file_linked_from_outside_is_refused(tiny_ckpt, tiny_adapter, tmp_path):
    """The folder is inside the page's folders, a file in it is a link to elsewhere: refused, nothing attached."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    shutil.copytree(tiny_adapter, outside / "real")
    (out / "sneaky").mkdir(parents=True)
    for name in os.listdir(outside / "real"):
        (out / "sneaky" / name).symlink_to(outside / "real" / name)
    s = Studio(tiny_ckpt, out, device=CPU, precision="fp32", log=lambda *a: None)
    entry = s.adapters["sneaky"]  # listed by the scan with its reason, never attached
    assert entry.problem and "outside the page's folders" in entry.problem and s.usable() == []
    assert not any("lora_A" in n for n, _ in s.model.named_parameters())
    (out / "other").mkdir()
    shutil.copytree(tiny_adapter, out / "other" / "lora")
    os.remove(out / "other" / "lora" / "adapter_config.json")
    (out / "other" / "lora" / "adapter_config.json").symlink_to(outside / "real" / "adapter_config.json")
    before = dict(s.adapters)
    with pytest.raises(PageError, match="outside the page's folders"):
        s.add_adapter(str(out / "other" / "lora"))
    assert s.adapters == before  # a refused Add leaves no entry


def test_adapter_of_another_base_is_listed_with_its_reason(tiny_ckpt, tiny_adapter, tmp_path):
    from adapter_formats import write_adapter

    out = tmp_path / "out"
    write_adapter(str(out / "other"), load_adapter(tiny_adapter).replace(base_fingerprint="0123456789abcdef"))
    s = Studio(tiny_ckpt, out, device=CPU, precision="fp32", log=lambda *a: None)
    assert s.usable() == [] and "0123456789abcdef" in s.adapters["other"].problem
    with pytest.raises(PageError, match="no loaded adapter"):
        s.check_weights({"other": 1.0})
    with pytest.raises(PageError, match="listed already"):
        s.add_adapter(str(out / "other"))


# ------------------------------------------------------------------ uploads

def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_labels_come_from_folder_or_file_name():
    label = styles.label_from_name
    assert label("7/a.png") == 7 and label("digits/3/x_9.png") == 3
    assert label("7_a.png") == 7 and label("4-b.jpg") == 4 and label("5.png") == 5
    assert label("a.png") is None and label("12_a.png") is None and label("") is None


def named(*paths):
    return [(os.path.basename(str(p)), str(p)) for p in paths]


def test_bad_uploads_are_named(tmp_path):
    (tmp_path / "3_bad.png").write_bytes(b"not an image")
    (tmp_path / "noname.png").write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    (tmp_path / "8_big.png").write_bytes(b"\0" * (uploads.MAX_FILE_BYTES + 1))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("2/broken.png", b"\x89PNG\r\n\x1a\n broken")
        z.writestr("2/notes.txt", b"hello")
    (tmp_path / "junk.zip").write_bytes(b"PK nothing")
    up = uploads.read_uploads(named(*(tmp_path / n for n in ("3_bad.png", "noname.png", "8_big.png", "set.zip",
                                                             "junk.zip"))))
    text = "\n".join(up.bad)
    for name in ("3_bad.png is not an image", "noname.png: no label", "8_big.png: larger than",
                 "set.zip/2/broken.png", "set.zip/2/notes.txt is not an image", "junk.zip: not a readable zip"):
        assert name in text
    with pytest.raises(uploads.UploadError, match="nothing is trained.*3_bad.png"):
        uploads.check_trainable(up)


def test_upload_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_FILES", 3)
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as z:
        for i in range(4):
            z.writestr(f"1/{i}.png", b"x")
    with pytest.raises(uploads.UploadError, match="more than 3 files"):
        uploads.read_uploads(named(tmp_path / "many.zip"))
    # a table of contents larger than the files allowed could need is refused before zipfile reads it
    monkeypatch.setattr(uploads, "MAX_DIRECTORY_BYTES", 100)
    with pytest.raises(uploads.UploadError, match="many.zip lists more files than 3"):
        uploads.read_uploads(named(tmp_path / "many.zip"))


def zeros_zip(path, size, declared=None):
    """A zip of one entry, 1/a.png, holding ``size`` zero bytes (a few KB on disk); with ``declared``, its headers
    claim that many bytes instead, as a zip bomb's do."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("1/a.png", "w", force_zip64=False) as f:
            for _ in range(size // 2**20):
                f.write(bytes(2**20))
    if declared is not None:
        data = bytearray(path.read_bytes())
        struct.pack_into("<I", data, data.index(b"PK\x03\x04") + 22, declared)  # the local header's size
        struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, declared)  # the central directory's
        path.write_bytes(bytes(data))
    return path


def test_a_zip_bomb_is_counted_as_it_unpacks_never_by_its_header(tmp_path, monkeypatch):
    honest = zeros_zip(tmp_path / "honest.zip", 64 * 2**20)
    liar = zeros_zip(tmp_path / "liar.zip", 64 * 2**20, declared=1000)
    assert os.path.getsize(liar) < 2**20  # small on disk
    monkeypatch.setattr(uploads, "MAX_FILE_BYTES", 100 * 2**20)  # one entry may be big: the total is the cap
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 32 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(uploads.UploadError, match="unpack to over 32 MB"):
            uploads.read_uploads(named(honest))
        up = uploads.read_uploads(named(liar))  # its header says 1000 bytes: refused, never unpacked in one piece
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(up) == 0 and len(up.bad) == 1 and "liar.zip/1/a.png" in up.bad[0]
    assert peak < 40 * 2**20  # the cap and a chunk, not the 64 MB inside


def digit_files(folder, count=20):
    """PNG digits drawn dark on light, as a phone photo or a scan gives them, labelled by name and by folder."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        arr = np.full((56, 56), 240, np.uint8)
        arr[10:46, 24 + i % 3:30 + i % 3] = rng.integers(0, 40)  # a dark vertical stroke: a 1
        name = folder / (f"1_{i}.png" if i % 2 else f"x{i}.png")
        name.write_bytes(png_bytes(arr))
        paths.append(str(name))
    with zipfile.ZipFile(folder / "more.zip", "w") as z:
        for i, p in enumerate(paths[::2]):
            z.write(p, f"7/{i}.png")
    return [p for p in paths if "/1_" in p] + [str(folder / "more.zip")]


def as_data_folder(files, folder):
    """The uploads as `lora_finetune.py --data` takes them: loose 1_*.png files, and the zip unpacked."""
    folder.mkdir()
    for p in files:
        if p.endswith(".zip"):
            with zipfile.ZipFile(p) as z:
                z.extractall(folder)
        else:
            shutil.copy(p, folder)
    return folder


def test_uploads_read_as_data_reads_the_same_files(tmp_path):
    files = digit_files(tmp_path)
    up = uploads.read_uploads(named(*files))
    data = style_training.load_style_data(str(as_data_folder(files, tmp_path / "data")), log=None)
    assert up.bad == [] and np.array_equal(up.images, data.images.numpy())
    assert np.array_equal(up.labels, data.labels.numpy()) and sorted(set(up.labels.tolist())) == [1, 7]


def test_a_sketch_becomes_a_digit():
    canvas = np.zeros((280, 280, 4), np.uint8)  # the Sketchpad's layers: transparent, a black stroke drawn on it
    assert uploads.sketch_to_image({"composite": canvas}) is None  # nothing drawn
    assert uploads.sketch_to_image({"composite": "x"}) is None and uploads.sketch_to_image("x") is None
    canvas[60:220, 130:150] = (0, 0, 0, 255)
    img = uploads.sketch_to_image({"composite": canvas, "layers": [], "background": None})
    digit = styles.preprocess_image(img, "drawn #1")
    assert digit.shape == (28, 28) and digit[:, 13:15].mean() > 100 and digit[:, :5].max() == 0


def test_uploads_become_training_data(tmp_path):
    files = digit_files(tmp_path)
    sketch = np.full((80, 80), 255, np.uint8)
    sketch[20:60, 30:50] = 0
    blank = np.full((80, 80), 255, np.uint8)
    up = uploads.read_uploads(named(*files), drawn=[(4, Image.fromarray(sketch)), (5, Image.fromarray(blank))])
    assert up.bad == ["drawn #2 has no ink (its brightest stroke is 0 grey levels from its paper): remove it, or "
                      "rescan it darker"]
    up.bad = []
    assert up.images.shape == (len(up), 28, 28) and up.images.dtype == np.uint8
    assert sorted(set(up.labels.tolist())) == [1, 4, 7] and up.names[-1] == "drawn #1"
    npz, preview = uploads.write_style_data(up, str(tmp_path / "styles"), "mine")
    with np.load(npz) as f:
        assert np.array_equal(f["images"], up.images) and np.array_equal(f["labels"], up.labels)
    assert os.path.getsize(preview) > 0


# ------------------------------------------------------------------ the fine-tune process

def test_the_command_is_the_settings_as_flags(tmp_path):
    """What the page runs parses back, through lora_finetune.py's own parser, to the settings it was built from."""
    from cli import config_from_args, runtime_from_args

    lcfg = preset_config(LoraConfig, "tiny", data=str(tmp_path / "mine.npz"), lora_steps=7)
    rcfg = RuntimeConfig(device="cpu", precision="fp32", seed=3)
    cmd = jobs.finetune_command(jobs.FinetuneSpec("base.pt", "model", str(tmp_path / "out"), "tiny"), lcfg, rcfg)
    assert cmd[:2] == [sys.executable, os.path.join(ROOT, "lora_finetune.py")]
    args = lora_finetune.parse_args(cmd[2:])
    assert config_from_args(args, LoraConfig, preset=args.preset) == lcfg
    assert runtime_from_args(args) == rcfg and (args.ckpt, args.weights) == ("base.pt", "model")
    assert jobs.shown_command(cmd).startswith("python lora_finetune.py --preset tiny")


def sleeper(tmp_path, seconds=60):
    return jobs.FineTune([sys.executable, "-c", f"import time; time.sleep({seconds})"], str(tmp_path / "x"),
                         str(tmp_path / "x.log"))


def test_one_finetune_at_a_time_and_stop_leaves_no_process(page, tmp_path):
    page.runner.job = sleeper(tmp_path)
    pid = page.runner.job.proc.pid
    assert page.runner.running()
    written = []
    with pytest.raises(jobs.JobError, match="already running"):
        page.runner.start("b", 2, lambda: written.append(1))
    assert written == []  # refused before any data is written
    assert not page.runner.stop(session="another tab") and page.runner.running()
    assert page.runner.stop()
    assert not page.runner.job.running() and (not os.path.exists(f"/proc/{pid}") or _zombie(pid))


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def _gone(pid, timeout, poll):
    """Whether process ``pid`` has ended (or is a zombie) within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid) and time.time() < deadline:
        time.sleep(poll)
    return not os.path.exists(f"/proc/{pid}") or _zombie(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_finetune_child_dies_with_the_server(tmp_path):
    """kill -9 of the server (no atexit, no page) still ends the fine-tune it started."""
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import jobs\n"
            f"job = jobs.FineTune([sys.executable, '-c', 'import time; time.sleep(120)'], {str(tmp_path / 'x')!r}, "
            f"{str(tmp_path / 'x.log')!r})\nprint(job.proc.pid, flush=True)\ntime.sleep(120)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert os.path.exists(f"/proc/{child}")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert _gone(child, 10, 0.1)
    finally:
        server.kill()
        server.wait()


def test_finetune_progress_is_read_from_its_loss_csv(tmp_path):
    """Steps and loss from the rows of loss.csv, the time left from their pace; a progress bar's text is not read."""
    out = tmp_path / "run"
    script = ("import os, sys, time\n"
              f"os.makedirs({str(out)!r})\n"
              f"f = open({os.path.join(str(out), 'loss.csv')!r}, 'w')\n"
              "f.write('step,loss,lr,images_per_s\\n')\n"
              "for i in range(1, 4):\n"
              "    f.write(f'{i},0.{i}234,0.01,64.0\\n'); f.flush()\n"
              "    sys.stderr.write(f'\\rlora: {i}/99 [loss=9.9]'); time.sleep(0.05)\n")
    job = jobs.FineTune([sys.executable, "-c", script], str(out), str(tmp_path / "x.log"), steps=10, batch=16)
    job.thread.join(30)
    p = job.progress()
    assert p.done and p.ok and (p.step, p.steps, p.loss) == (3, 10, 0.3234)
    assert p.seconds_left == pytest.approx(7 * 16 / 64.0)  # 7 steps left at 16 images a step, 64 a second
    assert "step 3 of 10, loss 0.3234" in p.html()


@pytest.mark.slow
def test_finetune_from_uploads_equals_data_on_the_same_files(page, tiny_ckpt, tmp_path):
    """The page's fine-tune on uploads gives the very tensors `lora_finetune.py --data` gives on the same files."""
    files = digit_files(tmp_path)
    job = next(app.do_train(page, [{"path": p, "orig_name": os.path.basename(p)} for p in files], [], "mine", 2)) \
        and page.runner.job
    job.thread.join(300)
    p = job.progress()
    assert p.ok, open(job.log_path).read()[-2000:]
    assert p.step == p.steps == 2 and p.loss is not None
    cli_out = tmp_path / "cli"
    lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", str(tiny_ckpt),
                        "--data", str(as_data_folder(files, tmp_path / "data")), "--lora-steps", "2",
                        "--out", str(cli_out)])
    mine, cli = load_adapter(job.out), load_adapter(str(cli_out))
    assert mine.tensors.keys() == cli.tensors.keys()
    assert all(torch.equal(mine.tensors[k], cli.tensors[k]) for k in cli.tensors)
    (entry,) = page.studio.scan_adapters()
    assert entry.name == "mine" and entry.problem is None
    base = page.studio.sample(page.studio.request())
    assert not np.array_equal(page.studio.sample(page.studio.request(), {"mine": 2.0}).images, base.images)


# ------------------------------------------------------------------ every handler, sent anything

def state_of(page):
    """What a refused request must leave as it was: the adapters, the weights the model holds, the files."""
    files = sorted(os.path.join(d, n) for d, _, ns in os.walk(page.studio.out_dir) for n in ns)
    lora = {n: p.detach().clone() for n, p in page.studio.model.named_parameters() if "lora_" in n}
    return dict(page.studio.adapters), dict(page.studio._set), files, page.runner.job, lora


def same_state(a, b):
    return a[:4] == b[:4] and a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


HOSTILE = [None, True, "x", "1.5", 1.5, -1, 0, 10 ** 30, 10 ** 5000, float("nan"), float("inf"), [], ["x"], {},
           {"path": "/etc/passwd"}, "a\nb"]


def form_valid(first):
    """The HOSTILE values a sample form starting at argument ``first`` takes: seed 0, guidance 0 and 1.5, and any
    weight of -1, 0 or 1.5."""
    valid = {first + 2: [0], first + 5: [0, 1.5]}
    valid.update({first + 6 + i: [-1, 0, 1.5] for i in range(app.MAX_SLOTS)})
    return valid


def fuzz_cases(page, tmp_path):
    """(handler, valid arguments, positions to fuzz, values valid at that position, (outputs, panel))."""
    form = [["3"], 1, 0, "ddim", TINY_STEPS, 2.0, *[0.0] * app.MAX_SLOTS]
    grid = page.studio.sample(page.studio.request([3]))
    files = [{"path": p, "orig_name": os.path.basename(p)} for p in digit_files(tmp_path)]
    sketch = np.zeros((80, 80, 4), np.uint8)
    sketch[20:60, 30:50] = (0, 0, 0, 255)
    return [
        (app.do_sample, [["lora"], *form], range(1, 1 + len(form)), form_valid(1), (3, 2)),
        # the fast switch: on is refused here too (no speed adapter under this page's folders)
        (app.do_fast, [["lora"], False, *form], range(1, 2 + len(form)), form_valid(2), (5 + app.MAX_SLOTS, 2)),
        (app.do_sweep, [["lora"], "lora", *form], range(1, 2 + len(form)), form_valid(2), (2, 0)),
        (app.do_compare, [["lora"], *form[:6], 1.0, *form[7:]], range(1, 1 + len(form)), form_valid(1), (2, 0)),
        (app.do_save, [grid, "x"], [1], {1: ["x"]}, (1, 0)),
        (app.do_add_path, ["lora"], [0], {}, (1 + app.MAX_SLOTS + 3, 0)),
        (app.do_add_drawing, [{"composite": sketch}, "3", []], [0, 1, 2], {1: [0], 2: [None, []]}, (2, 1)),
        (app.do_check, [files, [], "mine"], [0, 1, 2], {1: [None, []], 2: ["x"]}, (2, 0)),
        (app.do_train, [files, [], "mine", 2], [0, 2, 3], {2: ["x"]}, (7 + app.MAX_SLOTS + 3, 0)),
        (app.do_resume, ["mine"], [0], {}, (7 + app.MAX_SLOTS + 3, 0)),
    ]


def test_every_handler_refuses_hostile_arguments_in_one_line_and_changes_nothing(page, tmp_path):
    """Each argument of each handler replaced by values of the wrong type, nulls, non-integers and huge numbers:
    a one-line refusal in the panel's own line (every other output left as it was) and a pop-up, and the
    adapters, weights, files and fine-tune as before."""
    import gradio as gr

    cases = fuzz_cases(page, tmp_path)
    refused = 0
    for fn, good, positions, valid, (outputs, panel) in cases:
        wrapped = app.handler(fn, page, panel=panel, outputs=outputs)
        for i in positions:
            for value in HOSTILE:
                if any(value is v or type(value) is type(v) and value == v for v in valid.get(i, [])):
                    continue
                args = [*good[:i], value, *good[i + 1:]]
                before = state_of(page)
                with pytest.warns(UserWarning) as popup:  # gr.Warning, outside a page
                    out = wrapped(*args)
                    got = list(out) if inspect.isgenerator(out) else [out]
                assert len(got) == 1, (fn.__name__, i, value)
                shown = got[0] if outputs == 1 else got[0][panel]
                assert len(got[0]) == outputs or outputs == 1, (fn.__name__, i, value)
                assert shown.startswith(app.ERROR_MARK), (fn.__name__, i, value, shown)
                assert str(popup[0].message) in shown, (fn.__name__, i, value)
                assert "\n" not in shown and len(shown) < 400, (fn.__name__, i, value)
                others = [] if outputs == 1 else [o for k, o in enumerate(got[0]) if k != panel]
                assert all(o == gr.skip() for o in others), (fn.__name__, i, value)
                assert same_state(before, state_of(page)), (fn.__name__, i, value)
                refused += 1
    assert refused > 200 and page.runner.job is None


# ------------------------------------------------------------------ command line

def test_main_refuses_bad_input_with_one_line(tmp_path, capsys):
    for argv, message in ((["--ckpt", str(tmp_path / "none.pt")], "not found"),
                          (["--port", "70000"], "--port must be <= 65535"),
                          (["--lora-dir", str(tmp_path / "nowhere")], "is not a folder")):
        with pytest.raises(SystemExit) as e:
            app.main([*argv, "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_import_does_no_work(tmp_path):
    """Importing the page writes nothing, prints nothing and leaves Gradio unloaded (the rooms need none)."""
    code = "import sys, app; assert 'gradio' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_defaults_are_safe():
    args = app.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860


def test_bench_entry_returns_its_figures(studio):
    out = studio_mod.bench_entry(studio, repeats=1)
    assert set(out) == {"first_grid_s", "redraw_s", "sweep_s", "img2img_s", "adapters"} and out["adapters"] == 1
    assert all(out[k] > 0 for k in ("first_grid_s", "redraw_s", "sweep_s", "img2img_s"))


# ------------------------------------------------------------------ the page in a browser

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                # without these Chromium waits on network services an offline machine never answers
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_candidates():
    return ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
            shutil.which("google-chrome")]


def find_browser(candidates=None):
    """(playwright's sync_playwright, a Chromium executable), or a skip; a failure where CI is set."""
    def missing(why):
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -r requirements-dev.txt)")
    for path in browser_candidates() if candidates is None else candidates:
        if path and os.path.exists(path):
            return sync_playwright, path
    missing("no Chromium found (apt-get install chromium)")


def test_a_missing_browser_is_a_skip_here_and_a_failure_in_ci(monkeypatch):
    pytest.importorskip("playwright")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium found"):
        find_browser(candidates=[])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        find_browser(candidates=[])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, proc):
        self.url, self.proc = url, proc

    def children(self):
        """Process ids the server started (its fine-tunes)."""
        pids = []
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return [p for p in pids if not _zombie(p)]


@pytest.fixture
def server(tiny_ckpt, out_dir):
    """``python app.py`` on the tiny checkpoint, on a free loopback port, stopped afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--ckpt", str(tiny_ckpt), "--out-dir",
                             str(out_dir), "--port", str(port), "--preset", "tiny", "--device", "cpu",
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=str(out_dir.parent))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"app.py did not start: {proc.stdout.read()}")
                time.sleep(0.5)
        yield Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_page_end_to_end_in_chromium(server, studio, tmp_path):
    sync_playwright, chromium = find_browser()
    url = server.url
    (tmp_path / "3_bad.png").write_bytes(b"not an image")
    (tmp_path / "7_notes.png").write_bytes(b"hello")
    outside = []

    def route(r):
        url = r.request.url
        if url.startswith(server.url) or url.startswith(("data:", "blob:")):
            r.continue_()
        else:  # the page must work with no network: nothing from a CDN
            outside.append(url)
            r.abort()

    def shown(page):
        src = page.locator("#grid img").get_attribute("src")
        body = page.request.get(src if src.startswith("http") else url + src).body()
        return np.asarray(Image.open(io.BytesIO(body)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.route("**/*", route)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            slider = page.locator("#weight_0 input[type=number]")
            slider.wait_for(timeout=120_000)
            for d in range(10):
                if d != 3:
                    page.locator(f"#labels input[name='{d}']").uncheck()
            page.locator("#sample").click()
            status = page.locator("#status")
            page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=120_000)
            first = shown(page)
            expected = studio.sample(studio.request([3]))
            assert np.array_equal(first, expected.display)
            slider.fill("1.5")
            slider.blur()  # a slider's release redraws with the new weight
            page.wait_for_function("document.querySelector('#status').innerText.includes('lora 1.5')",
                                   timeout=120_000)
            moved = shown(page)
            assert not np.array_equal(moved, first), status.inner_text()
            assert np.array_equal(moved, studio.sample(studio.request([3]), {"lora": 1.5}).display)
            page.get_by_role("tab", name="Your style").click()
            page.locator("#uploads input[type=file]").set_input_files([str(tmp_path / "3_bad.png"),
                                                                      str(tmp_path / "7_notes.png")])
            page.get_by_text("7_notes").first.wait_for(timeout=60_000)
            page.locator("#check").click()
            error = page.get_by_text("nothing is trained").first
            error.wait_for(timeout=60_000)
            assert "3_bad.png" in error.inner_text() and "7_notes.png" in error.inner_text()
            assert outside == []
            page.get_by_role("tab", name="Sample").click()
            page.locator("#seed input").fill("1")  # the server serves on: a new seed, a new grid
            page.locator("#sample").click()
            page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=120_000)
        finally:
            browser.close()
    # requests no page would send: each refused in one line, and the page goes on serving
    from gradio_client import Client

    client = Client(url, verbose=False)
    tiny = preset_config(SampleConfig, "tiny")
    good = (["3"], 1, 0, tiny.sampler, TINY_STEPS, tiny.guidance, 0.0)  # as `expected` drew
    for bad, message in (((["x"], *good[1:]), "labels must be digits in 0..9, got 'x'"),
                         (([], *good[1:]), "at least one label"), ((None, *good[1:]), "labels is missing"),
                         ((*good[:-1], 11.0), "weight slider 1 must be a number from -10 to 10"),
                         ((*good[:2], 1.5, *good[3:]), "seed must be a whole number, got 1.5"),
                         ((*good[:2], "5", *good[3:]), "seed must be a whole number, got '5'"),
                         ((*good[:3], "euler", *good[4:]), "euler")):
        note = client.predict(*bad, api_name="/do_sample")[-1]  # the refusal is the status line's
        assert note.startswith(app.ERROR_MARK) and message in note and "Traceback" not in note
    path, note = client.predict(*good, api_name="/do_sample")
    assert np.array_equal(np.asarray(Image.open(path)), expected.display) and note.startswith("done")


def grid_picture(tab, url):
    """The Sample tab's grid as the browser tab ``tab`` shows it, fetched from the server at ``url``."""
    src = tab.locator("#grid img").get_attribute("src")
    body = tab.request.get(src if src.startswith("http") else url + src).body()
    return np.asarray(Image.open(io.BytesIO(body)))


@pytest.mark.slow
def test_two_tabs_keep_their_own_weights(server, studio):
    """Each tab's sliders are its own: one tab at weight 1.5, another at 0, each grid as its own weights give it,
    whichever sampled last (the model is shared; what a visitor chose is not)."""
    sync_playwright, chromium = find_browser()

    def shown(tab):
        return grid_picture(tab, server.url)

    def sample(tab):
        old = tab.locator("#grid img").get_attribute("src") if tab.locator("#grid img").count() else ""
        tab.locator("#sample").click()
        tab.wait_for_function("old => { const i = document.querySelector('#grid img'); return i && i.src && "
                              "!i.src.endsWith(old) && document.querySelector('#status').innerText.includes('done') }",
                              arg=old or "\x00", timeout=120_000)
        return shown(tab)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            tabs = [browser.new_context(viewport={"width": 1400, "height": 1800}).new_page() for _ in range(2)]
            for tab in tabs:
                tab.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
                tab.locator("#weight_0 input[type=number]").wait_for(timeout=120_000)
                for d in range(10):
                    if d != 3:
                        tab.locator(f"#labels input[name='{d}']").uncheck()
            a, b = tabs
            a.locator("#seed input").fill("1")
            a.locator("#weight_0 input[type=number]").fill("1.5")
            a.locator("#weight_0 input[type=number]").blur()  # the slider's release draws with it
            a.wait_for_function("document.querySelector('#status').innerText.includes('lora 1.5')", timeout=120_000)
            first_a = shown(a)
            first_b = sample(b)
            b.locator("#seed input").fill("1")
            second_b = sample(b)
            a.locator("#seed input").fill("2")
            second_a = sample(a)  # after b sampled at 0: a's weight is still a's
        finally:
            browser.close()
    assert np.array_equal(first_a, studio.sample(studio.request([3], 1, 1), {"lora": 1.5}).display)
    assert np.array_equal(first_b, studio.sample(studio.request([3], 1, 0)).display)
    assert np.array_equal(second_b, studio.sample(studio.request([3], 1, 1)).display)
    assert np.array_equal(second_a, studio.sample(studio.request([3], 1, 2), {"lora": 1.5}).display)

@pytest.mark.slow
def test_page_fine_tune_lists_the_adapter_and_closing_the_page_stops_it(server, tmp_path):
    sync_playwright, chromium = find_browser()
    files = digit_files(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.locator("#weight_0 input[type=number]").wait_for(timeout=120_000)
            page.get_by_role("tab", name="Your style").click()
            page.locator("#uploads input[type=file]").set_input_files(files)
            page.locator("#uploads").get_by_text("more", exact=True).first.wait_for(timeout=60_000)
            page.locator("#style_name input, #style_name textarea").first.fill("mine")
            page.locator("#ft_steps input").fill("2")
            page.locator("#train").click()
            page.locator("#style_msg").get_by_text("has a slider now").wait_for(timeout=300_000)
            assert "app/adapters/mine" in page.locator("#weight_1").inner_text()
            assert server.children() == []  # done: nothing left running
            # a long one, then the page goes away: its fine-tune goes with it
            page.locator("#style_name input, #style_name textarea").first.fill("long")
            page.locator("#ft_steps input").fill("100000")
            page.locator("#train").click()
            page.locator("#style_msg").get_by_text("app/adapters/long").wait_for(timeout=60_000)
            (child,) = server.children()
            page.close()
            assert _gone(child, 120, 0.5)
        finally:
            browser.close()


def test_bench_times_the_first_grid_and_a_redraw_and_serves_nothing(tiny_ckpt, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert app.main(["--ckpt", str(tiny_ckpt), "--out-dir", str(out_dir), "--preset", "tiny", "--device", "cpu",
                     "--precision", "fp32", "--bench"]) is None
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["first_grid_s"] > 0 and figures["redraw_s"] > 0 and figures["precision"] == "fp32"
    assert not os.path.exists(out_dir / "app")  # nothing written: no grids, no uploads folder
