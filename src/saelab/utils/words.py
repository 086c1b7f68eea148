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


def did_you_mean(word: str, names: Iterable[str], add: Iterable[str] = (), drop: Iterable[str] = (),
                 named_elsewhere: bool = False, switches: Iterable[str] | None = None) -> str:
    """"; did you mean NAME?" for the closest of ``names`` to a misspelled ``word``, or the one that is ``word``
    with another separator ("--n_latents"), a group's prefix added (one of ``add``) or left out (one of ``drop``:
    :func:`_other_prefix`; each of several), or less a trailing id, name or path (:func:`_less_a_qualifier`),
    else "".
    Never a switch's other spelling, which does the opposite of what was asked ("--progress" where only
    "--no-progress" is, "--no-overwrite" where only "--overwrite" is): that it is so without it.
    ``named_elsewhere``: ``word`` is a name of its own (another verb's option), not a misspelling, so no close
    spelling, which would name an unrelated setting ("--scale-tokens": "--sample-pool-tokens").
    ``switches``: those of ``names`` that take no value (None: any may be one); "--no-lr" is told that --lr takes
    a value, not that it is off unless given."""
    names = list(names)
    body = word[2:] if word.startswith("--") else None
    if body is not None and f"--no-{body}" in names:
        return f"; {word} is on unless --no-{body} turns it off: leave it out"
    if body is not None and body.startswith("no-") and f"--{body[3:]}" in names:
        if switches is not None and f"--{body[3:]}" not in set(switches):
            return f"; --{body[3:]} takes a value: there is no {word}"
        return f"; --{body[3:]} is off unless given: leave {word} out"
    close = ([n for n in names if re.sub("[-_]", "-", n) == re.sub("[-_]", "-", word)]  # browse's --model_id
             or _other_prefix(word, names, add, drop) or _less_a_qualifier(word, names, add, drop)
             or ([] if named_elsewhere else difflib.get_close_matches(word, names, n=1, cutoff=0.75)))
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _parts(name: str) -> tuple[str, list[str]]:
    """``name``'s leading dashes and its parts, ``-`` or ``_`` apart: ("--", ["n", "latents"])."""
    body = name.lstrip("-")
    return name[:len(name) - len(body)], re.split(r"[-_]", body)


def _other_prefix(word: str, names: list[str], add: Iterable[str], drop: Iterable[str]) -> list[str]:
    """The one of ``names`` that is ``word`` with one leading part (``-`` or ``_`` apart) added, of ``add``, or left
    out, of ``drop``: another verb's spelling of a setting ("--harvest-dtype", quickstart's, for harvest's
    "--dtype"; "--max-len" for eval's "--n2g-max-len"), a difference too long beside a short name for a close
    spelling. Only a group's prefix: another leading word names another setting ("--activations" is not
    "--overwrite-activations", "--model-dtype" not export's "--dtype"). Each where several are (quickstart's
    "--corpus": "--harvest-corpus" or "--eval-corpus"), before a close spelling that would pick one. A switch's
    --no- form keeps its "no" first ("--no-prepend-bos": quickstart's "--no-harvest-prepend-bos")."""
    dashes, typed = _parts(word)
    add, drop = set(add), set(drop)

    def one_part_apart(name: str) -> bool:
        name_dashes, have = _parts(name)
        mine = typed
        if have[0] == mine[0] == "no":
            have, mine = have[1:], mine[1:]
        return name_dashes == dashes and bool(have and mine) and (have[1:] == mine and have[0] in add
                                                                 or mine[1:] == have and mine[0] in drop)

    return [name for name in names if one_part_apart(name)]


QUALIFIERS = ("id", "name", "path")
"""Trailing parts that other tools give a setting's name (a model_id, SAELens's hook_name, a dataset_path) and
saelab's options leave out: "--model-id" is "--model", not its close spelling "--model-dtype"."""


def _less_a_qualifier(word: str, names: list[str], add: Iterable[str], drop: Iterable[str]) -> list[str]:
    """The one of ``names`` that is ``word`` less a trailing part of :data:`QUALIFIERS`, as it is or with a group's
    prefix (:func:`_other_prefix`: quickstart's "--harvest-model" for "--model-id"). Only those parts: another
    names another setting ("--overwrite-activations", quickstart's, is not train's "--overwrite")."""
    parts = _parts(word)[1]
    if len(parts) < 2 or parts[-1].lower() not in QUALIFIERS:
        return []
    shorter = word[:-len(parts[-1]) - 1]
    return [shorter] if shorter in names else _other_prefix(shorter, names, add, drop)


def listed_names(names: list[str], most: int = 8, bracketed: bool = True) -> str:
    """``names`` as a list of its first ``most``, then how many it leaves out: "['a', 'b'] and 3 more" (not
    ``bracketed``: "a, b and 3 more"), so it does not read as all there is."""
    shown = f"{names[:most]}" if bracketed else ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")

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
