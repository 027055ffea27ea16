"""denoise.py --init/--strength (SDEdit) and --from-png: the ends of the strength, bad inputs, and a grid drawn
again bit for bit from the settings its PNG holds. The sampler is left at its default: what is checked holds for
every sampler."""
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin

import denoise
import pictures
from styles import read_digit


def run(ckpt, out_dir, *extra):
    return denoise.main(["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--device", "cpu", "--precision", "fp32",
                         "--steps", "5", "--frames", "0", *extra])


def images(folder, name="samples"):
    with np.load(folder / f"{name}.npz") as z:
        return z["images"], z["labels"]


def expect_exit_2(argv, capsys):
    capsys.readouterr()  # what an earlier run printed
    with pytest.raises(SystemExit) as e:
        denoise.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.fixture
def seven(tmp_path):
    """A dark 7 on white paper, 100 x 100: not MNIST-like until preprocessed (inverted, cropped, centred)."""
    path = tmp_path / "seven.png"
    img = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(img).line([(20, 20), (80, 20), (40, 90)], fill=0, width=8)
    img.save(path)
    return path


def test_strength_0_returns_the_preprocessed_input(tiny_ckpt, tiny_adapter, seven, tmp_path):
    run(tiny_ckpt, tmp_path, "--init", str(seven), "--strength", "0", "--labels", "1,7", "--n-per-label", "2",
        "--lora", tiny_adapter)
    got, labels = images(tmp_path, "lora_samples")
    expected, _ = read_digit(str(seven))  # what --data makes of the same file
    assert labels.tolist() == [1, 1, 7, 7]
    for image in got:
        assert np.array_equal(image, expected)


def test_strength_1_is_plain_sampling_from_the_same_noise(tiny_ckpt, seven, tmp_path):
    run(tiny_ckpt, tmp_path / "plain", "--labels", "0..9", "--seed", "3")
    run(tiny_ckpt, tmp_path / "init", "--labels", "0..9", "--seed", "3", "--init", str(seven), "--strength", "1")
    assert np.array_equal(images(tmp_path / "plain")[0], images(tmp_path / "init")[0])


def test_a_middle_strength_keeps_some_of_the_input(tiny_ckpt, seven, tmp_path):
    """Between the ends: closer to the input than plain sampling is, and different from the input."""
    expected = read_digit(str(seven))[0].astype(float)
    run(tiny_ckpt, tmp_path / "plain", "--labels", "7", "--n-per-label", "4")
    run(tiny_ckpt, tmp_path / "half", "--labels", "7", "--n-per-label", "4", "--init", str(seven), "--strength", "0.3")
    plain, half = images(tmp_path / "plain")[0].astype(float), images(tmp_path / "half")[0].astype(float)
    assert np.abs(half - expected).mean() < np.abs(plain - expected).mean()
    assert not np.array_equal(half[0], expected)


@pytest.mark.parametrize("extra,message", [
    (["--strength", "nan"], "expected a finite number"),
    (["--strength", "1.5"], "--strength must be <= 1"),
    (["--strength", "-0.1"], "--strength must be >= 0"),
    (["--init", "{tmp}/missing.png"], "no such file; pass the image"),
    (["--init", "{tmp}/notes.png"], "is not an image Pillow can read"),
    (["--init", "{tmp}/out/samples.png"], "a run never writes over a file it reads"),
    (["--from-png", "{tmp}/seven.png"], "holds no 'sd-settings' text"),
])
def test_bad_img2img_inputs_exit_2_and_write_nothing(tiny_ckpt, seven, tmp_path, capsys, extra, message):
    (tmp_path / "notes.png").write_text("not a picture")
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(seven.read_bytes())  # the output named as the input
    before = sorted(p.name for p in out.iterdir())
    argv = ["--ckpt", str(tiny_ckpt), "--out-dir", str(out), "--device", "cpu", "--steps", "5"]
    if extra[0] != "--init":
        argv += ["--init", str(seven)] if extra[0] == "--strength" else []
    err = expect_exit_2(argv + [e.format(tmp=tmp_path) for e in extra], capsys)
    assert message in err
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "samples.png").read_bytes() == seven.read_bytes()


