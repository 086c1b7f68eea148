"""Words for messages."""

from __future__ import annotations


def plural(n: int, noun: str) -> str:
    """``noun`` as a count of ``n`` takes it: "token" for 1, "tokens" otherwise (0 included), so that a
    message reads "1 token" and "2 tokens"; the caller writes the number as it formats it."""
    return noun if n == 1 else f"{noun}s"
