"""The command line built from the settings: one ``--flag`` per dataclass field of config.py.

    parser = ArgumentParser(description=...)          # one-line errors, did-you-mean, grouped --help
    add_preset_arg(parser)
    add_config_args(parser, TrainConfig)              # help, default, bounds and choices from the field
    add_runtime_args(parser)                          # --device, --precision, --seed: the same in every script
    args = parser.parse_args(argv)
    cfg = config_from_args(args, TrainConfig, preset="fast")    # checked against the bounds: CLIError

A flag that is not a field (a script's own --n-per-label) takes its bounds from ``bounded(int, ge=1)`` and
a path from ``path_arg``, so it is checked while parsing, before any work, and --help shows its range.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import tomllib
from dataclasses import fields
from typing import NamedTuple

from config import (DEFAULT_ADAPTER, DEFAULT_OUT_DIR, PRESETS, SECTIONS, WEIGHT_RANGE, DiffusionConfig, LoraConfig,
                    ModelConfig, RuntimeConfig, SampleConfig, TrainConfig, from_saved, preset_config, range_text)
from errors import CLIError, exit_with
from inputs import CONFIG_MAX_BYTES, read_regular

# the sections of --help, in this order; a flag goes into one by its field's group (or its class's)
GROUPS = ("data", "model", "training", "timing", "LoRA", "sampling", "runtime", "output")
CLASS_GROUP = {ModelConfig: "model", DiffusionConfig: "model", TrainConfig: "training", LoraConfig: "LoRA",
               SampleConfig: "sampling", RuntimeConfig: "runtime"}

# Flags people bring from kohya's sd-scripts and diffusers' training scripts, and what this project calls
# them; only those a script has are offered.
FOREIGN_FLAGS = {
    "--rank": ("--r",), "--network-dim": ("--r",), "--lora-rank": ("--r",),
    "--network-alpha": ("--alpha",), "--lora-alpha": ("--alpha",),
    "--epochs": ("--max-steps", "--lora-steps"), "--num-train-epochs": ("--max-steps", "--lora-steps"),
    "--train-data-dir": ("--data", "--dataset"), "--instance-data-dir": ("--data", "--dataset"),
    "--learning-rate": ("--lr", "--lora-lr"), "--unet-lr": ("--lr", "--lora-lr"),
    "--output-dir": ("--out-dir", "--out"), "--resolution": ("--img-size",),
    "--train-batch-size": ("--batch-size", "--lora-batch-size"),
    "--max-train-steps": ("--max-steps", "--lora-steps"), "--mixed-precision": ("--precision",),
    "--network-dropout": ("--lora-dropout",),
    # train.py's flags given to lora_finetune.py, whose own carry the lora- prefix (difflib alone offers --r for --lr)
    "--lr": ("--lora-lr",), "--max-steps": ("--lora-steps",), "--batch-size": ("--lora-batch-size",),
}
EPOCH_FLAGS = ("--epochs", "--num-train-epochs")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each flag's range (from a ``bounded`` type) and default, except where the default is
    None: a config flag's None means "the preset's value", which its help text already gives, and an
    optional path's None means "not given". The description keeps its line breaks (usage examples)."""

    def _get_help_string(self, action):
        text = action.help or ""  # argparse %-formats it: it is escaped already, what is added here is not yet
        bounds = getattr(action.type, "range_text", "")
        if bounds and bounds not in text:
            text += f"; {bounds}".replace("%", "%%")
        default = action.default
        optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (default is None or default is argparse.SUPPRESS or "%(default)" in text or not optional
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                                       argparse._VersionAction))):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return text + f" (default {shown})".replace("%", "%%")

    def _split_lines(self, text, width):
        # a flag named in the help ("--sample-batch") is never split at its hyphens
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser: argparse's own errors (a bad choice, a missing value, an unknown flag) are one
    ``error: ...`` line and exit code 2, as every other bad input (errors.exit_with); the usage block only
    on --help. An unknown flag names the nearest real ones, and the names kohya and diffusers use for ours.
    --help lists the flags in sections (GROUPS); ``group(title)`` gives a section to add a flag to."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --out is not --out-dir: a flag is spelled out or refused
        super().__init__(*args, **kwargs)
        for title in GROUPS:
            self.add_argument_group(title)

    def group(self, title):
        return arg_group(self, title)

    def error(self, message):
        exit_with(CLIError(message))

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unknown_flag_message(extras, flags_of(self, args), self.prog))
        return args

    def _get_value(self, action, arg_string):
        # a bounded flag's own message names the flag, as a setting's does: "--n-per-label must be > 0, got 0"
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            # the flag's own name, not an alias's (--r, not --rank)
            if isinstance(action.type, bounded) and action.option_strings and e.message.startswith("must be "):
                raise argparse.ArgumentError(None, f"{action.option_strings[0]} {e.message}") from None
            if action.type is lora_spec:  # "--lora 'x:abc': ...", "adapter 'x:abc': ..." (lora_tools' positionals)
                name = action.option_strings[-1] if action.option_strings else "adapter"
                raise argparse.ArgumentError(None, f"{name} {e.message}") from None
            raise


