"""Bad files and flags, full disks, files that must not be overwritten, and messages that tell the truth.

Every bad input is one ``error: ...`` line on stderr and exit code 2, before any long work and
with nothing written; a write that fails names the file and why, and leaves the earlier file and
config.json as they were; no script writes over a file it was given to read.
"""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import denoise
import evaluate
import lora_finetune
import metrics
import train
import trainer
from checkpoint import save_checkpoint
from files import WriteError, atomic_write, is_temp_name, write_json
from config import ModelConfig, config_dict, preset_config
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32"]


def expect_clean_exit_2(main, argv, capsys):
    """exit code 2 and stderr's last line ``error: ...`` with no traceback; returns that line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last
    return last


def snapshot(folder):
    """{relative path: bytes} of everything under ``folder``: to show nothing was written."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture
def files(tmp_path, tiny_ckpt, tiny_adapter):
    """A folder of the bad inputs a hostile user tries, beside copies of good ones."""
    f = tmp_path / "in"
    f.mkdir()
    (f / "bad.pt").write_bytes(b"bad")
    (f / "notes.txt").write_text("my notes\n")
    data = bytearray(open(tiny_ckpt, "rb").read())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of the tensor data
    (f / "flipped.pt").write_bytes(bytes(data))
    (f / "appended.pt").write_bytes(open(tiny_ckpt, "rb").read() + b"\n")
    shutil.copy(tiny_ckpt, f / "ckpt.pt")
    (f / "a_file").write_text("I am a file\n")
    return f


def bad_cases(f, tiny_ckpt, tiny_adapter):
    """(script main, argv, what the message must say); ``f`` is the folder of bad inputs."""
    out = f.parent / "out"
    return [
        (denoise.main, ["--ckpt", f / "bad.pt", "--out-dir", out], "truncated or corrupt"),
        (denoise.main, ["--ckpt", tiny_ckpt, "--lora", f / "notes.txt", "--out-dir", out], "notes.txt"),
        (evaluate.main, ["--ckpt", tiny_ckpt, "--lora", f / "notes.txt", "--out-dir", out], "notes.txt"),
        (denoise.main, ["--ckpt", f / "flipped.pt", "--out-dir", out], "corrupt: content hash differs"),
        (denoise.main, ["--ckpt", f / "appended.pt", "--out-dir", out], "1 bytes follow the end of its zip archive"),
        (train.main, [*TINY, "--lr", "nan", "--out-dir", out], "--lr: expected a finite number, got 'nan'"),
        (train.main, [*TINY, "--lr", "inf", "--out-dir", out], "--lr: expected a finite number, got 'inf'"),
        (train.main, [*TINY, "--ema-decay=-inf", "--out-dir", out], "expected a finite number"),
        (lora_finetune.main, [*TINY, "--lora-lr", "nan", "--ckpt", tiny_ckpt, "--out", out], "finite number"),
        (lora_finetune.main, [*TINY, "--lora-t-range", "0.6,0.2", "--ckpt", tiny_ckpt, "--out", out],
         "lora_t_range must be two numbers lo,hi with 0 <= lo < hi <= 1"),
        (lora_finetune.main, [*TINY, "--lora-t-range", "0.5,0.505", "--ckpt", tiny_ckpt, "--out", out],
         "holds no step of this model's T=50"),
        (denoise.main, ["--ckpt", tiny_ckpt, "--guidance", "nan", "--out-dir", out], "--guidance: expected a finite"),
        (denoise.main, ["--ckpt", tiny_ckpt, "--lora-scale", "nan", "--out-dir", out], "--lora-scale: expected a"),
        (evaluate.main, ["--samples", "x.npz", "--lora-scale", "inf", "--out-dir", out], "--lora-scale: expected"),
        (train.main, [*TINY, "--out-dir", f / "a_file"], "--out-dir"),
        (denoise.main, ["--ckpt", tiny_ckpt, "--out-dir", f / "a_file"], "is a file, not a folder"),
        (evaluate.main, ["--ckpt", tiny_ckpt, "--out-dir", f / "a_file"], "is a file, not a folder"),
        (lora_finetune.main, [*TINY, "--ckpt", tiny_ckpt, "--out", f / "a_file"], "is a file"),
        (lora_finetune.main, [*TINY, "--ckpt", f / "ckpt.pt", "--full", "--out", f / "ckpt.pt"], "never writes over"),
        (lora_finetune.main, [*TINY, "--ckpt", tiny_ckpt, "--full", "--out", f / "notes.txt"],
         "other than a base checkpoint"),
        (train.main, [*TINY, "--out-dir", f / "a_file" / "sub"], "cannot be made"),
    ]


