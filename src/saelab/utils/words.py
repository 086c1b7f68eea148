"""Words for messages."""

from __future__ import annotations

import difflib
import json
from typing import Any, Iterable


def plural(n: int, noun: str) -> str:
    """``noun`` as a count of ``n`` takes it: "token" for 1, "tokens" otherwise (0 included), so that a
    message reads "1 token" and "2 tokens"; the caller writes the number as it formats it."""
    return noun if n == 1 else f"{noun}s"


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """"; did you mean NAME?" for the closest of ``names`` to a misspelled ``word``, else ""."""
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


ESCAPED = {c: ascii(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}
"""Control characters (C0, DEL, C1) as escapes ('\\n', '\\t', '\\x1b'), for ``str.translate``: text from data
(a corpus, a model's generation) would otherwise drive the terminal that shows it (clear it, move the cursor,
recolour it)."""
ESCAPED_BUT_LINES = {c: e for c, e in ESCAPED.items() if chr(c) not in "\n\t"}
"""ESCAPED less newlines and tabs, for running text shown as it reads."""


_JSON_ESCAPED = {c: f"\\u{c:04x}" for c in ESCAPED}
"""ESCAPED's characters in JSON's spelling ('\\u009b'): json.dumps escapes C0 itself but leaves DEL and C1 raw."""


def as_json(value: Any) -> str:
    """A value read from a JSON file, as the file writes it: "relu", true, null, not Python's 'relu', True, None;
    its control characters escaped as JSON writes them, so that a downloaded file cannot drive the terminal."""
    return json.dumps(value, ensure_ascii=False, default=str).translate(_JSON_ESCAPED)
