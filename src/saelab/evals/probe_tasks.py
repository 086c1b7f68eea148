"""Binary probing tasks for ``saelab.evals.probe``: an offline token-level suite and a HF loader.

Token tasks label tokens of packed contexts ``[N, T]`` from the text the tokens spell, using only
what is visible in the context up to and including the token (labels are causal, like the model).
Each task gives, per token, 1 (positive), 0 (negative) or -1 (not part of the task). BOS/EOS
tokens (document separators) are never labelled and act as paragraph breaks, as does ``\\n``.
Text before the first break of a context may begin mid-paragraph (the window cut it); rules that
need a paragraph start (``sentence_start`` of the first word) leave those tokens out.

Suite (``TOKEN_TASKS``):

- ``number``:        1 = the token's text (without leading space) is all digits ("1984", " 19"),
                     0 = it is all letters (a word piece).
- ``in_parens``:     1 = more "(" than ")" precede the token in its paragraph, 0 = as many
                     (tokens containing a parenthesis are left out).
- ``in_quotes``:     1 = an odd number of '"' precede the token in its paragraph, 0 = even
                     (tokens containing '"' are left out).
- ``capitalized``:   word-initial tokens (leading space) starting with a letter that are not the
                     first word of a sentence: 1 = uppercase (names, proper nouns), 0 = lowercase.
- ``sentence_start``: word-initial tokens starting with a letter: 1 = first word of a sentence
                     (the previous non-space character of the paragraph is . ! or ?, or the token
                     opens a paragraph), 0 = any other word.
- ``topic_sports`` / ``topic_music`` / ``topic_military``: 1 = at least 2 topic keywords occur earlier in the token's
                     paragraph, 0 = no keyword occurs anywhere in the (visible) paragraph and the
                     token is at least 8 tokens into it. Keywords: ``TOPIC_KEYWORDS``.

``text_groups`` gives each token's paragraph (or document) across packed contexts: the probe's
train/test split keeps each group on one side.

``load_hf_task`` reads a Hugging Face dataset with a text column and a binary label column
(context-level task: one label per text); it needs the optional ``datasets`` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from saelab.errors import CorpusError

if TYPE_CHECKING:  # torch is imported where labels are made: the settings read the task names without it
    import torch

TOPIC_KEYWORDS: dict[str, frozenset[str]] = {
    "sports": frozenset(
        "football basketball baseball soccer cricket hockey tennis golf rugby olympic olympics league "
        "championship championships tournament season coach player players match matches goals scored "
        "club cup team teams stadium".split()
    ),
    "music": frozenset(
        "album albums song songs band bands singer singers guitar guitarist music musical musician "
        "recorded recording single singles chart charts billboard concert concerts orchestra symphony "
        "opera composer lyrics".split()
    ),
    "military": frozenset(
        "war army military battle battles troops soldiers forces navy regiment infantry commander officer "
        "officers fought attack invasion wartime".split()
    ),
}
"""Lowercase keyword sets of the topic tasks (matched against lowercase words of the text)."""

MIN_TOPIC_HITS = 2
MIN_NEGATIVE_OFFSET = 8
_WORD_RE = re.compile(r"[a-z]+")


@dataclass
class _Token:
    text: str  # the token's own text
    start: int  # offset in the paragraph text
    para_start: bool  # first token of a paragraph known to start in this context
    index_in_para: int


def token_strings(tokenizer, ids: Sequence[int], cache: dict[int, str] | None = None, *,
                  readable_bytes: bool = False) -> list[str]:
    """Text of each token on its own, such that joining them spells the text.

    Byte-level BPE (GPT-2, SmolLM2): the token's decoded bytes (a token holding part of a
    multi-byte character decodes to U+FFFD; with ``readable_bytes``, for pages people read, to
    its bytes as escapes, "\\xe4\\xb8", which tell such tokens apart). SentencePiece: '▁' becomes a space.
    """
    cache = {} if cache is None else cache
    out = []
    for i in ids:
        i = int(i)
        s = cache.get(i)
        if s is None:
            piece = tokenizer.convert_ids_to_tokens(i)
            if isinstance(piece, str) and piece.startswith("\u2581"):
                s = " " + tokenizer.convert_tokens_to_string([piece]).lstrip()
            else:
                s = tokenizer.decode([i])
            if readable_bytes and "\ufffd" in s:
                s = _partial_character(piece) or s
            cache[i] = s
        out.append(s)
    return out


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary (GPT-2's scheme) stands for: printable
    bytes as themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _partial_character(piece: Any) -> str | None:
    """A vocabulary entry that holds part of a multi-byte character, as its text with the loose bytes
    escaped; None where the entry is not spelled in the byte-level alphabet. SentencePiece's byte
    fallback entries ("<0xE4>") already read as bytes."""
    if not isinstance(piece, str) or not piece:
        return None
    if piece.startswith("<0x") and piece.endswith(">"):
        return piece
    if not all(c in _BYTE_OF_CHAR for c in piece):
        return None
    return bytes(_BYTE_OF_CHAR[c] for c in piece).decode("utf-8", errors="backslashreplace")


def _paragraphs(strs: list[str], breaks: list[bool]) -> list[list[tuple[int, _Token]]]:
    """Split a context's tokens into paragraphs: (token position, _Token) lists."""
    paras: list[list[tuple[int, _Token]]] = []
    cur: list[tuple[int, _Token]] = []
    offset, known_start, n_in = 0, False, 0
    for pos, (s, brk) in enumerate(zip(strs, breaks)):
        if brk or "\n" in s:
            if cur:
                paras.append(cur)
            cur, offset, n_in, known_start = [], 0, 0, pos > 0 or not brk
            continue
        cur.append((pos, _Token(s, offset, known_start and n_in == 0, n_in)))
        offset += len(s)
        n_in += 1
    if cur:
        paras.append(cur)
    return paras