def test_strength_without_init_is_refused(tiny_ckpt, tmp_path, capsys):
    err = expect_exit_2(["--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path / "o"), "--strength", "0.5"], capsys)
    assert "--strength needs --init" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ --from-png

def test_from_png_draws_the_same_grid_bit_for_bit(tiny_ckpt, tiny_adapter, seven, tmp_path):
    first = tmp_path / "first"
    run(tiny_ckpt, first, "--labels", "3,7", "--n-per-label", "2", "--seed", "11", "--guidance", "1.5",
        "--lora", f"{tiny_adapter}:0.7", "--init", str(seven), "--strength", "0.6", "--merge")
    again = tmp_path / "again"
    # only the output and the device: every setting that draws comes from the PNG
    denoise.main(["--from-png", str(first / "lora_samples.png"), "--out-dir", str(again), "--device", "cpu",
                  "--frames", "0"])
    a, b = images(first, "lora_samples"), images(again, "lora_samples")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert (first / "lora_samples.png").read_bytes() == (again / "lora_samples.png").read_bytes()


def test_flags_beside_from_png_win(tiny_ckpt, tmp_path):
    run(tiny_ckpt, tmp_path / "seed1", "--labels", "2,5", "--seed", "1")
    run(tiny_ckpt, tmp_path / "seed4", "--labels", "2,5", "--seed", "4")
    denoise.main(["--from-png", str(tmp_path / "seed1" / "samples.png"), "--seed", "4", "--frames", "0",
                  "--out-dir", str(tmp_path / "again"), "--device", "cpu"])
    settings = pictures.read_png_settings(str(tmp_path / "again" / "samples.png"))
    assert settings["seed"] == 4 and settings["labels"] == "2,5" and settings["sample"]["steps"] == 5
    assert np.array_equal(images(tmp_path / "seed4")[0], images(tmp_path / "again")[0])


def rewrite_text(src, dst, key, value):
    """The PNG ``src`` with its text chunk ``key`` set to ``value``, checksums right: a settings chunk edited."""
    img = Image.open(src)
    info = PngImagePlugin.PngInfo()
    for k, v in img.text.items():
        info.add_text(k, value if k == key else v)
    img.save(dst, pnginfo=info)


def test_from_png_refuses_damaged_changed_and_huge_files(tiny_ckpt, tmp_path, capsys, monkeypatch):
    run(tiny_ckpt, tmp_path / "first", "--labels", "1")
    png = tmp_path / "first" / "samples.png"
    base = ["--out-dir", str(tmp_path / "out"), "--device", "cpu"]

    data = bytearray(png.read_bytes())
    at = data.index(b'"seed": 0')
    data[at + 8] = ord("9")  # one digit changed inside the text chunk, its checksum left as it was
    (tmp_path / "flipped.png").write_bytes(bytes(data))
    assert "checksum does not match" in expect_exit_2(["--from-png", str(tmp_path / "flipped.png"), *base], capsys)

    settings = json.loads(Image.open(png).text[pictures.SETTINGS_KEY])
    for change, message in [({"seed": "zero"}, "setting 'seed'"), ({"seed": 2**64}, "seed must be <="),
                            ({"extra": 1}, "unknown ['extra']"), ({"version": 2}, "settings version 2"),
                            ({"sample": {"sampler": "euler"}}, "sampler settings are wrong")]:
        rewrite_text(png, tmp_path / "edited.png", pictures.SETTINGS_KEY, json.dumps({**settings, **change}))
        err = expect_exit_2(["--from-png", str(tmp_path / "edited.png"), *base], capsys)
        assert message in err and "--from-png" in err, err
    rewrite_text(png, tmp_path / "edited.png", pictures.SETTINGS_KEY, "{not json")
    assert "not JSON" in expect_exit_2(["--from-png", str(tmp_path / "edited.png"), *base], capsys)

    (tmp_path / "truncated.png").write_bytes(png.read_bytes()[:60])
    assert "truncated" in expect_exit_2(["--from-png", str(tmp_path / "truncated.png"), *base], capsys)
    monkeypatch.setattr(pictures, "PNG_MAX_BYTES", 100)
    assert "more than the 100 such a file can be" in expect_exit_2(["--from-png", str(png), *base], capsys)
    assert not (tmp_path / "out").exists()


def test_from_png_names_an_adapter_that_is_gone(tiny_ckpt, tiny_adapter, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    run(tiny_ckpt, tmp_path / "first", "--labels", "1", "--lora", str(adapter))
    shutil.rmtree(adapter)
    err = expect_exit_2(["--from-png", str(tmp_path / "first" / "lora_samples.png"), "--out-dir",
                         str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert f"names --lora {str(adapter)!r}, which no longer exists" in err
    # a --lora given beside it wins, and the PNG's adapter is not looked for
    denoise.main(["--from-png", str(tmp_path / "first" / "lora_samples.png"), "--out-dir", str(tmp_path / "out"),
                  "--device", "cpu", "--frames", "0", "--lora", tiny_adapter])


def test_png_text_reader_checks_every_chunk_it_reads(tmp_path):
    """A chunk's CRC over its type and body, as the PNG spec defines it: the reader's own check agrees with Pillow."""
    png = tmp_path / "x.png"
    pictures.save_grid(torch.zeros(1, 28, 28, dtype=torch.uint8), str(png),
                       text={pictures.SETTINGS_KEY: "{}", "other": "é"})
    chunks = pictures._png_text(png.read_bytes(), "x")
    assert chunks[pictures.SETTINGS_KEY] == b"{}"
    data = png.read_bytes()
    length, = struct.unpack(">I", data[8:12])
    assert zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]  # IHDR


# ------------------------------------------------------------------ the page's room: Studio.img2img

def test_studio_img2img_is_denoise_init(tiny_ckpt, tiny_adapter, seven, tmp_path):
    from config import SampleConfig, preset_config
    from studio import PageError, Studio

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(tiny_adapter, out / "lora")
    steps = preset_config(SampleConfig, "tiny").steps
    s = Studio(tiny_ckpt, out, device=torch.device("cpu"), precision="fp32", preset="tiny", log=lambda *a: None)
    req = s.request(["3", "7"], 2, 5)
    run(tiny_ckpt, tmp_path / "d", "--labels", "3,7", "--n-per-label", "2", "--seed", "5", "--steps", str(steps),
        "--init", str(seven), "--strength", "0.4", "--lora", str(out / "lora"))
    expected = images(tmp_path / "d", "lora_samples")[0]
    for image in (Image.open(seven), seven.read_bytes(), np.asarray(Image.open(seven))):
        grid = s.img2img(image, req, 0.4, {"lora": 1})
        assert np.array_equal(grid.images.numpy(), expected)
    assert grid.settings["strength"] == 0.4 and grid.display.shape[1] > 3 * grid.picture.shape[1]
    start = s.img2img(Image.open(seven), req, 0, {"lora": 1}).images
    assert all(np.array_equal(im, read_digit(str(seven))[0]) for im in start.numpy())
    assert np.array_equal(s.img2img(seven.read_bytes(), req, 1).images, s.sample(req).images)
    for image, strength, message in [(None, 0.5, "draw or upload a digit"),
                                     (Image.open(seven), float("nan"), "strength"),
                                     (Image.open(seven), 1.5, "strength"),
                                     ("seven.png", 0.5, "must be a picture"),
                                     (b"not an image", 0.5, "not an image Pillow can read"),
                                     (Image.new("L", (40, 40), 255), 0.5, "has no ink")]:
        with pytest.raises(PageError, match=message):
            s.img2img(image, req, strength)


def test_png_from_before_guidance_parallel_draws_with_plain_guidance(tiny_ckpt, tmp_path):
    """A PNG whose settings lack guidance_parallel was drawn with plain guidance (1), not today's default."""
    run(tiny_ckpt, tmp_path / "plain", "--labels", "4,9", "--guidance", "2", "--guidance-parallel", "1")
    run(tiny_ckpt, tmp_path / "today", "--labels", "4,9", "--guidance", "2")
    assert not np.array_equal(images(tmp_path / "plain")[0], images(tmp_path / "today")[0])
    png = tmp_path / "plain" / "samples.png"
    settings = json.loads(Image.open(png).text[pictures.SETTINGS_KEY])
    del settings["sample"]["guidance_parallel"]
    rewrite_text(png, tmp_path / "old.png", pictures.SETTINGS_KEY, json.dumps(settings))
    argv = denoise.png_argv(pictures.read_png_settings(str(tmp_path / "old.png")))
    assert argv[argv.index("--guidance-parallel") + 1] == "1.0"
    denoise.main(["--from-png", str(tmp_path / "old.png"), "--out-dir", str(tmp_path / "again"), "--device", "cpu",
                  "--frames", "0"])
    assert np.array_equal(images(tmp_path / "plain")[0], images(tmp_path / "again")[0])
