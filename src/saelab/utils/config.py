"""Field helpers for config dataclasses (parsed into command-line options by simple_parsing)."""

from __future__ import annotations

from simple_parsing.helpers import flag


def switch(default: bool) -> bool:
    """A boolean field that reads as ``--name`` / ``--no-name`` on the command line."""
    return flag(default, negative_prefix="--no-")
