"""What every verb shares: the parser class, common options, config groups and error reporting."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable

from simple_parsing import ArgumentParser, DashVariant

from saelab.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


class Parser(ArgumentParser):
    """argparse that also reads config dataclasses (field docstrings become --help, ``Literal`` types
    become choices), with dashed option names and ``--config FILE`` (JSON or YAML option defaults keyed
    by group, e.g. ``{"train": {"k": 64}}``; options on the command line win)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("add_option_string_dash_variants", DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", "config")
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --rec would set a recipe's name without its settings
        super().__init__(*args, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once, metavars from the option name (not from a parsing function's name)."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return action.dest.rsplit(".", 1)[-1].upper()

    def _get_default_metavar_for_positional(self, action: argparse.Action) -> str:
        return action.dest.rsplit(".", 1)[-1].upper()

    def _get_help_string(self, action: argparse.Action) -> str:
        # argparse formats help with '%': a literal one in a docstring ("60 %") must be doubled.
        text = re.sub(r"%(?!\()", "%%", action.help or "")
        if "(default" in text or action.default in (None, argparse.SUPPRESS, False) or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


def add_io_options(p: ArgumentParser, *, device: bool = True, overwrite: bool = True) -> None:
    """--device and --model-dtype, --overwrite, --no-progress, --debug where a verb has them."""
    if device:
        p.add_argument("--device", default=None, metavar="DEVICE",
                       help="where the model and the SAE run: auto (CUDA when available, else cpu), cpu, cuda, "
                            "cuda:N (default: auto)")
        add_model_dtype(p)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="replace finished results in the output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_model_dtype(p: ArgumentParser) -> None:
    p.add_argument("--model-dtype", default="float32", choices=DTYPES,
                   help="dtype of the language model's weights and forward (bfloat16 / float16 on a GPU halve "
                        "memory and speed it up; default: float32)")


def positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_range(option: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{option} must be in [{lo:g}, {hi:g}], got {value:g}")