def test_every_bad_file_and_flag_is_one_line_and_exit_2(files, tiny_ckpt, tiny_adapter, capsys, monkeypatch):
    # nothing may start the long work: training, sampling or fine-tuning fail the test if reached
    monkeypatch.setattr(trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(lora_finetune, "fit", lambda *a, **k: pytest.fail("fine-tune started"))
    monkeypatch.setattr(denoise, "generate", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("classifier training started"))
    before = snapshot(files)
    cases = bad_cases(files, tiny_ckpt, tiny_adapter)
    for main, argv, message in cases:
        line = expect_clean_exit_2(main, argv, capsys)
        assert message in line, (argv, line)
        assert "weights_only" not in line
        if main is lora_finetune.main:
            assert "--force" not in line  # a flag it does not have
        assert snapshot(files) == before, argv  # nothing given was touched
        assert not (files.parent / "out").exists(), argv  # and nothing was written
    print(f"{len(cases)} bad inputs, each one line and exit code 2")


def test_code_in_a_checkpoint_is_refused_without_unsafe_advice(tmp_path, capsys):
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    torch.save({"kind": "base", "version": 1, "model": RunsCode()}, tmp_path / "evil.pt")
    line = expect_clean_exit_2(denoise.main, ["--ckpt", tmp_path / "evil.pt", "--out-dir", tmp_path / "out"], capsys)
    assert "holds objects that are not allowed to load" in line
    assert "weights_only" not in line and "succeed" not in line
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------ nothing overwritten

def test_a_fresh_run_does_not_replace_another_runs_checkpoint(tmp_path, tiny_ckpt, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_ckpt, run / "ckpt.pt")
    (run / "config.json").write_text("{}\n")
    before = snapshot(run)
    line = expect_clean_exit_2(train.main, [*TINY, "--out-dir", run], capsys)
    assert f"--resume {run / 'ckpt.pt'} --out-dir {run}" in line and "--overwrite" in line
    # resuming another checkpoint into that folder would replace it too
    other = tmp_path / "other.pt"
    shutil.copy(tiny_ckpt, other)
    line = expect_clean_exit_2(train.main, [*TINY, "--resume", other, "--out-dir", run], capsys)
    assert "another run's checkpoint" in line
    assert snapshot(run) == before
    train.main([*TINY, "--out-dir", str(run), "--overwrite", "--sample-every", "0"])
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 4


def test_evaluate_never_writes_its_classifier_over_another_file(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("classifier training started"))
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((10, 28, 28), np.uint8), labels=np.arange(10))
    for given, message in ((files / "ckpt.pt", "not a classifier checkpoint: it is a base checkpoint (what --ckpt takes)"),
                           (files / "bad.pt", "truncated or corrupt"), (files / "notes.txt", "truncated or corrupt")):
        before = given.read_bytes()
        line = expect_clean_exit_2(evaluate.main, ["--samples", npz, "--dataset", "mnist-5k", "--classifier", given,
                                                   "--out-dir", tmp_path / "eval"], capsys)
        assert message in line and "left as it is" in line
        assert given.read_bytes() == before
    # the report would land on a file given to read
    (tmp_path / "s.json").write_text("{}")
    line = expect_clean_exit_2(evaluate.main, ["--samples", npz, "--dataset", "mnist-5k", "--out-dir", tmp_path,
                                               "--name", "s", "--classifier", tmp_path / "s.json"], capsys)
    assert "a run never writes over a file it reads" in line and (tmp_path / "s.json").read_text() == "{}"
    assert not (tmp_path / "eval").exists()


def test_json_is_never_written_over_a_file_of_another_kind(files):
    """config.json, eval.json, bench.json: a --out that names a checkpoint leaves the checkpoint alone."""
    before = (files / "ckpt.pt").read_bytes()
    with pytest.raises(WriteError, match="is not a JSON file, so it is left as it is"):
        write_json(str(files / "ckpt.pt"), {"bench": 1})
    assert (files / "ckpt.pt").read_bytes() == before
    write_json(str(files / "r.json"), {"a": 1})
    write_json(str(files / "r.json"), {"a": 2})  # over JSON: the usual update
    assert json.loads((files / "r.json").read_text()) == {"a": 2}


