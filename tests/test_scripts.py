"""The scripts end to end: train.py -> denoise.py (in-process), bad command lines, and full subprocess runs.

In-process calls go through each script's main(argv); the @slow tests start real processes, as a
user would, on the tiny preset (run them with --runslow).
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import denoise
import lora_finetune
import pictures
import train
from adapter_formats import adapter_size, load_adapter, write_adapter
from checkpoint import state_fingerprint
from pictures import preview_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 28 + 2  # save_grid: a 28x28 digit plus 2 pixels of padding


def grid_size(cols, rows):
    return cols * TILE + 2, rows * TILE + 2


def run_denoise(ckpt, out_dir, *extra):
    return denoise.main(["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--device", "cpu", "--steps", "5", *extra])


def expect_exit_2(main, argv, capsys):
    """Run a script's main, expecting a clean exit with status 2; returns stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------ train -> denoise

def test_process_figure_keeps_one_row_per_label_whatever_the_sample_count(tiny_ckpt, tmp_path):
    """--n-per-label 50 once drew 500 rows of 10 frames (minutes in matplotlib); now one row per label."""
    run_denoise(tiny_ckpt, tmp_path / "one", "--labels", "0..9", "--n-per-label", "1")
    run_denoise(tiny_ckpt, tmp_path / "fifty", "--labels", "0..9", "--n-per-label", "50")
    with Image.open(tmp_path / "one" / "samples_process.png") as one, \
            Image.open(tmp_path / "fifty" / "samples_process.png") as fifty:
        assert fifty.size == one.size  # ten rows either way
    with np.load(tmp_path / "fifty" / "samples.npz") as npz:
        assert npz["images"].shape == (500, 28, 28)  # every sample is still written
    assert pictures.process_rows(list(range(10)), 50) == [0, 50, 100, 150, 200, 250, 300, 350, 400, 450]
    assert len(pictures.process_rows([3] * 100, 1)) == pictures.PROCESS_MAX_ROWS


def test_denoise_writes_grid_process_and_npz(tiny_ckpt, tmp_path):
    written = run_denoise(tiny_ckpt, tmp_path)
    names = {os.path.basename(p) for p in written}
    assert names == {"samples.png", "samples.npz", "samples_process.png"}
    with Image.open(tmp_path / "samples.png") as im:
        assert im.size == grid_size(10, 1) and im.mode == "L"
    with Image.open(tmp_path / "samples_process.png") as im:
        im.load()
        assert im.width > 100 and im.height > 50
    with np.load(tmp_path / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28)
    assert np.issubdtype(labels.dtype, np.integer) and labels.tolist() == list(range(10))
    assert images.std() > 0  # not a blank canvas
    # the grid's tiles are the npz's images, column per label
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert np.array_equal(grid[2:30, 2 + 3 * TILE:2 + 3 * TILE + 28], images[3])


def test_denoise_labels_and_samples_per_label(tiny_ckpt, tmp_path):
    run_denoise(tiny_ckpt, tmp_path, "--labels", "3,3,7", "--n-per-label", "2", "--name", "few", "--frames", "0",
                "--sampler", "ddpm", "--guidance", "0")
    with np.load(tmp_path / "few.npz") as npz:
        assert npz["images"].shape == (6, 28, 28) and npz["labels"].tolist() == [3, 3, 3, 3, 7, 7]
    with Image.open(tmp_path / "few.png") as im:
        assert im.size == grid_size(3, 2)
    assert not (tmp_path / "few_process.png").exists()  # --frames 0: no process figure