def _label_number(para, text, labels):
    for pos, t in para:
        core = t.text.strip()
        if core.isdigit():
            labels[pos] = 1
        elif core.isalpha():
            labels[pos] = 0


def _label_counter(open_ch: str, close_ch: str | None):
    def fn(para, text, labels):
        for pos, t in para:
            if open_ch in t.text or (close_ch and close_ch in t.text):
                continue
            before = text[: t.start]
            if close_ch is None:
                inside = before.count(open_ch) % 2 == 1
            else:
                inside = before.count(open_ch) > before.count(close_ch)
            labels[pos] = int(inside)
    return fn


def _sentence_start(t: _Token, text: str) -> bool | None:
    """True/False for a word-initial token, None when unknown (paragraph start cut off)."""
    before = text[: t.start].rstrip()
    if not before:
        return True if t.para_start else None
    return before[-1] in ".!?"


def _is_word_initial(t: _Token) -> bool:
    core = t.text.lstrip()
    return bool(core) and core[0].isalpha() and (t.text[:1].isspace() or t.index_in_para == 0)


def _label_capitalized(para, text, labels):
    for pos, t in para:
        if not _is_word_initial(t) or not t.text[:1].isspace():
            continue
        if _sentence_start(t, text) is not False:
            continue
        c = t.text.lstrip()[0]
        if c.isupper():
            labels[pos] = 1
        elif c.islower():
            labels[pos] = 0


def _label_sentence_start(para, text, labels):
    for pos, t in para:
        if not _is_word_initial(t):
            continue
        start = _sentence_start(t, text)
        if start is not None:
            labels[pos] = int(start)


def _label_topic(keywords: frozenset[str]):
    def fn(para, text, labels):
        total = sum(w in keywords for w in _WORD_RE.findall(text.lower()))
        for pos, t in para:
            hits = sum(w in keywords for w in _WORD_RE.findall(text[: t.start].lower()))
            if hits >= MIN_TOPIC_HITS:
                labels[pos] = 1
            elif total == 0 and t.index_in_para >= MIN_NEGATIVE_OFFSET:
                labels[pos] = 0
    return fn


@dataclass(frozen=True)
class TokenTask:
    name: str
    description: str
    rule: Callable = field(repr=False)


TOKEN_TASKS: dict[str, TokenTask] = {
    t.name: t
    for t in (
        TokenTask("number", "token is a number (digits) vs a word piece (letters)", _label_number),
        TokenTask("in_parens", "token is inside parentheses", _label_counter("(", ")")),
        TokenTask("in_quotes", "token is inside double quotes", _label_counter('"', None)),
        TokenTask("capitalized", "capitalized word mid-sentence (name-like) vs lowercase word", _label_capitalized),
        TokenTask("sentence_start", "first word of a sentence vs other words", _label_sentence_start),
        *(TokenTask(f"topic_{k}", f"paragraph is about {k} (keywords so far) vs no {k} keyword",
                    _label_topic(v)) for k, v in TOPIC_KEYWORDS.items()),
    )
}
"""The offline token-level task suite, by name."""

DEFAULT_TASKS = tuple(TOKEN_TASKS)


