"""The command line of every script: one parser class, --help that teaches, one-line errors, one runtime config.

Every script exposes ``build_parser()``; these tests walk each parser (and lora_tools' sub-commands):
every flag has its one-line reason, its default and its choices in --help, in a section; argparse's own
errors (a bad choice, a missing value, an unknown flag) are one ``error: ...`` line and exit code 2, an
unknown flag naming the script's nearest flags (with the names kohya and diffusers use); and --device,
--precision and --seed are the one declaration of config.RuntimeConfig, with the precision decided in
one place (runtime.resolve_precision), once per script.
"""
import argparse
import ast
import dataclasses
import importlib
import json
import os

import pytest
import torch

import cli
import config
from checkpoint import load_checkpoint, save_checkpoint
from config import DEVICES, PRECISIONS, RuntimeConfig, TrainConfig, from_saved, saved_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train", "lora_finetune", "denoise", "evaluate", "bench", "lora_tools", "app"]
TRAINING_SCRIPTS = ["train", "lora_finetune", "bench"]


def parsers():
    """(name, parser) for every script's parser and every sub-command's."""
    out = []
    for name in SCRIPTS:
        p = importlib.import_module(name).build_parser()
        out.append((name, p))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]
    return out


PARSERS = parsers()
IDS = [n for n, _ in PARSERS]


def visible(parser):
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def help_of(parser, action):
    return parser._get_formatter()._expand_help(action)


def config_field(dest):
    for cls in (c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)):
        for f in dataclasses.fields(cls):
            if f.name == dest:
                return f
    return None


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_builds_its_parser_from_the_one_class(name):
    parser = importlib.import_module(name).build_parser()
    assert isinstance(parser, cli.ArgumentParser)
    assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, cli.HelpFormatter)


@pytest.mark.parametrize("name,parser", PARSERS, ids=IDS)
def test_every_flag_has_help_its_default_and_its_choices(name, parser):
    for action in visible(parser):
        text = help_of(parser, action)
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and text.strip(), f"{name} {flag}: no help"
        # a setting's flag defaults to None (the preset fills it) and gives the field's default in its help
        field = config_field(action.dest) if action.option_strings and action.default is None else None
        shows_default = (action.default not in (None, False) and action.nargs != 0) or field is not None
        if shows_default and not isinstance(action, argparse._SubParsersAction):
            assert "default" in text, f"{name} {flag}: the help gives no default: {text!r}"
        choices = list(action.choices or ()) if not isinstance(action, argparse._SubParsersAction) else []
        if field is not None and "choices" in field.metadata:
            choices = list(field.metadata["choices"])
        rendered = " ".join(parser.format_help().split())
        for c in choices:
            assert str(c) in rendered, f"{name} {flag}: choice {c!r} not listed in --help"