def test_denoise_same_seed_same_images(tiny_ckpt, tmp_path):
    def images(seed, sub):
        run_denoise(tiny_ckpt, tmp_path / sub, "--seed", str(seed), "--frames", "0")
        with np.load(tmp_path / sub / "samples.npz") as npz:
            return npz["images"]

    a, b, c = images(0, "a"), images(0, "b"), images(1, "c")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_input_does_not_touch_existing_outputs(tiny_ckpt, tmp_path, capsys):
    run_denoise(tiny_ckpt, tmp_path, "--frames", "0")
    png = tmp_path / "samples.png"
    content, mtime = png.read_bytes(), png.stat().st_mtime_ns
    time.sleep(0.01)
    err = expect_exit_2(denoise.main, ["--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path), "--labels", "11"],
                        capsys)
    assert "--labels '11'" in err and "0..9" in err
    assert png.read_bytes() == content and png.stat().st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["samples.npz", "samples.png"]


def test_denoise_with_adapter_merged_and_unmerged_agree(tiny_ckpt, tiny_adapter, tmp_path):
    written = run_denoise(tiny_ckpt, tmp_path / "merged", "--lora", tiny_adapter, "--merge", "--frames", "0",
                          "--precision", "fp32")
    assert {os.path.basename(p) for p in written} == {"lora_weight_sweep.png", "lora_samples.png",
                                                      "lora_samples.npz"}
    run_denoise(tiny_ckpt, tmp_path / "unmerged", "--lora", tiny_adapter, "--frames", "0", "--precision", "fp32")
    with np.load(tmp_path / "merged" / "lora_samples.npz") as m, np.load(tmp_path / "unmerged" / "lora_samples.npz") as u:
        # fp32 merge changes only rounding: at most one grey level on a few pixels
        assert np.abs(m["images"].astype(int) - u["images"].astype(int)).max() <= 2
    with Image.open(tmp_path / "merged" / "lora_weight_sweep.png") as im:
        assert im.size == preview_size(5, 10)  # a row per weight 0, .25, .5, .75, 1, a column per label


# ------------------------------------------------------------------ a run that diverges

def expect_diverged(main, argv, capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert "the loss became nan" in err and "diverged" in err and f"Lower {flag}" in err
    assert "Traceback" not in err
    return err


def test_diverged_training_stops_before_overwriting_the_checkpoint(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copyfile(tiny_ckpt, ckpt)
    shutil.copyfile(os.path.join(os.path.dirname(tiny_ckpt), "config.json"), tmp_path / "config.json")
    before, config_before = ckpt.read_bytes(), (tmp_path / "config.json").read_bytes()
    err = expect_diverged(train.main, ["--resume", "--lr", "1e10", "--max-steps", "12", "--out-dir", str(tmp_path),
                                       "--device", "cpu", "--precision", "fp32", "--sample-every", "0"], capsys, "--lr")
    assert ckpt.read_bytes() == before  # the good weights were not replaced by NaNs
    # the hint names this run's checkpoint and folder, not the default out/
    assert f"continue from that checkpoint with: python train.py --resume {ckpt} --out-dir {tmp_path}" in err
    # and what describes the good run still does: config.json is written with a checkpoint, not at start-up
    assert (tmp_path / "config.json").read_bytes() == config_before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "config.json", "loss.csv"]  # + the steps before it diverged


def test_diverged_lora_stops_before_overwriting_the_adapter(tiny_ckpt, tiny_adapter, tmp_path, capsys):
    adapter = tmp_path / "lora"
    shutil.copytree(tiny_adapter, adapter)
    def adapter_files():  # the adapter itself, not the loss log and previews beside it
        return {n: (adapter / n).read_bytes() for n in os.listdir(adapter) if n.startswith(("adapter_", "training_"))}
    before = adapter_files()
    expect_diverged(lora_finetune.main, ["--ckpt", tiny_ckpt, "--resume", str(adapter), "--out", str(adapter),
                                         "--lora-lr", "1e10", "--lora-steps", "12", "--device", "cpu",
                                         "--precision", "fp32"], capsys, "--lora-lr")
    assert adapter_files() == before and len(before) == 3
    assert sorted(os.listdir(tmp_path)) == ["lora"]


# ------------------------------------------------------------------ --help

@pytest.mark.parametrize("script", ["train", "lora_finetune", "denoise", "evaluate", "bench", "lora_tools"])
def test_help_gives_each_default_once_and_never_none(script, capsys):
    """Config flags default to None (the preset fills them) and print their real default in the help; argparse's
    own "(default: None)" once followed it on every one of them."""
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "default: None" not in out
    if script == "train":
        # each flag: its reason, its range, then its default, once
        assert "--max-steps MAX_STEPS optimizer steps in all; an epoch is one pass over the data; 1..1000000000 " \
               "(default 700) --time-budget" in out
        assert "--warmup-steps WARMUP_STEPS linear warm-up, then cosine decay (Loshchilov & Hutter 2017); " \
               "0..1000000000 (default 100)" in out


# ------------------------------------------------------------------ bad command lines

def test_run_main_tells_cleanup_whether_the_body_succeeded(capsys):
    """cleanup(ok): train.py's barrier before leaving the process group runs only on success."""
    from errors import UserError, run_main
    seen = []
    assert run_main(lambda a: a * 2, 21, seen.append) == 42
    with pytest.raises(SystemExit) as e:
        run_main(lambda a: (_ for _ in ()).throw(UserError("no such file 'x.pt'")), None, seen.append)
    assert e.value.code == 2 and "error: no such file 'x.pt'" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        run_main(lambda a: 1 / 0, None, seen.append)
    assert seen == [True, False, False]


def test_unknown_flag_exits_2(capsys):
    for main in (train.main, lora_finetune.main, denoise.main):
        err = expect_exit_2(main, ["--bogus-flag"], capsys)
        assert "unrecognized arguments: --bogus-flag" in err


def test_unknown_preset_exits_2(capsys):
    err = expect_exit_2(train.main, ["--preset", "huge"], capsys)
    assert "invalid choice: 'huge'" in err and "tiny" in err


def test_bad_types_exit_2(capsys):
    assert "invalid int value: 'many'" in expect_exit_2(train.main, ["--max-steps", "many"], capsys)
    assert "comma-separated list of int" in expect_exit_2(train.main, ["--channels", "8,x"], capsys)


def test_unknown_dataset_exits_2_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    err = expect_exit_2(train.main, ["--preset", "tiny", "--device", "cpu", "--dataset", "cifar", "--out-dir",
                                     str(out)], capsys)
    assert "unknown dataset 'cifar'" in err and "mnist-5k" in err
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "batch_size must be > 0, got 0"),
    (["--channels", "8,16", "--img-size", "30"], "img_size 30 must be divisible"),
    (["--context-tokens", "1"], "gradient"),
    (["--batch-size", "5000"], "larger than the 4500 training images"),
    (["--time-budget", "1", "--max-steps", "3"], "--time-budget and --max-steps both set the number of steps"),
    (["--time-budget", "-1"], "time_budget must be a number of minutes >= 0, got -1.0"),
    (["--time-budget", "nan"], "expected a finite number"),
    (["--time-budget", "1e-9"], "fits no training step"),
])
def test_invalid_train_settings_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    err = expect_exit_2(train.main, ["--preset", "tiny", "--device", "cpu", "--out-dir", str(out), *args], capsys)
    assert message in err
    assert not (out / "ckpt.pt").exists()


