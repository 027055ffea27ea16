"""logs.py and the runs that use it: the loss CSV (continued across a resume, no step twice), the loss curve,
the fine-tune's preview grids (readable size, the run's random streams untouched), and --tensorboard
refused with the install command when its package is missing."""
import csv
import os
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lora_finetune
import train
import trainer
from logs import (CSV_FIELDS, LogPaths, LossLog, loss_curve_png, read_loss_csv, remove_previews_after, require_tensorboard,
                  smooth)
from pictures import PREVIEW_SCALE, preview_png, preview_size


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------ the pieces

def test_loss_log_appends_flushed_rows_and_a_resume_drops_the_steps_after_it(tmp_path):
    path = str(tmp_path / "loss.csv")
    log = LossLog(path, images_per_step=16)
    for s in range(1, 6):
        log.step(s, 1.0 / s, 1e-3)
        # flushed as it goes: another reader sees every row at once, while the run still holds the file
        assert [int(r["step"]) for r in read_loss_csv(path)] == list(range(1, s + 1))
    log.close()
    rows = csv_rows(path)
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 6
    assert float(rows[3][1]) == 1.0 / 3 and float(rows[3][2]) == 1e-3 and float(rows[3][3]) > 0
    # the checkpoint was at step 3; steps 4 and 5 are done again by the resumed run
    log = LossLog(path, images_per_step=16, resume_step=3)
    assert [r["step"] for r in read_loss_csv(path)] == [1, 2, 3]
    log.step(4, 0.5, 2e-3)
    log.close()
    back = read_loss_csv(path)
    assert [r["step"] for r in back] == [1, 2, 3, 4] and back[-1]["loss"] == 0.5 and back[-1]["lr"] == 2e-3
    # a fresh run starts its own log
    LossLog(path, images_per_step=16).close()
    assert csv_rows(path) == [list(CSV_FIELDS)]


def test_loss_log_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss,lr,images_per_s\n1,0.5,0.001,10.0\n2,0.4,0.001,10.0\n3,0.3")  # killed mid-line
    LossLog(str(path), images_per_step=1, resume_step=5).close()
    assert [r["step"] for r in read_loss_csv(path)] == [1, 2]


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0, 4.0], 1) == [2.0, 4.0]


def test_loss_curve_png_is_written_and_readable(tmp_path):
    path = str(tmp_path / "loss.csv")
    log = LossLog(path, images_per_step=8)
    for s in range(1, 201):
        log.step(s, 1.0 / s ** 0.5, 1e-3)
    log.close()
    png = loss_curve_png(path, str(tmp_path / "loss_curve.png"), "a test run")
    with Image.open(png) as im:
        assert im.size == (800, 450)
    assert loss_curve_png(str(tmp_path / "none.csv"), str(tmp_path / "x.png"), "empty") is None
    assert not (tmp_path / "x.png").exists()


