"""Field helpers for config dataclasses (parsed into command-line options by simple_parsing)."""

from __future__ import annotations

import operator
from typing import Any

from simple_parsing.helpers import flag


def switch(default: bool) -> bool:
    """A boolean field that reads as ``--name`` / ``--no-name`` on the command line."""
    return flag(default, negative_prefix="--no-")


def given_parts(words: str) -> tuple[str, str]:
    """How a setting was given, as the lead of a refusal and the name to repeat in its advice: a --config
    file's entry "--config c.yaml: train.k" -> ("--config c.yaml: ", "train.k"); an option as typed "-k" ->
    ("", "-k")."""
    file, _, entry = words.rpartition(": ")
    return (f"{file}: " if file else ""), entry


def whole_at_least(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer of any type (numpy's too), not a bool, of at least ``least``."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and operator.index(value) >= least