def arg_group(parser, title):
    """The argument group ``title`` of ``parser`` (any argparse parser), made if it has none yet."""
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def flags_of(parser, namespace=None):
    """Every option string of ``parser`` and, for a parser with sub-commands, of the one chosen."""
    flags = [s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and namespace is not None:
            chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
            if chosen is not None:
                flags += flags_of(chosen, namespace)
    return flags


def suggest(flag, flags):
    """The flags of ``flags`` someone who typed ``flag`` most likely meant (possibly none)."""
    name = flag.split("=", 1)[0]
    norm = name.replace("_", "-").lower()
    if norm in flags and norm != name:
        return [norm]  # --batch_size -> --batch-size
    known = [f for f in FOREIGN_FLAGS.get(norm, ()) if f in flags]
    if known:
        return known
    return difflib.get_close_matches(norm, [f for f in flags if f.startswith("--")], n=2, cutoff=0.7)


def unknown_flag_message(extras, flags, prog):
    """One line for argparse's leftovers: the first unknown flag, what it might be, and every leftover."""
    unknown = [e for e in extras if e.startswith("-") and len(e) > 1]
    tail = f"(unrecognized arguments: {' '.join(extras)})"
    if not unknown:
        return f"unrecognized arguments: {' '.join(extras)}"
    flag = unknown[0].split("=", 1)[0]
    near = suggest(flag, flags)
    if not near:
        return f"{flag}: unknown flag; {prog} --help lists the flags {tail}"
    steps = (" (runs here are counted in optimizer steps, not epochs; an epoch is one pass over the data)"
             if flag.replace("_", "-").lower() in EPOCH_FLAGS else "")
    return f"{flag}: unknown flag; did you mean {' or '.join(near)}?{steps} {tail}"


# ------------------------------------------------------------------ types of the flags

def _flag(name):
    return "--" + name.replace("_", "-")


def finite_float(text):
    """The type of every float flag: a number, and a finite one (float() accepts nan and inf, no setting does)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class bounded:
    """The type of a script's own numeric flag: ``bounded(int, ge=1)``, ``bounded(float, ge=0, le=3600)``.

    Parses (floats must be finite) and checks the bounds while parsing, so a bad value fails before any
    work; --help shows the range (HelpFormatter reads ``range_text``)."""

    def __init__(self, kind, **bounds):
        self.kind, self.bounds = kind, bounds
        self.range_text = range_text(bounds, integer=kind is int)
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value"

    def __call__(self, text):
        value = finite_float(text) if self.kind is float else self.kind(text)
        for key, op, ok in (("gt", ">", lambda b: value > b), ("ge", ">=", lambda b: value >= b),
                            ("lt", "<", lambda b: value < b), ("le", "<=", lambda b: value <= b)):
            if key in self.bounds and not ok(self.bounds[key]):
                bound = self.bounds[key]
                raise argparse.ArgumentTypeError(f"must be {op} {bound:g}, got {value:g}" if isinstance(bound, float)
                                                 else f"must be {op} {bound}, got {value}")
        return value


def path_arg(text):
    """The type of every path flag: an empty path (``--out-dir ''``, an unset shell variable) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def name_arg(text):
    """The type of a flag naming a file inside a folder given apart (``--name``): a plain name, so that what is
    written stays inside that folder (``--name ../x`` would write beside it)."""
    path_arg(text)
    if os.sep in text or (os.altsep and os.altsep in text) or text in (".", "..") or "\0" in text:
        raise argparse.ArgumentTypeError(f"a plain file name without folders, got {text!r}; the folder is "
                                         "--out-dir's")
    return text


def _parse_tuple(example, item=None):
    item = item or (type(example[0]) if example else str)
    item = finite_float if item is float else item

    def parse(text):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        try:
            return tuple(item(p) for p in parts)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, got {text!r}")
    return parse


# ------------------------------------------------------------------ flags from the settings

def field_help(f, default):
    """A setting's --help line: its one-line reason, its range or choices, its default."""
    meta = f.metadata
    text = meta.get("help", "")
    example = default[0] if isinstance(default, tuple) and default else default
    bounds = range_text(meta, integer=meta.get("item", type(example)) is int)
    if bounds:
        text += f"; {'each ' if isinstance(default, tuple) else ''}{bounds}"
    if "choices" in meta:
        text += f"; one of {', '.join(meta['choices'])}"
    if isinstance(default, tuple):
        return text + (f" (default {','.join(map(str, default))})" if default else "")
    return text + (f" (default {default})" if default != "" else "")  # an empty default's meaning is in the help


def add_config_args(parser, cls, skip=()):
    """One ``--flag`` per dataclass field, in the --help section its field names; the default is None so
    presets (and a saved run's settings) can fill it. Bounds and choices are checked when ``cls`` is built
    (config_from_args), from the field's declaration."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group = arg_group(parser, f.metadata.get("group") or CLASS_GROUP.get(cls, cls.__name__))
        help_text = field_help(f, default).replace("%", "%%")
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else None
        flags = (_flag(f.name), *f.metadata.get("aliases", ()))
        if isinstance(default, bool):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(*flags, dest=f.name, type=_parse_tuple(default, f.metadata.get("item")),
                               default=None, metavar="A,B,..", help=help_text)
        else:
            kind = finite_float if isinstance(default, float) else path_arg if f.metadata.get("path") else type(default)
            group.add_argument(*flags, dest=f.name, type=kind, default=None, metavar=metavar, help=help_text)


def config_flags(cfg, base=None):
    """The flags that give ``cfg`` to a script whose parser add_config_args built: one per field whose value
    differs from ``base`` (every field when None), spelled as add_config_args spells them. The way back from a
    dataclass to a command line, so that a command one program writes for another is never typed out by hand."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if base is not None and value == getattr(base, f.name):
            continue
        if isinstance(value, bool):
            out.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            out += [_flag(f.name), ",".join(map(repr if value and isinstance(value[0], float) else str, value))]
        else:
            out += [_flag(f.name), repr(value) if isinstance(value, float) else str(value)]
    return out


def config_from_args(args, cls, preset="fast", saved=None):
    """Build ``cls`` from a parsed namespace: preset values, then a --config file's, then the flags the user gave.

    ``saved`` (a dict from a checkpoint, on --resume) replaces the preset (and a file), so a resumed
    run carries on with the settings it was started with unless a flag says otherwise. A value
    outside its field's bounds is a CLIError naming the field."""
    given = {f.name: getattr(args, f.name) for f in fields(cls)
             if getattr(args, f.name, None) is not None}
    try:
        if saved is not None:
            return from_saved(cls, {**saved, **given})
        from_file = file_settings(args, cls, preset, given)
        return preset_config(cls, preset, **{**from_file, **given})
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None


# ------------------------------------------------------------------ --config FILE

def add_config_file_arg(parser):
    parser.add_argument("--config", type=path_arg, default=None, metavar="FILE",
                        help="start from the settings in FILE: the config.json a run wrote, or a TOML file with "
                        "the same sections ([model], [train], [runtime]...); flags given win, --preset fills the rest")


def read_config_file(path):
    """{section: {setting: value}} from a config.json (as train.py writes it) or a TOML file, checked against
    the settings' names; lists become tuples, as the dataclasses hold them. Bad files are a CLIError.

    The file is known by its content, whatever its name: JSON is an object ({...}), TOML is not. Only a
    regular file of at most inputs.CONFIG_MAX_BYTES is read (a FIFO or /dev/urandom is refused unread),
    and nothing nested deeper than a section's list of values is accepted."""
    raw = read_regular(path, "--config", CONFIG_MAX_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"--config {path!r} is not text (a binary file?); give a config.json or a TOML file") from None
    head = text.lstrip("\ufeff \t\r\n")[:1]
    is_json = head == "{"
    try:
        if head == "[":  # a JSON list, or a TOML file's first [section]: JSON's reading settles it
            try:
                data, is_json = json.loads(text), True
            except json.JSONDecodeError:
                data = tomllib.loads(text)
        else:
            data = json.loads(text) if is_json else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise CLIError(f"--config {path!r} is neither JSON nor TOML that can be read (read as "
                       f"{'JSON' if is_json else 'TOML'}: {e})") from None
    except RecursionError:  # the parsers recurse per level: a file of 100,000 "[" ends here
        raise CLIError(f"--config {path!r} is nested too deeply to be a config; settings go one level down, "
                       "in sections") from None
    _check_depth(path, data)
    by_section = {section: cls for cls, section in SECTIONS.items()}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CLIError(f"--config {path!r}: settings go in sections ({', '.join(by_section)}), as config.json has")
    out = {}
    for section, values in data.items():
        if section not in by_section:
            raise CLIError(f"--config {path!r}: unknown section {section!r}; the sections are "
                           f"{', '.join(by_section)}")
        known = {f.name: f for f in fields(by_section[section])}
        for key in values:
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                raise CLIError(f"--config {path!r}: {section} has no setting {key!r}"
                               + (f"; did you mean {near[0]!r}?" if near else ""))
        out[section] = {k: tuple(v) if isinstance(v, list) and isinstance(known[k].default, tuple) else v
                        for k, v in values.items()}
    return out


def _check_depth(path, data):
    """A config is sections of settings whose values are numbers, strings, booleans or lists of them: refuse
    deeper nesting by name, before a setting's check meets a dict where it expects a number."""
    for section, values in (data.items() if isinstance(data, dict) else ()):
        for key, value in (values.items() if isinstance(values, dict) else ()):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, (dict, list)) for v in items):
                raise CLIError(f"--config {path!r}: {section}.{key} is nested (a table or a list of lists); a "
                               "setting's value is a number, a string, true/false or a list of them")


