"""Every number a setting holds is bounded where it is declared, and checked at start-up before any work.

The cases are generated from the fields of every dataclass in config.py (config.setting declares a field's
help, bounds and choices in its metadata), so a new field is covered by declaring it: one without bounds,
or a class whose __post_init__ forgets check_settings, fails here. Then the command lines that once failed
late (an allocation error, a ZeroDivisionError, a picture written before the failure) run through each
script's main(argv): exit code 2, one ``error: ...`` line, nothing written.
"""
import dataclasses
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
import config
import dataset
import denoise
import evaluate
import lora_finetune
import lora_tools
import train
from config import SEED_MAX, check_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDS = ("ge", "gt", "le", "lt")
CLASSES = [c for _, c in inspect.getmembers(config, inspect.isclass)
           if dataclasses.is_dataclass(c) and c.__module__ == "config"]


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_fields():
    """(class, field, integer?) for every field that holds a number or a tuple of numbers."""
    out = []
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            items = f.default if isinstance(f.default, tuple) else (f.default,)
            kind = f.metadata.get("item") or (type(items[0]) if items and is_number(items[0]) else None)
            if kind in (int, float):
                out.append(pytest.param(cls, f, kind is int, id=f"{cls.__name__}.{f.name}"))
    return out


NUMERIC = numeric_fields()


def outside(meta, integer):
    """Values just outside the declared bounds: one step past each, and for floats what overflows later."""
    values = []
    if "ge" in meta:
        values.append(meta["ge"] - 1 if integer else math.nextafter(meta["ge"], -math.inf))
    if "gt" in meta:
        values.append(meta["gt"])
    if "le" in meta:
        values.append(meta["le"] + 1 if integer else math.nextafter(meta["le"], math.inf))
    if "lt" in meta:
        values.append(meta["lt"])
    if not integer:
        values += [1e308, -1e308, math.nan]
    return values


def inside(meta, integer):
    """The boundary values inside the bounds."""
    values = []
    if "ge" in meta:
        values.append(meta["ge"])
    if "gt" in meta:
        values.append(meta["gt"] + 1 if integer else math.nextafter(meta["gt"], math.inf))
    if "le" in meta:
        values.append(meta["le"])
    if "lt" in meta:
        values.append(meta["lt"] - 1 if integer else math.nextafter(meta["lt"], -math.inf))
    return values


def as_field_value(f, v):
    """``v`` in the field's shape: a tuple field gets a tuple of it (two items, as the ranges lo,hi take)."""
    if isinstance(f.default, tuple):
        return (v,) * max(len(f.default), 2) if f.name != "attn_levels" else (v,)
    return v