@pytest.mark.parametrize("images, labels, message", [
    (np.array([["x"] * 28] * 28 * 3).reshape(3, 28, 28), np.zeros(3, np.int64), "found dtype <U1"),
    (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), "holds no images"),
    (np.full((3, 28, 28), np.nan), np.zeros(3, np.int64), "NaN or infinite"),
    (np.zeros((3, 28, 28), np.complex64), np.zeros(3, np.int64), "found dtype complex64"),
    (np.zeros((3, 28, 28), np.uint8), np.array([0.5, 1.0, 2.0]), "labels must be integers, found dtype float64"),
    (np.full((3, 28, 28), 0.5), np.zeros(3, np.int64), "whole numbers"),
])
def test_evaluate_refuses_samples_a_cast_would_change(tmp_path, capsys, images, labels, message):
    npz = tmp_path / "bad.npz"
    np.savez(npz, images=images, labels=labels)
    line = expect_clean_exit_2(evaluate.main, ["--samples", npz, "--dataset", "mnist-5k", "--classifier",
                                               tmp_path / "never.pt", "--out-dir", tmp_path / "o"], capsys)
    assert message in line
    assert not (tmp_path / "never.pt").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ a full disk

def test_a_full_disk_names_the_file_and_leaves_the_earlier_one(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """The write fails as it does when the disk fills: part of the data written, then ENOSPC."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_ckpt, run / "ckpt.pt")
    (run / "config.json").write_text('{"the": "good run"}\n')
    before = snapshot(run)
    real_save = torch.save

    def disk_fills(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_fills)
    line = expect_clean_exit_2(train.main, [*TINY, "--resume", run / "ckpt.pt", "--out-dir", run, "--max-steps", "8",
                                            "--sample-every", "0"], capsys)
    assert f"could not write {str(run / 'ckpt.pt')!r}: the disk is full" in line
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before  # the earlier checkpoint and config.json
    assert not [n for n in after if is_temp_name(os.path.basename(n))]  # and no temporary file
    monkeypatch.setattr(torch, "save", real_save)
    with pytest.raises(WriteError, match="the disk is full"):
        atomic_write(str(tmp_path / "x.json"), lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    assert os.listdir(tmp_path) == ["run"]


@pytest.mark.slow
def test_a_file_size_limit_stops_the_save_cleanly_in_a_real_process(tmp_path, tiny_ckpt):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), under torch.save's own writer."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_ckpt, run / "ckpt.pt")
    (run / "config.json").write_text('{"the": "good run"}\n')
    before = snapshot(run)
    limit = os.path.getsize(tiny_ckpt) // 2

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--resume", str(run / "ckpt.pt"),
                           "--out-dir", str(run), "--max-steps", "8", "--sample-every", "0"], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limit_writes, timeout=600)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and str(run / "ckpt.pt") in last
    assert "larger than this system allows" in last and "Traceback" not in proc.stderr
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before
    assert not [n for n in after if is_temp_name(os.path.basename(n))]


# ------------------------------------------------------------ messages tell the truth

def other_base(tmp_path, tiny_ckpt, **model_changes):
    """A valid base checkpoint unlike tiny_ckpt: other weights, or (with model_changes) another size."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt.pop("content_sha256")
    if model_changes:
        cfg = preset_config(ModelConfig, "tiny", **model_changes)
        state = UNet(cfg).state_dict()
        ckpt = {**ckpt, "model": state, "ema": state, "config": {**ckpt["config"], "model": config_dict(cfg)["model"]}}
    else:
        ckpt["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["ema"].items()}
    path = tmp_path / ("bigger.pt" if model_changes else "other.pt")
    save_checkpoint(ckpt, str(path))
    return path


def test_adapter_messages_name_the_real_cause(tmp_path, tiny_ckpt, tiny_adapter, capsys):
    out = ["--out-dir", tmp_path / "out", "--steps", "2", "--frames", "0"]
    # a base of another size: a size mismatch, not a fingerprint one
    line = expect_clean_exit_2(denoise.main, ["--ckpt", other_base(tmp_path, tiny_ckpt, channels=(16, 32)),
                                              "--lora", tiny_adapter, *out], capsys)
    assert "trained on a base of another size" in line and "fingerprint" not in line
    # the raw weights of the very base its adapter was trained on (EMA): say so, and which flag fixes it
    line = expect_clean_exit_2(denoise.main, ["--ckpt", tiny_ckpt, "--lora", tiny_adapter, "--weights", "model",
                                              *out], capsys)
    assert "trained on this checkpoint's EMA weights" in line and "pass --weights ema" in line
    # lora_finetune has no --force: its message must not suggest one
    line = expect_clean_exit_2(lora_finetune.main, [*TINY, "--ckpt", other_base(tmp_path, tiny_ckpt), "--resume",
                                                    tiny_adapter, "--out", tmp_path / "resumed"], capsys)
    assert "was trained on base" in line and "--force" not in line
    # denoise has it: there the hint stays
    line = expect_clean_exit_2(denoise.main, ["--ckpt", other_base(tmp_path, tiny_ckpt), "--lora", tiny_adapter, *out],
                               capsys)
    assert "was trained on base" in line and "--force" in line