def file_settings(args, cls, preset, given):
    """``cls``'s settings from --config (none without it); records on ``args`` which ones were used and which of
    them differ from the preset, for the start-up line (config_file_note)."""
    path = getattr(args, "config", None)
    if not path:
        return {}
    if "_config_file" not in vars(args):
        args._config_file = read_config_file(path)
        args._from_file = {}
    values = args._config_file.get(SECTIONS[cls], {})
    base = dataclasses.asdict(preset_config(cls, preset))
    args._from_file[SECTIONS[cls]] = {k: (v, v != base[k]) for k, v in values.items() if k not in given}
    return values


def config_file_note(args):
    """The start-up line's word on --config: how many settings came from the file and those that differ from the
    preset; "" without --config."""
    used = getattr(args, "_from_file", None)
    if not getattr(args, "config", None) or used is None:
        return ""
    count = sum(len(v) for v in used.values())
    differ = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
              for section in used.values() for k, (v, changed) in section.items() if changed]
    return (f"{count} settings from {args.config}" + (f", these unlike the preset: {' '.join(differ)}" if differ
                                                       else ", all as the preset has them") + "; flags given win")


def add_runtime_args(parser):
    """``--device``, ``--precision`` and ``--seed`` (RuntimeConfig): declared once, the same in every script."""
    add_config_args(parser, RuntimeConfig)