def test_the_config_module_has_the_classes_the_scripts_use():
    names = {c.__name__ for c in CLASSES}
    assert {"ModelConfig", "DiffusionConfig", "TrainConfig", "SampleConfig", "LoraConfig", "RuntimeConfig"} <= names
    assert len(NUMERIC) > 40


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help_and_every_number_both_bounds(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help text (config.setting)"
    for param in NUMERIC:
        c, f, _ = param.values
        if c is cls:
            meta = f.metadata
            assert ("ge" in meta or "gt" in meta) and ("le" in meta or "lt" in meta), \
                f"{cls.__name__}.{f.name} needs a lower and an upper bound"


@pytest.mark.parametrize("cls,f,integer", NUMERIC)
def test_a_value_just_outside_the_bounds_is_refused_naming_the_field(cls, f, integer):
    for v in outside(f.metadata, integer):
        with pytest.raises(ValueError) as e:
            cls(**{f.name: as_field_value(f, v)})
        assert f.name in str(e.value), (v, str(e.value))
        obj = cls()  # the generic check alone, on an object built from the defaults
        setattr(obj, f.name, as_field_value(f, v))
        with pytest.raises(ValueError, match=f.name):
            check_settings(obj)


@pytest.mark.parametrize("cls,f,integer", NUMERIC)
def test_the_boundary_values_inside_are_accepted(cls, f, integer):
    for v in inside(f.metadata, integer):
        obj = cls()
        setattr(obj, f.name, as_field_value(f, v))
        check_settings(obj)  # the cross-field checks (divisibility, lo < hi) are the class's own, tested elsewhere


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_and_presets_are_inside_their_bounds(cls):
    cls()
    for preset in config.PRESETS:
        config.preset_config(cls, preset)


def test_choices_are_checked_and_named():
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata:
                with pytest.raises(ValueError, match=f"unknown {f.name} 'nope': {f.name} must be one of"):
                    cls(**{f.name: "nope"})


def test_paths_are_never_empty():
    paths = [(cls, f) for cls in CLASSES for f in dataclasses.fields(cls) if f.metadata.get("path")]
    assert {f.name for _, f in paths} >= {"out_dir", "data_dir"}
    for cls, f in paths:
        for empty in ("", "  "):
            with pytest.raises(ValueError, match=f"{f.name} is an empty path"):
                cls(**{f.name: empty})


def test_num_heads_must_divide_the_width_it_splits():
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        config.ModelConfig(num_heads=0)
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        config.ModelConfig(num_heads=3)


def test_the_largest_seed_runs_everywhere_a_seed_goes():
    """The scripts add small offsets to the seed (seed + 3) and the data order mixes it (seed * 100003 + epoch):
    every one of those stays a seed torch takes."""
    from runtime import Dist
    from trainer import epoch_batches
    config.RuntimeConfig(seed=SEED_MAX)
    for offset in range(4):
        torch.Generator().manual_seed(SEED_MAX + offset)
    order = epoch_batches(10, 5, 7, SEED_MAX, Dist())
    assert sorted(torch.cat(order).tolist()) == list(range(10))


def test_the_datasets_offered_are_the_datasets_read():
    assert config.DATASETS == dataset.DATASETS


# ------------------------------------------------------------ the command lines

BIG_SEED = "99999999999999999999999"


def cli_cases(tmp):
    """(main, argv, what the one line must say) for the command lines that failed late or silently."""
    out = str(tmp / "out")
    tiny = ["--preset", "tiny", "--device", "cpu", "--out-dir", out]
    lora = ["--preset", "tiny", "--device", "cpu", "--ckpt", str(tmp / "ckpt.pt"), "--out", out]
    sample = ["--ckpt", str(tmp / "ckpt.pt"), "--device", "cpu", "--out-dir", out]
    return [
        (train.main, [*tiny, "--dropout", "1.5"], "dropout must be < 1, got 1.5"),
        (train.main, [*tiny, "--dropout", "-1"], "dropout must be >= 0"),
        (train.main, [*tiny, "--weight-decay", "-1"], "weight_decay must be >= 0"),
        (train.main, [*tiny, "--seed", BIG_SEED], f"seed must be <= {SEED_MAX}"),
        (train.main, [*tiny, "--channels", "1000000,16"], "channels must be <= 4096"),
        (train.main, [*tiny, "--num-heads", "0"], "num_heads must be >= 1"),
        (train.main, [*tiny, "--time-budget", "1e308"], "time_budget must be a number of minutes <= 10080"),
        (train.main, [*tiny, "--min-lr-ratio", "-5"], "min_lr_ratio must be >= 0"),
        (train.main, [*tiny, "--grad-clip", "-1"], "grad_clip must be >= 0"),
        (train.main, [*tiny[:-1], ""], "--out-dir: an empty path"),
        (train.main, [*tiny, "--data-dir", ""], "--data-dir: an empty path"),
        (lora_finetune.main, [*lora, "--seed", BIG_SEED], "seed must be <="),
        (lora_finetune.main, [*lora, "--alpha", "1e308"], "alpha must be <= 10000"),
        (lora_finetune.main, [*lora[:-1], ""], "--out: an empty path"),
        (denoise.main, [*sample, "--seed", BIG_SEED], "seed must be <="),
        (denoise.main, [*sample, "--lora", str(tmp / "lora"), "--lora-weight", "1e308"], "--lora-weight must be <= 10"),
        (denoise.main, [*sample, "--guidance", "1e308"], "guidance must be <= 100"),
        (denoise.main, [*sample, "--eta", "1e308"], "eta must be <= 1"),
        (denoise.main, [*sample[:-1], ""], "--out-dir: an empty path"),
        (evaluate.main, [*sample, "--seed", BIG_SEED], "seed must be <="),
        (bench.main, ["--seed", BIG_SEED, "--out", str(tmp / "b.json")], "seed must be <="),
        (bench.main, ["--min-time", "inf", "--out", str(tmp / "b.json")], "--min-time: expected a finite number"),
        (lora_tools.main, ["grid", "a", "b", "--seed", BIG_SEED, "--out", str(tmp / "g.png")], "seed must be <="),
        (lora_tools.main, ["render-style", "font:DejaVu Sans", "--seed", BIG_SEED, "--out", out], "--seed must be <="),
    ]


def test_bad_numbers_on_the_command_line_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts' default paths (out/...) land here too
    for main, argv, message in cli_cases(tmp_path):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert message in lines[0], (argv, lines[0])
        assert os.listdir(tmp_path) == [], (argv, os.listdir(tmp_path))


def test_a_bad_number_stops_a_real_process(tmp_path):
    for script, args in (("train.py", ["--dropout", "1.5"]), ("denoise.py", ["--guidance", "1e308"])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, "--out-dir", str(tmp_path / "o")],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
        assert os.listdir(tmp_path) == []