def test_preview_png_has_the_expected_size_and_upscaled_digits(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = {"base": torch.randint(0, 256, (10, 28, 28), generator=g, dtype=torch.uint8),
            "adapter": torch.randint(0, 256, (10, 28, 28), generator=g, dtype=torch.uint8)}
    path = preview_png(rows, torch.arange(10), str(tmp_path / "p" / "step_0050.png"), "step 50")
    with Image.open(path) as im:
        width, height = im.size
        pixels = np.asarray(im.convert("L"))
    assert (width, height) == preview_size(2, 10) and width >= 10 * 28 * PREVIEW_SCALE
    # each digit is drawn PREVIEW_SCALE x PREVIEW_SCALE per pixel, nearest-neighbour: find base label 0's tile
    from pictures import PREVIEW_LEFT, PREVIEW_PAD, PREVIEW_TOP
    tile = pixels[PREVIEW_TOP + PREVIEW_PAD:PREVIEW_TOP + PREVIEW_PAD + 28 * PREVIEW_SCALE,
                  PREVIEW_LEFT + PREVIEW_PAD:PREVIEW_LEFT + PREVIEW_PAD + 28 * PREVIEW_SCALE]
    expected = rows["base"][0].numpy().repeat(PREVIEW_SCALE, 0).repeat(PREVIEW_SCALE, 1)
    assert np.array_equal(tile, expected)


def test_old_previews_after_the_resume_point_are_removed(tmp_path):
    for s in (2, 4, 6):
        (tmp_path / f"step_{s:04d}.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("mine")
    remove_previews_after(str(tmp_path), 4)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step_0002.png", "step_0004.png"]
    remove_previews_after(str(tmp_path), -1)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_log_paths_inside_a_folder_or_beside_a_file():
    assert LogPaths.of(os.path.join("out", "lora")).csv == os.path.join("out", "lora", "loss.csv")
    full = LogPaths.of(os.path.join("out", "full.pt"), folder=False)
    assert full.csv == os.path.join("out", "full_loss.csv") and full.previews == os.path.join("out", "full_previews")


@pytest.fixture
def no_tensorboard(monkeypatch):
    """torch.utils.tensorboard as it imports without the tensorboard package (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_require_tensorboard_names_the_install_command(no_tensorboard):
    with pytest.raises(Exception) as e:
        require_tensorboard()
    assert "pip install tensorboard" in str(e.value) and getattr(e.value, "exit_code", 2) == 2


@pytest.mark.parametrize("script", ["train", "lora_finetune"])
def test_tensorboard_without_its_package_exits_2_before_training(no_tensorboard, tmp_path, monkeypatch, capsys,
                                                                 script):
    module = {"train": train, "lora_finetune": lora_finetune}[script]
    monkeypatch.setattr(module, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(module, "load_dataset_distributed", lambda *a, **k: pytest.fail("data loaded"))
    argv = ["--tensorboard", "--device", "cpu"] + (["--out-dir", str(tmp_path / "o")] if script == "train" else
                                                   ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "l")])
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tensorboard needs the tensorboard package")
    assert "pip install tensorboard" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "l").exists()


# ------------------------------------------------------------------ the runs

STEPS = 6


def train_argv(out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--max-steps", str(STEPS),
            "--out-dir", str(out), *extra]


class CtrlCAt:
    """SIGINT to this process at the ``at``-th loss sync, as a user's Ctrl-C: the sync has already read the stop
    flag, so the run stops after the next step."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_train_loss_csv_across_a_resume_has_every_step_once(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train.main(train_argv(straight))
    reference = csv_rows(straight / "loss.csv")
    assert [int(r[0]) for r in reference[1:]] == list(range(1, STEPS + 1))
    with Image.open(straight / "loss_curve.png") as im:
        assert im.size == (800, 450)

    out = tmp_path / "stopped"
    original = trainer.all_reduce_mean
    hit = CtrlCAt(2)
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "all_reduce_mean", lambda *a: (hit(), original(*a))[1])
        with pytest.raises(SystemExit) as e:
            train.main(train_argv(out))
    assert e.value.code == 130
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert [int(r[0]) for r in csv_rows(out / "loss.csv")[1:]] == [1, 2, 3]
    # as a run killed later would leave it: steps past the checkpoint, which the resumed run does again
    with open(out / "loss.csv", "a") as f:
        f.write("4,9.0,0.1,1.0\n5,9.0,0.1,1.0\n")
    assert [int(r[0]) for r in csv_rows(out / "loss.csv")[1:]] == [1, 2, 3, 4, 5]
    train.main(train_argv(out, "--resume"))
    rows = csv_rows(out / "loss.csv")
    assert [int(r[0]) for r in rows[1:]] == list(range(1, STEPS + 1))  # continuous, nothing twice, last step right
    # resumed training is bit-identical, so its log is the uninterrupted one's (all but the throughput column)
    assert [r[:3] for r in rows] == [r[:3] for r in reference]
    assert (out / "loss_curve.png").exists()


def lora_argv(base, out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--lora-steps", "4", "--ckpt", str(base),
            "--out", str(out), *extra]


@pytest.mark.slow
def test_finetune_previews_loss_log_and_curve(tmp_path, tiny_ckpt):
    out = tmp_path / "lora"
    lora_finetune.main(lora_argv(tiny_ckpt, out, "--preview-every", "2"))
    assert sorted(os.listdir(out / "previews")) == ["step_0002.png", "step_0004.png"]
    grids = []
    for name in ("step_0002.png", "step_0004.png"):
        with Image.open(out / "previews" / name) as im:
            assert im.size == preview_size(2, 10)
            grids.append(np.asarray(im.convert("L")))
    # the base's row is the same noise through the same frozen weights every time; the title line differs
    from pictures import PREVIEW_TOP
    cell = 28 * PREVIEW_SCALE + 4
    assert np.array_equal(grids[0][PREVIEW_TOP:PREVIEW_TOP + cell], grids[1][PREVIEW_TOP:PREVIEW_TOP + cell])
    assert [int(r[0]) for r in csv_rows(out / "loss.csv")[1:]] == [1, 2, 3, 4]
    with Image.open(out / "loss_curve.png") as im:
        assert im.size == (800, 450)


@pytest.mark.slow
def test_previews_leave_the_finetune_bit_identical(tmp_path, tiny_ckpt):
    """Sampling the previews (and loading the base for them) draws nothing from the run's random streams."""
    lora_finetune.main(lora_argv(tiny_ckpt, tmp_path / "with", "--preview-every", "1", "--lora-dropout", "0.1"))
    lora_finetune.main(lora_argv(tiny_ckpt, tmp_path / "without", "--preview-every", "0", "--lora-dropout", "0.1"))
    assert len(os.listdir(tmp_path / "with" / "previews")) == 4 and not (tmp_path / "without" / "previews").exists()
    a = torch.load(tmp_path / "with" / "training_state.pt", weights_only=True)
    b = torch.load(tmp_path / "without" / "training_state.pt", weights_only=True)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert csv_rows(tmp_path / "with" / "loss.csv")[1:][-1][:3] == csv_rows(tmp_path / "without" / "loss.csv")[1:][-1][:3]