def runtime_from_args(args, saved=None):
    """The run's RuntimeConfig: the flags given, over ``saved`` (a resumed run's) or the defaults, checked.

    ``args.device``, ``args.precision`` and ``args.seed`` are set to its values, so that code reading the
    namespace (``seed=args.seed + i``) sees the checked value, never the None of a flag not given."""
    rcfg = config_from_args(args, RuntimeConfig, saved=saved)
    for f in fields(RuntimeConfig):
        setattr(args, f.name, getattr(rcfg, f.name))
    return rcfg


def add_preset_arg(parser):
    parser.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                        help="the sizes every setting starts from (flags given win): fast (laptop CPU) | tutorial "
                             "(GPU, the tutorial's original sizes) | tiny (tests)")


# ------------------------------------------------------------------ adapters: PATH[:WEIGHT] or <lora:NAME:WEIGHT>

# AUTOMATIC1111's way to name an adapter in a prompt: <lora:NAME> or <lora:NAME:WEIGHT>
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")


class LoraSpec(NamedTuple):
    """An adapter on the command line, parsed once (``lora_spec``): its path, its weight, the text as typed, and
    for <lora:NAME:W> the NAME, whose path resolve_lora_names finds (empty until then)."""
    path: str
    weight: float = 1.0
    text: str = ""
    name: str = ""

    def __str__(self):
        return self.text or self.path


