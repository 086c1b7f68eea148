"""How a refusal that names a changed setting shows its two values."""

from __future__ import annotations

import os

WHOLE = 100
"""Values up to this long are shown whole: most paths (a --model or --corpus) fit."""

CONTEXT = 20
"""Shared characters kept on each side of where two long values differ, so the reader sees where it is."""


def visible_difference(old: str, new: str) -> tuple[str, str]:
    """The texts of a setting's old and new value as a refusal shows them: whole when short; when long, the
    part where they differ with a little of what they share around it ('".../runs/a/model"'), so that two
    long paths with a common start still show what differs instead of the same start twice."""
    if max(len(old), len(new)) <= WHOLE:
        return old, new
    differs_at = len(os.path.commonprefix([old, new]))
    start = _context_start(old, differs_at)
    # The shared end counted only past differs_at: where one value starts the other, the two overlap
    shared_tail = len(os.path.commonprefix([old[differs_at:][::-1], new[differs_at:][::-1]]))
    tail_cut = max(0, shared_tail - CONTEXT)
    return _cut(old, start, tail_cut), _cut(new, start, tail_cut)


def _context_start(text: str, differs_at: int) -> int:
    """Where the shown part starts: CONTEXT characters before ``differs_at``, or at a '/' among them, so that
    a path shows from a folder boundary (".../model-a", not "...del-a")."""
    start = differs_at - CONTEXT
    if start <= 0:
        return 0
    slash = text.find("/", start, differs_at)
    return slash if slash > 0 else start


def _cut(text: str, start: int, tail_cut: int) -> str:
    """``text`` less its first ``start`` and last ``tail_cut`` characters, each cut marked '...' (inside
    the value's quotes, which stay); a part still over WHOLE (a long value beside a short one) is cut too."""
    end = len(text) - tail_cut
    middle = text[start:end]
    if len(middle) > WHOLE:
        middle, end = middle[:WHOLE - 3], start + WHOLE - 3
    quotes = "\"'"
    head = (text[0] if text[0] in quotes else "") + "..." if start else ""
    tail = "..." + (text[-1] if text[-1] in quotes else "") if end < len(text) else ""
    return head + middle + tail
