"""Style data sets (styles.py): preprocessing as MNIST was made, fonts, the training set, the preview, and
lora_finetune.py --data end to end (slow)."""
import hashlib
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import pictures
import styles
import style_training
import font_styles
from styles import StyleDataError, preprocess_image
from style_training import load_style_data

CENTRE = (styles.SIZE - 1) / 2


def centre_of_mass(a):
    a = np.asarray(a, dtype=np.float64)
    m = a.sum()
    return (a.sum(1) * np.arange(a.shape[0])).sum() / m, (a.sum(0) * np.arange(a.shape[1])).sum() / m


def ink_box(a, level=64):
    rows = np.flatnonzero((np.asarray(a) >= level).any(1))
    cols = np.flatnonzero((np.asarray(a) >= level).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def digit_like(h=120, w=90, seed=0):
    """An antialiased, lopsided stroke shape, ink 255 on 0, at an odd size and place on its page."""
    rng = np.random.default_rng(seed)
    big = Image.new("L", (w * 4, h * 4), 0)
    d = ImageDraw.Draw(big)
    pts = [(int(rng.integers(w, 3 * w)), int(rng.integers(h // 2, 3 * h))) for _ in range(5)]
    d.line(pts, fill=255, width=28)
    d.ellipse((w, h, 2 * w, 2 * h), outline=255, width=20)
    return big.resize((w, h), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------ preprocessing

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dark_on_light_comes_out_as_light_on_dark(seed):
    light_on_dark = digit_like(seed=seed)
    dark_on_light = Image.fromarray(255 - np.asarray(light_on_dark))
    a, b = preprocess_image(light_on_dark), preprocess_image(dark_on_light)
    assert a.dtype == np.uint8 and a.shape == (28, 28)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert a[0].max() == 0 and a[:, 0].max() == 0 and a.max() >= 200  # ink bright, paper dark, as MNIST


def test_grey_paper_with_dark_ink_is_inverted():
    page = np.full((60, 50), 150, np.uint8)  # grey paper, darker than middle grey
    page[15:45, 20:28] = 20
    out = preprocess_image(page)
    assert out.max() == 255 and out[0, 0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_centre_of_mass_lands_at_the_centre(seed):
    out = preprocess_image(digit_like(seed=seed))
    cy, cx = centre_of_mass(out)
    assert abs(cy - CENTRE) <= 0.5 and abs(cx - CENTRE) <= 0.5


@pytest.mark.parametrize("h,w", [(200, 40), (40, 200), (90, 90), (9, 3), (2400, 600)])  # the last shrunk first
def test_fit_in_20_keeps_the_aspect_ratio(h, w):
    page = np.zeros((h + 50, w + 70), np.uint8)
    page[20:20 + h, 30:30 + w] = 255
    out = preprocess_image(page)
    scale = 20 / max(h, w)
    assert ink_box(out, level=128) == (round(h * scale), round(w * scale))  # the longer side 20, the ratio kept


def test_16_bit_rgba_palette_and_bilevel_modes_match_8_bit(tmp_path):
    ref_img = digit_like(seed=5)
    ref = preprocess_image(ref_img)
    a8 = np.asarray(ref_img)
    sixteen = Image.fromarray((a8.astype(np.uint16) * 257))  # 16-bit, through a PNG file and back
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "s.png")
    rgb = Image.merge("RGB", [Image.fromarray(255 - a8)] * 3)  # black ink on white
    transparent_black = Image.new("RGBA", ref_img.size, (0, 0, 0, 0))
    transparent_black.putalpha(ref_img)  # black ink, the page transparent
    transparent_white = Image.new("RGBA", ref_img.size, (255, 255, 255, 0))
    transparent_white.putalpha(ref_img)  # white ink: alpha is the ink, whatever its colour
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)  # every grey level in the palette
    for name, img in {"16-bit": Image.open(tmp_path / "s.png"), "I": ref_img.convert("I"), "RGB": rgb,
                      "RGBA black": transparent_black, "RGBA white": transparent_white, "P": palette,
                      "LA": ref_img.convert("LA")}.items():
        out = preprocess_image(img)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1, name
    assert Image.open(tmp_path / "s.png").mode.startswith("I")
    # a bi-level scan: no greys to antialias from, but the same box and centre
    one = Image.fromarray(np.asarray(ref_img) > 127).convert("1")
    out = preprocess_image(one)
    assert ink_box(out, 128) == ink_box(ref, 128)
    assert max(abs(c - CENTRE) for c in centre_of_mass(out)) <= 0.5


def test_palette_with_transparency(tmp_path):
    base = digit_like(seed=6)
    p = Image.new("P", base.size, 0)
    p.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    p.paste(1, mask=Image.fromarray((np.asarray(base) > 127).astype(np.uint8) * 255))
    p.info["transparency"] = 0  # the page transparent, the ink opaque black
    p.save(tmp_path / "p.png")
    out = preprocess_image(Image.open(tmp_path / "p.png"))
    assert out.max() == 255 and out[0, 0] == 0
    assert abs(centre_of_mass(out)[0] - CENTRE) <= 0.5


def test_a_blank_image_is_refused_by_name():
    with pytest.raises(StyleDataError, match="blank.png.*no ink"):
        preprocess_image(np.full((40, 40), 250, np.uint8), where="blank.png")
    noisy = np.clip(np.random.default_rng(0).normal(128, 5, (40, 40)), 0, 255).astype(np.uint8)
    with pytest.raises(StyleDataError, match="no ink"):
        preprocess_image(noisy)


# ------------------------------------------------------------------ fonts

def test_font_rendering_is_the_same_for_a_seed_and_has_ten_distinct_labels():
    a = load_style_data("font:DejaVu Serif", per_label=3, seed=0, log=None)
    b = load_style_data("font:DejaVu Serif", per_label=3, seed=0, log=None)
    c = load_style_data("font:DejaVu Serif", per_label=3, seed=1, log=None)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.counts() == [3] * 10 and a.name == "font:DejaVu Serif"
    means = [a.images[a.labels == k].float().mean(0) for k in range(10)]
    for i in range(10):
        for j in range(i):
            assert (means[i] - means[j]).abs().mean() > 10  # grey levels: each digit its own shape
    for x in a.images:  # MNIST's geometry: fitted into 20x20, centred by mass
        assert max(ink_box(x.numpy(), 128)) <= 21
        assert max(abs(v - CENTRE) for v in centre_of_mass(x.numpy())) <= 0.5


def test_font_names_are_found_loosely_and_an_unknown_one_lists_them():
    assert font_styles.find_font("dejavu serif bold")[0] == "DejaVu Serif Bold"
    assert font_styles.find_font("DejaVuSerif-Bold")[0] == "DejaVu Serif Bold"
    names = font_styles.font_names()
    assert {"DejaVu Sans", "DejaVu Sans Mono", "STIXGeneral", "cmr10"} <= set(names)
    assert "cmsy10" not in names and "cmex10" not in names  # symbol fonts: their 0..9 are no digits
    with pytest.raises(StyleDataError, match="font 'Comic Sans'.*choose one of: .*DejaVu Serif Bold"):
        load_style_data("font:Comic Sans", log=None)


def test_render_style_folder_reads_back_as_the_font(tmp_path):
    name, count = font_styles.write_font_folder("font:cmr10", tmp_path / "d", per_label=2, seed=3)
    assert (name, count) == ("font:cmr10", 20)
    assert sorted(os.listdir(tmp_path / "d")) == [str(k) for k in range(10)]
    with Image.open(tmp_path / "d" / "7" / "0001.png") as im:
        assert im.mode == "L" and im.size == (font_styles.FONT_CANVAS, font_styles.FONT_CANVAS)
    lines = []
    folder = load_style_data(tmp_path / "d", log=lines.append)
    font = load_style_data("font:cmr10", per_label=2, seed=3, log=None)
    assert torch.equal(folder.images, font.images) and torch.equal(folder.labels, font.labels)
    assert folder.name == "data:d" and folder.inverted == 20  # dark on white pages, as a scan
    assert lines == ["style: data:d: 20 images (0:2 1:2 2:2 3:2 4:2 5:2 6:2 7:2 8:2 9:2), 20 inverted (light "
                     "background); fewer than 10 for 0,1,2,3,4,5,6,7,8,9 (a weaker style there)"]
    with pytest.raises(StyleDataError, match="not an empty folder"):
        font_styles.write_font_folder("font:cmr10", tmp_path / "d", per_label=1)


def test_a_folder_of_mixed_formats_and_an_npz(tmp_path):
    pages = {"a.png": "L", "b.jpg": "RGB", "c.bmp": "RGB", "d.tif": "L", "e.webp": "RGB", "f.gif": "P"}
    for i, (fname, mode) in enumerate(pages.items()):
        os.makedirs(tmp_path / "d" / str(i % 3), exist_ok=True)
        img = Image.fromarray(255 - np.asarray(digit_like(seed=i))).convert(mode)
        img.save(tmp_path / "d" / str(i % 3) / fname)
    (tmp_path / "d" / ".DS_Store").write_bytes(b"\0")  # hidden files are not images, and not refused
    data = load_style_data(tmp_path / "d", log=None)
    assert data.counts()[:3] == [2, 2, 2] and data.present() == [0, 1, 2] and data.inverted == 6
    np.savez(tmp_path / "s.npz", images=data.images.numpy(), labels=data.labels.numpy())
    npz = load_style_data(tmp_path / "s.npz", log=None)
    assert torch.equal(npz.images, data.images) and npz.name == "data:s" and npz.inverted == 0
    np.savez(tmp_path / "dark.npz", images=255 - data.images.numpy(), labels=data.labels.numpy())
    dark = load_style_data(tmp_path / "dark.npz", log=None)
    assert torch.equal(dark.images, data.images) and dark.inverted == 6


def test_split_keeps_every_label_in_training():
    data = load_style_data("font:DejaVu Sans", per_label=10, log=None)
    train, held = style_training.split_style_data(data, 0.2, seed=0)
    assert train.counts() == [8] * 10 and held.counts() == [2] * 10
    one = styles.StyleData(data.images[:1], data.labels[:1], "x")
    train, held = style_training.split_style_data(one, 0.5, seed=0)
    assert len(train) == 1 and len(held) == 0


# ------------------------------------------------------------------ the training set

def test_augmentation_keeps_the_originals_and_never_flips():
    data = load_style_data("font:DejaVu Sans", per_label=2, log=None)
    out = style_training.augment(data.images, 5, seed=0)
    assert out.shape == (100, 28, 28) and torch.equal(out[:20], data.images)
    assert torch.equal(out, style_training.augment(data.images, 5, seed=0))
    variants = out[20:].float().view(4, 20, 28, 28)
    orig = data.images.float()
    # small moves: each variant is nearer its own original than that original's mirror image
    assert ((variants - orig).abs().mean((2, 3)) < (variants - orig.flip(-1)).abs().mean((2, 3))).float().mean() > 0.9
    for v in out[20:]:
        assert max(abs(c - CENTRE) for c in centre_of_mass(v.numpy())) <= style_training.AUGMENT_SHIFT * 1.5 + 1


def test_prior_fills_the_missing_labels_at_its_weight():
    data = load_style_data("font:DejaVu Sans", per_label=10, log=None)
    seven = styles.StyleData(data.images[data.labels == 7], data.labels[data.labels == 7], "data:sevens")
    real = torch.randint(0, 255, (300, 28, 28), dtype=torch.uint8)
    real_labels = torch.arange(300) % 10
    for weight in (1.0, 0.5, 0.0):
        s = style_training.training_set(seven, real, real_labels, augment_mode="auto", prior_weight=weight, min_size=16,
                                seed=0)
        assert s.augmented and s.num_style == 10 * s.copies and s.num_style >= style_training.AUGMENT_POOL
        assert torch.equal(s.images[:10], seven.images) and (s.labels[:s.num_style] == 7).all()
        assert s.num_prior == round(weight * s.num_style)
        assert s.missing == [0, 1, 2, 3, 4, 5, 6, 8, 9]
        if weight:
            prior = s.labels[s.num_style:]
            assert set(prior.tolist()) == set(s.missing)  # every missing label, never the given one
            # the real digits themselves, unchanged: each one is among real's images of its label
            for img, lab in zip(s.images[s.num_style:s.num_style + 20], prior[:20]):
                assert (real[real_labels == lab] == img).all((1, 2)).any()
        else:
            assert s.prior_labels == [] and "may drift" in s.summary(weight)
    # not augmented, ten sevens repeated to the pool's size so that the prior brings every real digit, each
    # missing label alike
    small = style_training.training_set(seven, real, real_labels, augment_mode="off", prior_weight=1.0, min_size=16, seed=0)
    assert not small.augmented and small.num_style == 10 * small.copies >= style_training.AUGMENT_POOL
    assert torch.equal(small.images[:small.num_style], seven.images.repeat(small.copies, 1, 1))
    assert small.num_prior == small.num_style
    counts = torch.bincount(small.labels[small.num_style:], minlength=10)
    assert counts[7] == 0 and counts[small.missing].max() - counts[small.missing].min() <= 1
    # each of real's 270 digits of those labels at least 15 times: 4100 / 270 = 15.2
    seen = torch.stack([(real == img).all((1, 2)) for img in small.images[small.num_style:]]).sum(0)
    assert seen[real_labels != 7].min() >= 15 and seen[real_labels == 7].max() == 0
    few = styles.StyleData(torch.cat([seven.images] * 50), torch.full((500,), 7), "data:sevens")
    tiny = style_training.training_set(few, real, real_labels, augment_mode="off", prior_weight=0.001, min_size=16, seed=0)
    assert tiny.num_prior == 9 and sorted(tiny.labels[tiny.num_style:].tolist()) == tiny.missing  # one each at least
    none = style_training.training_set(seven, real, real_labels, augment_mode="off", prior_weight=0.0, min_size=16, seed=0)
    assert none.num_prior == 0 and none.copies == 2  # without a prior, only repeated to the batch
    full = style_training.training_set(data, real, real_labels, augment_mode="off", prior_weight=1.0, min_size=128, seed=0)
    assert full.num_prior == 0 and not full.augmented and full.copies == 2 and len(full.labels) == 200
    assert "every label given" in full.summary(1.0)


def test_augment_auto_is_for_small_sets_and_its_help_says_where():
    from config import LoraConfig

    # off unless asked: augmenting a typeface's 10 or 20 digits a label cost a third of its style share
    assert LoraConfig().augment == "off" and not style_training.augment_on(LoraConfig().augment, 10)

    assert style_training.augment_on("auto", style_training.AUGMENT_AUTO_BELOW - 1)
    assert not style_training.augment_on("auto", style_training.AUGMENT_AUTO_BELOW)
    assert style_training.augment_on("on", 10 ** 6) and not style_training.augment_on("off", 5)
    assert f"fewer than {style_training.AUGMENT_AUTO_BELOW} images" in LoraConfig.__dataclass_fields__["augment"].metadata[
        "help"]


def test_steps_are_sized_to_the_set():
    assert style_training.sized_steps(200, 300) == 300  # the preset's steps are for 20 images a label
    assert style_training.sized_steps(250, 300) == 375
    assert style_training.sized_steps(100, 300) == 300  # the floor: a smaller set needs no fewer steps
    assert style_training.sized_steps(10, 300) == 300
    assert style_training.sized_steps(10 ** 5, 300) == 450  # the cap: one and a half times
    assert style_training.sized_steps(10, 4) == 4


def test_preview_is_readable_rows_of_labels(tmp_path):
    data = load_style_data("font:DejaVu Sans", per_label=3, log=None)
    keep = data.labels != 4
    size = pictures.data_preview_png(data.images[keep], data.labels[keep], tmp_path / "p.png", title="t",
                               notes={0: "3 images"})
    assert size == pictures.data_preview_size(9)
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == size
        page = np.asarray(im)
    # the first digit of the first row, 3x nearest-neighbour
    top, left = pictures.DATA_PREVIEW_TITLE_HEIGHT + pictures.PREVIEW_PAD, pictures.DATA_PREVIEW_LABEL_WIDTH
    cell = page[top:top + 84, left:left + 84]
    assert np.array_equal(cell, np.kron(data.images[0].numpy(), np.ones((3, 3), np.uint8)))


# ------------------------------------------------------------------ lora_finetune.py --data (end to end)

@pytest.mark.parametrize("argv,says", [
    (["--data", "{d}", "--style", "bold"], "--data and --style bold both give the fine-tune's digits"),
    (["--data", "{d}", "--style", "font:cmr10"], "--data and --style font:cmr10 both give"),
    (["--prior-weight", "0.5"], "--prior-weight applies to --data or --style font:NAME, not to --style italic"),
    (["--augment", "off", "--style", "bold"], "--augment applies to --data"),
    (["--style", "data:mine"], "style 'data:mine' is what --data records"),
    (["--data", "{d}", "--out", "{d}/lora"], "is inside --data"),
    (["--data", "{d}", "--prior-weight", "5"], "prior_weight must be <= 4"),
    (["--data", "{d}", "--augment", "always"], "augment must be one of auto, on, off"),
])
def test_own_data_flags_that_contradict_exit_2_before_any_work(tmp_path, capsys, argv, says):
    import lora_finetune

    folder = tmp_path / "mine"
    font_styles.write_font_folder("font:cmr10", folder, per_label=1)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:  # the base does not exist: these are refused before it is read
        lora_finetune.main(["--ckpt", str(tmp_path / "no_ckpt.pt"), "--out", str(tmp_path / "out"),
                            *[a.replace("{d}", str(folder)) for a in argv]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_one_minimum_for_the_page_data_and_style_data(tmp_path, capsys):
    """A set one image short of style_training.MIN_STYLE_IMAGES is refused alike by the page's uploads, --data and
    --style-data, in one line naming the minimum; that many images pass all three checks."""
    import evaluate
    import lora_finetune
    import uploads

    folder = tmp_path / "few"
    font_styles.write_font_folder("font:cmr10", folder, per_label=1)  # ten images, one a label
    for f in sorted(folder.glob("*/*.png"))[style_training.MIN_STYLE_IMAGES - 1:]:
        f.unlink()
    files = [(f"{p.parent.name}_{p.name}", str(p)) for p in sorted(folder.glob("*/*.png"))]
    samples = pictures.write_samples_npz(str(tmp_path / "s.npz"), np.zeros((10, 28, 28), np.uint8), np.arange(10))
    with pytest.raises(uploads.UploadError, match=f"at least {style_training.MIN_STYLE_IMAGES}"):
        uploads.check_trainable(uploads.read_uploads(files))
    for main, argv in ((lora_finetune.main, ["--ckpt", str(tmp_path / "none.pt"), "--data", str(folder),
                                             "--out", str(tmp_path / "o")]),
                       (evaluate.main, ["--samples", samples, "--style-data", str(folder), "--dataset", "mnist-5k",
                                        "--out-dir", str(tmp_path / "e")])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        needs = f"needs at least {style_training.MIN_STYLE_IMAGES}"
        assert e.value.code == 2 and needs in err and err.count("\n") == 1, err
    font_styles.write_font_folder("font:cmr10", tmp_path / "enough", per_label=1)
    enough = style_training.load_style_data(tmp_path / "enough", log=None)
    assert style_training.check_style_count(enough, "x") is enough
    uploads.check_trainable(uploads.read_uploads([(f"{p.parent.name}_{p.name}", str(p))
                                                  for p in sorted((tmp_path / "enough").glob("*/*.png"))]))


def base_name(key):
    """A base weight's name inside a model with LoRA layers: the wrapper's segment dropped."""
    return re.sub(r"\.(net|base_layer)(?=\.)", "", key)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_finetune_on_a_folder_written_by_render_style(tiny_ckpt, tmp_path, capsys):
    import lora_finetune
    import lora_tools
    from adapter_formats import load_adapter

    folder = tmp_path / "serif_digits"
    lora_tools.main(["render-style", "font:DejaVu Serif Bold", "--per-label", "10", "--out", str(folder)])
    out = tmp_path / "lora"
    lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt,
                        "--data", str(folder), "--out", str(out), "--preview-every", "0"])
    text = capsys.readouterr()
    assert "data:serif_digits: 100 images (0:10 1:10 2:10 3:10 4:10 5:10 6:10 7:10 8:10 9:10), 100 inverted" in text.out
    assert load_adapter(out).style == "data:serif_digits"
    with Image.open(out / pictures.DATA_PREVIEW_NAME) as im:
        assert im.size == pictures.data_preview_size(10)
    # no --lora-steps: sized to the set (the tiny preset's 4 steps are for 100 images)
    from adapter_formats import load_training_state

    state = load_training_state(out)
    assert state.step == style_training.sized_steps(100, 4) and state.config["data"] == str(folder)


@pytest.mark.slow
def test_prior_keeps_the_base_and_the_other_labels(tiny_ckpt, tmp_path):
    import lora_finetune
    from adapter import apply_adapter
    from adapter_formats import load_adapter
    from pipeline import load_pipeline
    from lora import set_lora_weight

    folder = tmp_path / "sevens"
    font_styles.write_font_folder("font:DejaVu Sans Bold", folder, per_label=10)
    for k in range(10):
        if k != 7:
            shutil.rmtree(folder / str(k))
    before = sha256(tiny_ckpt)
    out = tmp_path / "lora"
    lora_finetune.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--ckpt", tiny_ckpt,
                        "--data", str(folder), "--prior-weight", "1", "--lora-steps", "6", "--out", str(out),
                        "--preview-every", "0"])
    assert sha256(tiny_ckpt) == before
    with Image.open(out / pictures.DATA_PREVIEW_NAME) as im:
        assert im.size == pictures.data_preview_size(10)  # the sevens and nine rows of real digits
    base = load_pipeline(tiny_ckpt, torch.device("cpu")).model
    adapter = load_adapter(out)
    adapted = load_pipeline(tiny_ckpt, torch.device("cpu"),
                            attach=lambda m, fp: apply_adapter(m, adapter, fp)).model
    # the base weights inside the adapted model are the checkpoint's, bit for bit
    base_state = base.state_dict()
    kept = {base_name(k): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert kept.keys() == base_state.keys()
    assert all(torch.equal(kept[k], base_state[k]) for k in base_state)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1, 28, 28, generator=g)
    t = torch.full((9,), 20)
    others = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9])
    with torch.no_grad():
        ref = base(x, t, others)
        set_lora_weight(adapted, 0.0)
        assert torch.equal(adapted(x, t, others), ref)  # at weight 0 the other labels are the base's
        set_lora_weight(adapted, 1.0)
        sevens = torch.full((9,), 7)
        assert not torch.equal(adapted(x, t, sevens), base(x, t, sevens))  # and the adapter did learn