def test_time_budget_on_resume_exits_2(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copyfile(tiny_ckpt, ckpt)
    before = ckpt.read_bytes()
    err = expect_exit_2(train.main, ["--resume", str(ckpt), "--out-dir", str(tmp_path), "--time-budget", "1"], capsys)
    assert "a resumed run keeps the steps it was given" in err and "--max-steps" in err
    assert ckpt.read_bytes() == before


def test_time_budget_sizes_the_run_from_a_timed_step(tmp_path, monkeypatch, capsys):
    """The budget divided by the timed step gives --max-steps; the run is then the run of that --max-steps."""
    import trainer
    timed = []

    def fake_timer(fn, device):  # run the step (so it is exercised) but report 0.5 s for it
        fn()
        timed.append(1)
        return 0.5
    real = trainer.steps_for_budget
    monkeypatch.setattr(train, "steps_for_budget", lambda *a, **k: real(*a, **k, timer=fake_timer))
    base = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--sample-every", "0"]
    train.main([*base, "--out-dir", str(tmp_path / "budget"), "--time-budget", "0.05"])  # 3 s / 0.5 s = 6 steps
    assert len(timed) == 3
    assert "--time-budget 0.05 min at 0.500 s per step" in capsys.readouterr().out
    budget = torch.load(tmp_path / "budget" / "ckpt.pt", weights_only=True)
    assert budget["step"] == budget["config"]["train"]["max_steps"] == 6
    train.main([*base, "--out-dir", str(tmp_path / "steps"), "--max-steps", "6"])
    steps = torch.load(tmp_path / "steps" / "ckpt.pt", weights_only=True)
    for k, v in steps["ema"].items():  # timing the step on a copy left the run's weights and noise alone
        assert torch.equal(v, budget["ema"][k]), k


def test_the_strength_is_one_weight_negatives_allowed():
    import evaluate
    for module in (denoise, evaluate):
        for flag in ("--lora-weight", "--lora-scale"):  # --lora-scale: the old name, kept
            assert module.parse_args([flag, "-0.5"]).lora_weight == -0.5


@pytest.mark.parametrize("args,message", [
    (["--labels", "11"], "every label must be in 0..9"),
    (["--labels", "a,b"], "expected integers"),
    (["--steps", "0"], "steps must be > 0, got 0"),
    (["--steps", "51"], "--steps 51 exceeds the model's T=50"),
    (["--sampler", "euler"], "sampler must be one of ddim, dpmpp-2m, heun, ddpm"),
    (["--merge"], "--merge needs --lora"),
    (["--n-per-label", "0"], "--n-per-label must be > 0"),
    (["--lora-weight", "-10.5"], "--lora-weight must be >= -10"),  # config.WEIGHT_RANGE
    (["--lora-scale", "11"], "--lora-scale must be <= 10"),  # the flag's old name still runs
])
def test_denoise_bad_arguments_exit_2(tiny_ckpt, tmp_path, capsys, args, message):
    err = expect_exit_2(denoise.main, ["--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path / "out"), *args], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_denoise_missing_checkpoint_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    err = expect_exit_2(denoise.main, ["--ckpt", str(missing), "--out-dir", str(tmp_path / "out")], capsys)
    assert f"base checkpoint '{missing}' not found" in err and "python train.py" in err


def test_denoise_truncated_checkpoint_exits_2(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(open(tiny_ckpt, "rb").read()[:1000])
    err = expect_exit_2(denoise.main, ["--ckpt", str(bad), "--out-dir", str(tmp_path / "out")], capsys)
    assert str(bad) in err and "truncated or corrupt" in err


def test_denoise_bad_adapters_exit_2(tiny_ckpt, tiny_adapter, tmp_path, capsys):
    base = ["--ckpt", str(tiny_ckpt), "--out-dir", str(tmp_path / "out"), "--steps", "2", "--frames", "0"]
    missing = tmp_path / "no_lora"
    err = expect_exit_2(denoise.main, base + ["--lora", str(missing)], capsys)
    assert f"LoRA adapter '{missing}' not found" in err and "lora_finetune.py" in err
    err = expect_exit_2(denoise.main, base + ["--lora", str(tiny_ckpt)], capsys)
    assert "not a LoRA adapter" in err
    # an adapter trained on another base: refused, unless --force
    other_path = tmp_path / "other"
    write_adapter(other_path, load_adapter(tiny_adapter).replace(base_fingerprint="0123456789abcdef"))
    err = expect_exit_2(denoise.main, base + ["--lora", str(other_path)], capsys)
    assert "trained on base 0123456789abcdef" in err and "--force" in err
    assert not (tmp_path / "out" / "lora_samples.png").exists()
    denoise.main(base + ["--lora", str(other_path), "--force"])
    assert (tmp_path / "out" / "lora_samples.png").exists()


# ------------------------------------------------------------------ real processes (slow)

def run_script(script, *args, cwd):
    """Run a script as a user would; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_train_lora_denoise_pipeline(tmp_path):
    out = tmp_path / "out"
    check_ok(run_script("train.py", "--preset", "tiny", "--out-dir", out, cwd=tmp_path))
    ckpt = out / "ckpt.pt"
    assert (out / "config.json").exists() and (out / "samples" / "final.png").exists()
    # the defaults, as the quick start runs them: out/ckpt.pt -> out/lora/ -> denoise.py --lora --merge
    check_ok(run_script("lora_finetune.py", "--preset", "tiny", cwd=tmp_path))
    proc = run_script("denoise.py", "--steps", "5", "--lora", "--merge", cwd=tmp_path)
    check_ok(proc)
    assert "merged" in proc.stdout
    for name, size in (("lora_samples.png", grid_size(10, 1)), ("lora_weight_sweep.png", preview_size(5, 10))):
        with Image.open(out / name) as im:
            assert im.size == size
    with Image.open(out / "lora_samples_process.png") as im:
        im.load()
    with np.load(out / "lora_samples.npz") as npz:
        assert npz["images"].shape == (10, 28, 28) and npz["images"].dtype == np.uint8
        assert npz["labels"].tolist() == list(range(10))
    base = torch.load(ckpt, map_location="cpu", weights_only=True)
    adapter = load_adapter(out / "lora")
    assert adapter.base_fingerprint == state_fingerprint(base["ema"])
    assert adapter_size(out / "lora") * 5 < os.path.getsize(ckpt)
    # the base pipeline too, from the defaults' point of view: out/ under the working directory
    check_ok(run_script("denoise.py", "--steps", "5", "--frames", "0", cwd=tmp_path))
    assert (out / "samples.png").exists() and (out / "samples.npz").exists()


@pytest.mark.slow
def test_scripts_fail_cleanly_as_processes(tmp_path):
    proc = run_script("denoise.py", "--ckpt", tmp_path / "missing.pt", "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_script("lora_finetune.py", "--r", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "LoRA rank r must be > 0" in proc.stderr
    proc = run_script("train.py", "--preset", "nope", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    assert os.listdir(tmp_path) == []  # nothing written by failed runs


@pytest.mark.slow
def test_scripts_import_without_side_effects(tmp_path):
    """No work at import time: importing each script creates no files and prints nothing."""
    code = ("import train, lora_finetune, denoise, evaluate, bench, lora_tools, runtime, checkpoint, trainer, adapter, "
            "dataset, diffusion, unet, lora, config")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and os.listdir(tmp_path) == []


SCRIPTS = ("train", "lora_finetune", "denoise", "evaluate", "bench", "lora_tools", "app")


def test_no_module_imports_a_script():
    """Scripts sit on top: what two of them share lives in a module below, never in another script."""
    import ast

    offenders = []
    for name in os.listdir(ROOT):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{name} imports {m}" for m in imported if m.split(".")[0] in SCRIPTS]
    assert not offenders, offenders


def test_denoise_png_carries_its_settings_as_text(tiny_ckpt, tiny_adapter, tmp_path):
    run_denoise(tiny_ckpt, tmp_path, "--lora", f"{tiny_adapter}:0.5", "--labels", "3,7", "--seed", "5",
                "--guidance", "1.5", "--frames", "0", "--precision", "fp32")
    with Image.open(tmp_path / "lora_samples.png") as im:
        text = dict(im.text)
    assert text["ckpt"] == str(tiny_ckpt) and text["lora"] == f"{tiny_adapter}:0.5"
    assert (text["seed"], text["labels"], text["guidance"], text["steps"]) == ("5", "3,7", "1.5", "5")
    assert "seed: 5" in text["parameters"] and "sampler: dpmpp-2m" in text["parameters"]


def test_lora_finetune_config_file_is_the_same_fine_tune_as_its_flags(tiny_ckpt, tmp_path, capsys):
    toml = tmp_path / "style.toml"
    toml.write_text('[lora]\nr = 1\nalpha = 1.0\nlora_steps = 2\n\n[runtime]\nseed = 3\nprecision = "fp32"\n')
    common = ["--preset", "tiny", "--ckpt", str(tiny_ckpt), "--preview-every", "0"]
    lora_finetune.main([*common, "--config", str(toml), "--out", str(tmp_path / "from_file")])
    assert "settings from" in capsys.readouterr().out
    lora_finetune.main([*common, "--r", "1", "--alpha", "1", "--lora-steps", "2", "--seed", "3", "--precision",
                        "fp32", "--out", str(tmp_path / "from_flags")])
    a, b = load_adapter(str(tmp_path / "from_file")), load_adapter(str(tmp_path / "from_flags"))
    assert a.r == 1 and set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # a flag given beside the file wins over it
    lora_finetune.main([*common, "--config", str(toml), "--r", "2", "--out", str(tmp_path / "flag_wins")])
    assert load_adapter(str(tmp_path / "flag_wins")).r == 2
    err = expect_exit_2(lora_finetune.main, [*common, "--config", str(toml), "--resume", str(tmp_path / "from_file")],
                        capsys)
    assert "--config starts a new fine-tune" in err
