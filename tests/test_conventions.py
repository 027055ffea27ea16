"""Rules that hold over the whole code: few positional parameters, default paths spelled once, one output-flag
convention. Each test walks every top-level module, so a new function or script is held to them too."""
import argparse
import ast
import glob
import importlib
import inspect
import os

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py")))
MAX_POSITIONAL = 8


def _code_objects(code):
    """``code`` and every function, lambda and method defined inside it, however deep."""
    yield code
    for const in code.co_consts:
        if inspect.iscode(const):
            yield from _code_objects(const)


def _functions_of(module):
    """The code of every function defined in ``module`` (its classes' methods, nested functions and lambdas
    included); functions imported from elsewhere and the __init__ a dataclass generates (its fields are the
    grouping this rule asks for) are left out: their code lives in another file."""
    path = os.path.abspath(module.__file__)
    tops = []
    for obj in vars(module).values():
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            tops += [getattr(m, "__func__", m) for m in vars(obj).values()
                     if inspect.isfunction(getattr(m, "__func__", m)) or isinstance(m, property)]
            tops = [t.fget if isinstance(t, property) else t for t in tops]
        elif inspect.isfunction(obj):
            tops.append(obj)
    seen = set()
    for fn in tops:
        fn = inspect.unwrap(fn)
        for code in _code_objects(fn.__code__):
            if os.path.abspath(code.co_filename) == path and code not in seen:
                seen.add(code)
                yield code


def positional_parameters(code):
    """The parameters a caller can pass by position (``self`` and ``cls`` of a method are not the caller's)."""
    names = code.co_varnames[:code.co_argcount]
    return [n for i, n in enumerate(names) if not (i == 0 and n in ("self", "cls"))]


@pytest.mark.parametrize("name", MODULES)
def test_no_function_takes_more_than_eight_positional_parameters(name):
    module = importlib.import_module(name)
    codes = list(_functions_of(module))
    assert codes, f"{name}: no function found, so nothing was checked"
    too_many = [f"{name}.{c.co_qualname} (line {c.co_firstlineno}): {len(positional_parameters(c))} positional "
                f"parameters {positional_parameters(c)}" for c in codes
                if len(positional_parameters(c)) > MAX_POSITIONAL]
    assert not too_many, ("make the rest keyword-only (after a *) or group them into a small dataclass:\n"
                          + "\n".join(too_many))


def test_the_rule_sees_methods_nested_functions_and_lambdas():
    src = ("class A:\n    def m(self, a, b, c, d, e, f, g, h, i):\n        pass\n"
           "def outer():\n    def inner(a, b, c, d, e, f, g, h, i, *, j):\n        pass\n"
           "    return lambda a, b, c, d, e, f, g, h, i: 0\n")
    code = compile(src, os.path.join(ROOT, "example.py"), "exec")
    found = {c.co_name: len(positional_parameters(c)) for c in _code_objects(code) if c.co_name != "<module>"}
    assert found == {"A": 0, "m": 9, "outer": 0, "inner": 9, "<lambda>": 9}


# ------------------------------------------------------------------ default paths

def _string_constants(path):
    """(line, value) of every string literal in a file's code, docstrings left out (they show commands)."""
    tree = ast.parse(open(path).read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _default_values(path):
    """(line, value) of every string given as a default: a parameter's, or argparse's ``default=``."""
    tree = ast.parse(open(path).read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            found += [d for d in node.defaults + node.kw_defaults if d is not None]
        elif isinstance(node, ast.keyword) and node.arg in ("default", "const"):
            found.append(node.value)
    return [(n.lineno, n.value) for n in found if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@pytest.mark.parametrize("name", [m for m in MODULES if m != "config"])
def test_default_paths_are_spelled_only_in_config(name):
    """"out", "ckpt.pt", "out/..." (anywhere in the code) and "data" (as a default) are config.DEFAULT_OUT_DIR,
    CKPT_NAME, the constants built from them and DEFAULT_DATA_DIR: a module that spells one again would drift."""
    path = os.path.join(ROOT, f"{name}.py")
    spelled = {config.DEFAULT_OUT_DIR, config.CKPT_NAME, config.DEFAULT_CKPT, config.DEFAULT_ADAPTER}
    found = [(line, v) for line, v in _string_constants(path)
             if v in spelled or v.startswith(config.DEFAULT_OUT_DIR + "/")]
    found += [(line, v) for line, v in _default_values(path) if v == config.DEFAULT_DATA_DIR]
    assert not found, f"{name}.py spells a default path again (use config's constants): {sorted(set(found))}"


def test_default_paths():
    assert config.DEFAULT_OUT_DIR == config.TrainConfig().out_dir == "out"
    assert config.DEFAULT_DATA_DIR == config.TrainConfig().data_dir
    assert config.DEFAULT_CKPT == os.path.join("out", "ckpt.pt")
    assert config.DEFAULT_ADAPTER == os.path.join("out", "lora")


def test_every_stage_reads_the_default_checkpoint():
    import denoise
    import evaluate
    import lora_finetune
    import lora_tools

    assert denoise.parse_args([]).ckpt == config.DEFAULT_CKPT
    assert lora_finetune.parse_args([]).ckpt == config.DEFAULT_CKPT
    assert evaluate.parse_args([]).ckpt == [config.DEFAULT_CKPT]  # as denoise.py: no --ckpt, the default one
    assert evaluate.parse_args(["--samples", "s.npz"]).ckpt is None  # scoring a file samples nothing
    assert lora_tools.parse_args(["info"]).ckpt == config.DEFAULT_CKPT
    assert lora_tools.parse_args(["extract", "--tuned", "t.pt", "--out", "x"]).base == config.DEFAULT_CKPT


# ------------------------------------------------------------------ output flags

def _parser(name):
    return importlib.import_module(name).build_parser()


def _output_flags(parser):
    """Every visible option that names where output goes, in the parser and its subcommands."""
    flags = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags += [f for sub in action.choices.values() for f in _output_flags(sub)]
        if action.help != argparse.SUPPRESS:
            flags += [o for o in action.option_strings
                      if o.startswith(("--out", "--dest", "--dst")) or o in ("-o", "--to")]
    return flags


SCRIPTS = {  # what each script writes, so the flag it takes: --out-dir for a folder of outputs, --out for one artifact
    "train": "--out-dir",  # a checkpoint, its config and sample grids
    "denoise": "--out-dir",  # pictures and an .npz
    "evaluate": "--out-dir",  # a JSON and PNG reports
    "lora_finetune": "--out",  # the adapter folder (or one checkpoint with --full)
    "bench": "--out",  # one JSON
    "lora_tools": "--out",  # each command writes one adapter, file or picture
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_one_output_flag_convention(name):
    flags = _output_flags(_parser(name))
    assert flags and set(flags) == {SCRIPTS[name]}, flags


def test_convert_takes_out_and_still_the_old_second_word(tmp_path, capsys):
    import lora_tools

    assert lora_tools.parse_args(["convert", "a", "--out", "b"]).out == "b"
    assert lora_tools.parse_args(["convert", "a", "b"]).dst == "b"  # the spelling before --out
    for argv, message in ((["convert", "a", "b", "--out", "c"], "two destinations"),
                          (["convert", "a"], "convert needs the destination: --out")):
        with pytest.raises(SystemExit) as e:
            lora_tools.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
