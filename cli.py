"""The command line built from the settings: one ``--flag`` per dataclass field of config.py.

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_preset_arg(parser)
    add_config_args(parser, TrainConfig)
    cfg = config_from_args(parser.parse_args(), TrainConfig, preset="fast")
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import fields

from config import PRESETS, from_saved, preset_config
from errors import CLIError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, except where it is None: a config flag's None means "the preset's
    value", which its help text already gives, and an optional path's None means "not given"."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


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


def _parse_tuple(example, item=None):
    item = item or (type(example[0]) if example else str)
    item = finite_float if item is float else item

    def parse(text):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        try:
            return tuple(item(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, got {text!r}")
    return parse


def add_config_args(parser, cls, skip=()):
    """One ``--flag`` per dataclass field; the default is None so presets can fill it."""
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help") or \
            f"(default {default if not isinstance(default, tuple) else ','.join(map(str, default))})"
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(_flag(f.name), dest=f.name, type=_parse_tuple(default, f.metadata.get("item")),
                               default=None, metavar="A,B,..", help=help_text)
        else:
            kind = finite_float if isinstance(default, float) else type(default)
            group.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args, cls, preset="fast", saved=None):
    """Build ``cls`` from a parsed namespace: preset values, then the flags the user gave.

    ``saved`` (a dict from a checkpoint, on --resume) replaces the preset, so a resumed run
    carries on with the settings it was started with unless a flag says otherwise."""
    given = {f.name: getattr(args, f.name) for f in fields(cls)
             if getattr(args, f.name, None) is not None}
    try:
        if saved is not None:
            return from_saved(cls, {**saved, **given})
        return preset_config(cls, preset, **given)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None


def add_preset_arg(parser):
    parser.add_argument("--preset", default="fast", choices=sorted(PRESETS),
                        help="fast (default, laptop CPU) | tutorial (GPU, original sizes) | tiny (tests)")
