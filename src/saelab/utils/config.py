"""Field helpers for config dataclasses (parsed into command-line options by simple_parsing)."""

from __future__ import annotations

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