@pytest.mark.parametrize("name", SCRIPTS)
def test_flags_are_in_sections(name):
    """Flags sit in sections (data, model, LoRA, sampling, runtime, output...), not in one long "options" list."""
    parser = importlib.import_module(name).build_parser()
    loose = [a.option_strings[0] for a in parser._optionals._group_actions
             if a.option_strings and a.help is not argparse.SUPPRESS
             and a.option_strings[0] not in ("-h", "--preset", "--config")]
    assert not loose, f"{name}: flags outside any section: {loose}"
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert "runtime" in titles or parser._subparsers is not None  # lora_tools: its grid command has them


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_the_usage_and_exits_0(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and ("runtime:" in out or "COMMAND" in out)


# ------------------------------------------------------------ one-line errors

def one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "usage:" not in err
    return lines[0]


@pytest.mark.parametrize("name", ["train", "lora_finetune", "denoise", "evaluate", "bench", "app"])
def test_argparse_errors_are_one_line(name, capsys):
    main = importlib.import_module(name).main
    assert "--seed: expected one argument" in one_line_error(main, ["--seed"], capsys)
    assert "invalid int value: 'x'" in one_line_error(main, ["--seed", "x"], capsys)
    line = one_line_error(main, ["--bogus-flag"], capsys)
    assert "--bogus-flag: unknown flag" in line and "unrecognized arguments: --bogus-flag" in line


@pytest.mark.parametrize("name", ["train", "lora_finetune", "denoise", "evaluate", "bench"])
def test_a_setting_outside_its_choices_is_one_line_before_any_work(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(importlib.import_module(name).main, ["--precision", "fp64"], capsys)
    assert "unknown precision 'fp64': precision must be one of auto, fp32, bf16, fp16" in line
    assert os.listdir(tmp_path) == []


def test_a_bad_choice_is_one_line(capsys):
    import train
    line = one_line_error(train.main, ["--preset", "huge"], capsys)
    assert "invalid choice: 'huge'" in line and "tiny" in line
    import lora_tools
    line = one_line_error(lora_tools.main, ["merge", "a", "--out", "b", "--mode", "mean"], capsys)
    assert "invalid choice: 'mean'" in line
    line = one_line_error(lora_tools.main, ["resize", "a"], capsys)
    assert "required" in line and "--rank" in line


@pytest.mark.parametrize("name,typed,expected", [
    ("lora_finetune", "--network_dim", "--r"),
    ("lora_finetune", "--network-dim", "--r"), ("lora_finetune", "--network_alpha", "--alpha"),
    ("lora_finetune", "--epochs", "--lora-steps"), ("lora_finetune", "--num_train_epochs", "--lora-steps"),
    ("lora_finetune", "--learning_rate", "--lora-lr"), ("lora_finetune", "--output_dir", "--out"),
    ("lora_finetune", "--train_batch_size", "--lora-batch-size"),
    ("lora_finetune", "--max_train_steps", "--lora-steps"),
    ("lora_finetune", "--mixed_precision", "--precision"), ("lora_finetune", "--instance_data_dir", "--data"),
    ("lora_finetune", "--train_data_dir", "--data"),
    ("train", "--epochs", "--max-steps"), ("train", "--learning_rate", "--lr"), ("train", "--output_dir", "--out-dir"),
    ("train", "--resolution", "--img-size"), ("train", "--train_batch_size", "--batch-size"),
    ("train", "--max_train_steps", "--max-steps"), ("train", "--batch_size", "--batch-size"),
    ("denoise", "--output_dir", "--out-dir"), ("denoise", "--guidance_scale", "--guidance"),
    ("denoise", "--lora_weight", "--lora-weight"),
    # train.py's flags, given to the fine-tune, name its own (and not --r, which --lr is closest to by spelling)
    ("lora_finetune", "--lr", "--lora-lr"), ("lora_finetune", "--max-steps", "--lora-steps"),
    ("lora_finetune", "--batch-size", "--lora-batch-size"),
])
def test_an_unknown_flag_names_the_nearest(name, typed, expected, capsys):
    module = importlib.import_module(name)
    assert expected in cli.flags_of(module.build_parser()), f"{name} has no {expected}"
    line = one_line_error(module.main, [typed, "1"], capsys)
    assert f"{typed}: unknown flag; did you mean" in line and expected in line, line
    if "epochs" in typed:
        assert "steps, not epochs" in line


@pytest.mark.parametrize("name", ["train", "lora_finetune", "denoise", "evaluate", "bench", "app"])
def test_only_flags_the_script_has_are_offered(name):
    parser = importlib.import_module(name).build_parser()
    flags = cli.flags_of(parser)
    for typed in list(cli.FOREIGN_FLAGS) + ["--rank", "--steps_total", "--sed", "--out_dir"]:
        for suggestion in cli.suggest(typed, flags):
            assert suggestion in flags, (typed, suggestion)
    assert "--r" not in cli.suggest("--rank", flags) or "--r" in flags


def test_the_rank_is_r_everywhere_and_rank_its_alias():
    import lora_finetune
    import lora_tools
    for argv in (["--r", "8"], ["--rank", "8"]):
        assert lora_finetune.parse_args(argv).r == 8
        assert lora_tools.parse_args(["resize", "a", "--out", "b", *argv]).r == 8
        assert lora_tools.parse_args(["extract", "--tuned", "t", "--out", "b", *argv]).r == 8
        assert lora_tools.parse_args(["merge", "a", "b", "--out", "c", "--mode", "svd", *argv]).r == 8


def test_a_sub_commands_flags_are_offered_for_it(capsys):
    import lora_tools
    line = one_line_error(lora_tools.main, ["merge", "a", "--rnak", "2", "--out", "b"], capsys)
    assert "did you mean --rank?" in line


# ------------------------------------------------------------ one runtime config

@pytest.mark.parametrize("name", ["train", "lora_finetune", "denoise", "evaluate", "bench", "lora_tools grid"])
def test_device_precision_and_seed_are_declared_once(name):
    parser = dict(PARSERS)[name]
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    assert by_flag["--device"].metavar == "{" + ",".join(DEVICES) + "}"
    assert by_flag["--precision"].metavar == "{" + ",".join(PRECISIONS) + "}"
    for flag in ("--device", "--precision", "--seed"):
        field = {f.name: f for f in dataclasses.fields(RuntimeConfig)}[flag[2:]]
        assert by_flag[flag].help == cli.field_help(field, field.default).replace("%", "%%")


def test_precision_is_decided_in_one_place_once_per_script():
    for name in SCRIPTS:
        with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
            source = f.read()
        calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("resolve_precision",
                                                                                 "fastest_precision")]
        assert len(calls) <= 1, f"{name}.py decides the precision {len(calls)} times"
        if name in TRAINING_SCRIPTS:  # they time their step on CUDA: the same rule as train.py
            assert calls and len(calls[0].args) >= 3 and ast.unparse(calls[0].args[2]) == "probe", name


def test_old_train_settings_keep_loading():
    """A TrainConfig saved before RuntimeConfig holds device, precision and seed: they load into RuntimeConfig."""
    old = {**dataclasses.asdict(TrainConfig()), "device": "cpu", "precision": "fp32", "seed": 7}
    assert from_saved(TrainConfig, old) == TrainConfig()
    assert RuntimeConfig(**saved_runtime(None, old)) == RuntimeConfig("cpu", "fp32", 7)
    assert saved_runtime({"device": "auto", "precision": "bf16", "seed": 3}, old) == \
        {"device": "auto", "precision": "bf16", "seed": 3}  # the runtime section wins where there is one
    assert config.config_dict(RuntimeConfig(seed=5)) == {"runtime": {"device": "auto", "precision": "auto", "seed": 5}}


def test_a_checkpoint_saved_before_the_runtime_section_resumes_with_its_seed(tiny_ckpt, tmp_path, capsys):
    import train
    ckpt = load_checkpoint(tiny_ckpt)
    saved = {k: v for k, v in ckpt["config"].items() if k != "runtime"}
    saved["train"] = {**saved["train"], "device": "cpu", "precision": "fp32", "seed": 7}  # where they were
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint({**ckpt, "config": saved}, str(run / "ckpt.pt"))
    train.main(["--resume", "--out-dir", str(run), "--max-steps", str(ckpt["step"] + 1), "--sample-every", "0"])
    resumed = load_checkpoint(str(run / "ckpt.pt"))
    assert resumed["step"] == ckpt["step"] + 1
    assert resumed["config"]["runtime"] == {"device": "cpu", "precision": "fp32", "seed": 7}
    assert "device" not in resumed["config"]["train"] and "seed" not in resumed["config"]["train"]
    assert "fp32" in capsys.readouterr().out


def test_a_new_checkpoint_saves_its_runtime_section(tiny_ckpt):
    saved = load_checkpoint(tiny_ckpt)["config"]
    assert saved["runtime"] == {"device": "cpu", "precision": "fp32", "seed": 0}
    assert set(saved["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_bench_refuses_mps_before_any_work(tmp_path, capsys):
    import bench
    line = one_line_error(bench.main, ["--device", "mps", "--out", str(tmp_path / "b.json")], capsys)
    assert "--device cpu" in line
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------ --config FILE

def test_a_run_started_from_its_own_config_json_is_the_same_run(tmp_path, capsys):
    import train
    first, second = tmp_path / "first", tmp_path / "second"
    train.main(["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--seed", "3", "--lr", "0.003",
                "--channels", "8,16", "--sample-every", "0", "--out-dir", str(first)])
    capsys.readouterr()
    train.main(["--config", str(first / "config.json"), "--out-dir", str(second)])  # no --preset: the file's
    out = capsys.readouterr().out
    assert f"settings from {first / 'config.json'}" in out and "lr=0.003" in out and "seed=3" in out
    assert "flags given win" in out
    a, b = load_checkpoint(str(first / "ckpt.pt")), load_checkpoint(str(second / "ckpt.pt"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())
    expected = {**a["config"], "train": {**a["config"]["train"], "out_dir": str(second)}}
    assert b["config"] == expected


def test_a_config_file_is_checked_like_flags(tmp_path, capsys):
    import train
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"lr": 0.1, "learning_rate": 1}}))
    line = one_line_error(train.main, ["--config", str(bad), "--out-dir", str(tmp_path / "o")], capsys)
    assert "train has no setting 'learning_rate'" in line
    bad.write_text(json.dumps({"model": {"dropout": 1.5}}))
    assert "dropout must be < 1" in one_line_error(train.main, ["--config", str(bad), "--out-dir",
                                                                str(tmp_path / "o")], capsys)
    bad.write_text(json.dumps({"optimizer": {}}))
    assert "unknown section 'optimizer'" in one_line_error(train.main, ["--config", str(bad)], capsys)
    line = one_line_error(train.main, ["--config", str(tmp_path / "missing.json")], capsys)
    assert "no such file" in line
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]


def test_a_toml_config_gives_its_sections_and_flags_win(tmp_path):
    import train
    path = tmp_path / "run.toml"
    path.write_text('[model]\nchannels = [8, 16]\nnum_heads = 2\n\n[train]\nlr = 0.005\nmax_steps = 7\n\n'
                    '[runtime]\nseed = 11\n')
    args = train.parse_args(["--config", str(path), "--max-steps", "9"])
    tcfg, mcfg, _, rcfg, _, _ = train.resolve_configs(args)
    assert mcfg.channels == (8, 16) and mcfg.num_heads == 2
    assert tcfg.lr == 0.005 and tcfg.max_steps == 9  # the flag wins over the file
    assert rcfg.seed == 11
    assert "lr=0.005" in cli.config_file_note(args) and "max_steps" not in cli.config_file_note(args)