def weight_problem(value):
    """What is wrong with an adapter's weight ("" when nothing): a finite number within config.WEIGHT_RANGE,
    negative allowed (the style pushed the other way)."""
    lo, hi = WEIGHT_RANGE
    if not math.isfinite(value) or not lo <= value <= hi:
        return f"the weight must be a finite number from {lo:g} to {hi:g}, got {value!r}"
    return ""


def check_weight(value, what):
    """``value`` when it is an adapter's weight (weight_problem), else a CLIError naming ``what``."""
    problem = weight_problem(value)
    if problem:
        raise CLIError(f"{what}: {problem}")
    return value


def add_lora_args(group):
    """--lora PATH[:WEIGHT] (repeatable; alone, config.DEFAULT_ADAPTER) and --lora-weight, the strength of them all
    (--lora-scale: its name before "weight" became the one word for an adapter's strength; old commands still run)."""
    group.add_argument("--lora", nargs="?", const=DEFAULT_ADAPTER, default=None, action="append", type=lora_spec,
                       metavar="PATH[:WEIGHT]",
                       help=f"apply a LoRA adapter (default {DEFAULT_ADAPTER}) at WEIGHT (default 1); repeat for "
                       "several; '<lora:NAME:WEIGHT>' (quoted) names an adapter folder under --lora-dir")
    weight = bounded(float, ge=WEIGHT_RANGE[0], le=WEIGHT_RANGE[1])
    group.add_argument("--lora-weight", type=weight, default=1.0,
                       help="strength of the adapters, times each one's own WEIGHT: 0 off, 1 as trained, negative "
                       "pushes the other way")
    group.add_argument("--lora-scale", dest="lora_weight", type=weight, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    group.add_argument("--lora-dir", action="append", default=None, type=path_arg, metavar="FOLDER",
                       help=f"where --lora '<lora:NAME:WEIGHT>' looks for the adapter folder NAME, besides "
                       f"{DEFAULT_OUT_DIR}/ (repeatable), as the page's --lora-dir")


def lora_spec(text):
    """The type of every adapter argument: 'PATH' or 'PATH:WEIGHT' -> LoraSpec, the weight checked here, so a bad
    one fails while parsing, before any file is read. A path that holds a colon itself is taken whole when it
    exists."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty path; give an adapter's folder or file")
    if text.strip().startswith("<lora"):
        return lora_tag_spec(text)
    if ":" not in text:
        return LoraSpec(text, 1.0, text)
    head, tail = text.rsplit(":", 1)
    try:
        weight = float(tail)
    except ValueError:
        if os.path.exists(text):
            return LoraSpec(text, 1.0, text)
        raise argparse.ArgumentTypeError(f"{text!r}: the weight {tail!r} is not a number; write PATH or "
                                         "PATH:WEIGHT, e.g. out/lora:0.8") from None
    problem = weight_problem(weight)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return LoraSpec(head, weight, text)


def lora_tag_spec(text):
    """'<lora:NAME>' or '<lora:NAME:WEIGHT>' -> LoraSpec with its name and weight (checked), its path still empty."""
    tag = LORA_TAG.fullmatch(text.strip())
    if tag is None:
        raise argparse.ArgumentTypeError(f"{text!r}: write <lora:NAME> or <lora:NAME:WEIGHT>, e.g. <lora:italic:0.8>")
    name, tail = tag.group(1).strip(), tag.group(2)
    try:
        weight = 1.0 if tail is None else float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight {tail!r} is not a number; write <lora:NAME:WEIGHT>, "
                                         "e.g. <lora:italic:0.8>") from None
    problem = weight_problem(weight)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return LoraSpec("", weight, text, name)


def resolve_lora_names(specs, lora_dirs=()):
    """``specs`` with each <lora:NAME:W>'s path found: the adapter folder NAME under out/ and ``lora_dirs``
    (adapter_formats.find_adapter, the lookup the page's list uses); a PATH spec as it is. None stays None."""
    if not specs or not any(s.name for s in specs):
        return specs
    for d in lora_dirs or ():
        if not os.path.isdir(d):
            raise CLIError(f"--lora-dir {d!r} is not a folder; pass the folder that holds your adapters")
    from adapter_formats import find_adapter  # the adapter files' module, loaded only when a name is looked up

    roots = [DEFAULT_OUT_DIR, *(lora_dirs or ())]
    return [s._replace(path=find_adapter(s.name, roots, f"--lora {s.text}")) if s.name else s for s in specs]
