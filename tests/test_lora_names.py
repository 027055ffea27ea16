"""<lora:NAME:WEIGHT> wherever PATH:WEIGHT is taken: parsed by cli.lora_spec, NAME looked up under out/ and --lora-dir
by adapter_formats.find_adapter (the folders the page lists), the same samples as the folder's path."""
import argparse
import shutil

import numpy as np
import pytest
import torch

import denoise
import evaluate
import lora_tools
from adapter_formats import find_adapter
from cli import LoraSpec, lora_spec, resolve_lora_names
from lora import LoraError


@pytest.fixture
def roots(tmp_path, tiny_adapter, monkeypatch):
    """out/ (the default root, in a fresh working folder) with out/italic and out/fonts/my.serif, and a --lora-dir
    holding bold and a second serif folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_adapter, tmp_path / "out" / "italic")
    shutil.copytree(tiny_adapter, tmp_path / "out" / "fonts" / "my.serif")
    shutil.copytree(tiny_adapter, tmp_path / "mine" / "bold")
    shutil.copytree(tiny_adapter, tmp_path / "mine" / "more" / "my.serif")
    (tmp_path / "mine" / "notes").mkdir()  # a folder without an adapter is no name
    return tmp_path


@pytest.mark.parametrize("text,expected", [
    ("<lora:italic>", ("", 1.0, "<lora:italic>", "italic")),
    ("<lora:italic:0.8>", ("", 0.8, "<lora:italic:0.8>", "italic")),
    (" <lora:fonts/serif:-0.5> ", ("", -0.5, " <lora:fonts/serif:-0.5> ", "fonts/serif")),
])
def test_lora_tags_parse_to_a_name_and_a_weight(text, expected):
    assert lora_spec(text) == expected


@pytest.mark.parametrize("text,message", [
    ("<lora:italic:abc>", "the weight 'abc' is not a number"),
    ("<lora:italic:11>", "the weight must be a finite number from -10 to 10"),
    ("<lora:italic:nan>", "the weight must be a finite number"),
    ("<lora:>", "write <lora:NAME> or <lora:NAME:WEIGHT>"),
    ("<lora:italic:0.5", "write <lora:NAME> or <lora:NAME:WEIGHT>"),
])
def test_bad_lora_tags_are_refused_while_parsing(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        lora_spec(text)


def test_find_adapter_by_folder_name_or_path(roots):
    out, mine = str(roots / "out"), str(roots / "mine")
    assert find_adapter("italic", [out, mine]) == str(roots / "out" / "italic")
    assert find_adapter("bold", [out, mine]) == str(roots / "mine" / "bold")
    assert find_adapter("my_serif", [out]) == str(roots / "out" / "fonts" / "my.serif")  # the page's name for it
    assert find_adapter("more/my.serif", [out, mine]) == str(roots / "mine" / "more" / "my.serif")
    with pytest.raises(LoraError, match=r"2 adapters are named 'my.serif' .*fonts/my.serif, more/my.serif"):
        find_adapter("my.serif", [out, mine])
    with pytest.raises(LoraError, match="no adapter named 'serif' .* the adapters there: bold, italic, my.serif"):
        find_adapter("serif", [out, mine])


def test_resolve_leaves_paths_alone_and_checks_the_folders(roots):
    path = lora_spec("out/italic:0.5")
    named = resolve_lora_names([path, lora_spec("<lora:bold:0.3>")], ["mine"])
    assert named[0] is path and named[1] == LoraSpec(str(roots / "mine" / "bold"), 0.3, "<lora:bold:0.3>", "bold")
    from errors import CLIError
    with pytest.raises(CLIError, match="--lora-dir 'nowhere' is not a folder"):
        resolve_lora_names([lora_spec("<lora:bold>")], ["nowhere"])


def run(ckpt, out_dir, *extra):
    denoise.main(["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--device", "cpu", "--precision", "fp32",
                  "--steps", "4", "--frames", "0", "--labels", "1,7", *extra])
    with np.load(f"{out_dir}/lora_samples.npz") as z:
        return z["images"]


def test_denoise_by_name_is_denoise_by_path(roots, tiny_ckpt):
    by_path = run(tiny_ckpt, "a", "--lora", "mine/bold:0.5", "--lora", "out/italic:-1")
    by_name = run(tiny_ckpt, "b", "--lora", "<lora:bold:0.5>", "--lora", "<lora:italic:-1>", "--lora-dir", "mine")
    assert np.array_equal(by_path, by_name)
    # the PNG keeps the folder found, so --from-png draws it again without --lora-dir
    denoise.main(["--from-png", "b/lora_samples.png", "--out-dir", "c", "--device", "cpu", "--frames", "0"])
    with np.load("c/lora_samples.npz") as z:
        assert np.array_equal(z["images"], by_name)


@pytest.mark.parametrize("main,argv", [
    (denoise.main, ["--ckpt", "{ckpt}", "--out-dir", "o", "--lora", "<lora:serif:0.5>", "--lora-dir", "mine"]),
    (evaluate.main, ["--ckpt", "{ckpt}", "--out-dir", "o", "--lora", "<lora:serif:0.5>", "--lora-dir", "mine"]),
    (lora_tools.main, ["grid", "<lora:serif>", "<lora:italic>", "--ckpt", "{ckpt}", "--out", "o/g.png"]),
])
def test_an_unknown_name_lists_the_names_and_writes_nothing(roots, tiny_ckpt, capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main([a.format(ckpt=tiny_ckpt) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "no adapter named 'serif'" in err and "the adapters there: " in err and "italic" in err
    assert not (roots / "o").exists()


def test_the_page_takes_lora_tags(roots, tiny_ckpt):
    from studio import PageError, Studio

    s = Studio(tiny_ckpt, "out", ["mine"], device=torch.device("cpu"), precision="fp32", preset="tiny",
               log=lambda *a: None)
    names = {e.name for e in s.usable()}
    assert {"italic", "bold"} <= names
    assert s.weights_from_tags("a 7 <lora:italic:0.5> and <lora:bold>") == {"italic": 0.5, "bold": 1.0}
    with pytest.raises(PageError, match="no loaded adapter named 'serif'; the adapters here: "):
        s.weights_from_tags("<lora:serif:1>")
    with pytest.raises(PageError, match="the weight must be a finite number"):
        s.weights_from_tags("<lora:italic:20>")