def label_tokens(tokenizer, tokens_NT: torch.Tensor, tasks: Sequence[str] = DEFAULT_TASKS,
                 special_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Labels ``[N, T]`` (int8: 1, 0, -1 = not in the task) of each task for packed contexts."""
    import torch

    unknown = [t for t in tasks if t not in TOKEN_TASKS]
    if unknown:
        raise ValueError(f"unknown probe task(s) {unknown}; known: {sorted(TOKEN_TASKS)}")
    if special_ids is None:
        special_ids = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    special = set(int(i) for i in special_ids)
    N, T = tokens_NT.shape
    out = {t: torch.full((N, T), -1, dtype=torch.int8) for t in tasks}
    cache: dict[int, str] = {}
    for n in range(N):
        ids = tokens_NT[n].tolist()
        strs = token_strings(tokenizer, ids, cache)
        breaks = [i in special for i in ids]
        for para in _paragraphs(strs, breaks):
            text = "".join(t.text for _, t in para)
            for name in tasks:
                row = [-1] * T
                TOKEN_TASKS[name].rule(para, text, row)
                for pos, _ in para:
                    if row[pos] != -1:
                        out[name][n, pos] = row[pos]
    return out


SPLIT_UNITS = ("paragraph", "document")


def text_groups(tokenizer, tokens_NT: torch.Tensor, prepend_bos: bool = True, unit: str = "paragraph",
                special_ids: Sequence[int] | None = None, documents_NT: torch.Tensor | None = None) -> torch.Tensor:
    """The paragraph (or document) of every token of packed contexts: group ids ``[N, T]``.

    Breaks are the ones ``label_tokens`` uses: separators (BOS/EOS) and, for paragraphs, tokens
    holding a newline; break tokens get -1 (they are never labelled), and so does the BOS that
    packing puts at position 0 (``prepend_bos``), which is no break in the text. Packing cuts the
    token stream into consecutive contexts, so a paragraph that runs from context ``n - 1`` into
    context ``n`` keeps one id across the cut. Contexts not packed consecutively can only be merged
    more than needed, never split; ``documents_NT``, each token's document (``token_documents``), keeps a
    group from running on into a context of another document (contexts drawn at random across the corpus
    are seldom neighbours: a paragraph would take in the next context's article).
    """
    import torch

    if unit not in SPLIT_UNITS:
        raise ValueError(f"split unit must be one of {SPLIT_UNITS}, got {unit!r}")
    if special_ids is None:
        special_ids = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    special = set(int(i) for i in special_ids)
    N, T = tokens_NT.shape
    out = torch.full((N, T), -1, dtype=torch.long)
    cache: dict[int, str] = {}
    cur, next_id = None, 0  # the group running at the current token (None after a break)
    for n in range(N):
        if n and documents_NT is not None and int(documents_NT[n, 0]) != int(documents_NT[n - 1, -1]):
            cur = None
        ids = tokens_NT[n].tolist()
        strs = token_strings(tokenizer, ids, cache)
        for pos, (tok, text) in enumerate(zip(ids, strs)):
            if prepend_bos and pos == 0:
                continue
            if tok in special or (unit == "paragraph" and "\n" in text):
                cur = None
                continue
            if cur is None:
                cur, next_id = next_id, next_id + 1
            out[n, pos] = cur
    return out


# ---- context-level tasks from the Hugging Face hub -------------------------------------------
@dataclass
class ContextTask:
    """A context-level binary task: one label per text."""

    name: str
    texts: list[str]
    labels: list[int]


def load_hf_task(name: str, *, text_field: str = "text", label_field: str = "label", split: str = "train",
                 positive: int | str = 1, limit: int | None = 2000) -> ContextTask:
    """A binary ContextTask from the Hugging Face dataset ``name`` (``name:config`` picks a config).

    Rows whose label equals ``positive`` are 1, all others 0. Needs ``datasets``
    (``pip install 'saelab[hub]'``) and network access or a local HF cache.
    """
    dataset_name, _, config = name.partition(":")
    try:
        import datasets  # optional dependency
    except ImportError as e:
        raise CorpusError(f"probe task {name!r} comes from the Hugging Face hub, which needs the `datasets` "
                          "package (pip install 'saelab[hub]'); the offline suite is probe_tasks.TOKEN_TASKS") from e
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split, streaming=True)
    except Exception as e:  # hub errors come in many types
        raise CorpusError(f"cannot open Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}") from e
    texts, labels = [], []
    for row in ds:
        if text_field not in row or label_field not in row:
            raise CorpusError(f"dataset {name!r} has no column {text_field!r} or {label_field!r} (columns: {sorted(row)})")
        texts.append(str(row[text_field]))
        labels.append(int(row[label_field] == positive))
        if limit is not None and len(texts) >= limit:
            break
    if len(set(labels)) < 2:
        raise CorpusError(f"dataset {name!r}: labels are all {labels[:1]} after mapping positive={positive!r}")
    return ContextTask(name, texts, labels)
