"""Words for messages."""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, Iterable


def plural(n: int, noun: str) -> str:
    """``noun`` as a count of ``n`` takes it: "token" for 1, "tokens" otherwise (0 included), so that a
    message reads "1 token" and "2 tokens"; the caller writes the number as it formats it."""
    return noun if n == 1 else f"{noun}s"


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """"; did you mean NAME?" for the closest of ``names`` to a misspelled ``word``, or the one that is ``word``
    with a leading part added or left out (:func:`_other_prefix`), else "". Never a switch's off spelling for its
    on one ("--progress": "--no-progress" would do the opposite of what was asked): that it is on without it."""
    names = list(names)
    off = f"--no-{word[2:]}" if word.startswith("--") else None
    if off in names:
        return f"; {word} is on unless {off} turns it off: leave it out"
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.75) or _other_prefix(word, names)
    return f"; did you mean {close[0]}?" if close else ""


def _other_prefix(word: str, names: list[str]) -> list[str]:
    """The one of ``names`` that ends as ``word`` does but for leading parts (``-`` or ``_`` apart) added or left
    out, sharing the most parts with it: another verb's group prefix ("--harvest-dtype" for harvest's "--dtype",
    "--max-len" for eval's "--n2g-max-len"), a difference too long beside a short name for a close spelling.
    Not a part "no", which turns a switch off; none where several share as many parts (quickstart's "--dtype":
    "--harvest-dtype", "--model-dtype")."""
    def parts(name: str) -> tuple[str, list[str]]:
        body = name.lstrip("-")
        return name[:len(name) - len(body)], re.split(r"[-_]", body)

    def shared(name: str) -> int:  # the parts ``name`` and ``word`` share, where one is the other's tail
        (dashes, a), (word_dashes, b) = parts(name), parts(word)
        short, long = sorted((a, b), key=len)
        added = long[:len(long) - len(short)]
        return len(short) if dashes == word_dashes and added and added[0] != "no" and long[len(added):] == short else 0

    best = max(map(shared, names), default=0)
    found = [name for name in names if best and shared(name) == best]
    return found if len(found) == 1 else []


def listed_names(names: list[str], most: int = 8) -> str:
    """``names`` as a list of its first ``most``, then how many it leaves out: "['a', 'b'] and 3 more", so a
    folder's listing does not read as all it holds."""
    return f"{names[:most]}" + (f" and {len(names) - most} more" if len(names) > most else "")

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
