"""torch.load of the torch files saelab reads (from anyone): plain tensors and containers only, never code; and
what a failed load is worded as: torch's reason without its advice, in one line."""

from __future__ import annotations

import errno
import itertools
import math
import os
import pickle
import re
import struct
import warnings
from typing import Any

import torch

from saelab.errors import first_line
from saelab.utils.pickle_check import check_torch_file


PICKLE_HEAD = b"\x80"
"""How a pickle of protocol 2 or later starts: a torch file in the format before torch 1.6 is a few of them."""


SNIFF_BYTES = 9
"""How much of a file's start safetensors_header_end needs."""
_SAFETENSORS_MAX_HEADER = 100_000_000
"""The largest JSON header the safetensors format allows."""


def safetensors_header_end(head: bytes) -> int | None:
    """Where the JSON header of a safetensors file that starts with ``head`` (its first SNIFF_BYTES) ends: its 8-byte
    little-endian length, then "{"; None for a file of another kind. Its first byte is that length's lowest, which
    can be a pickle's 0x80; a torch zip archive's 8 bytes read as a length past the format's limit."""
    if len(head) < SNIFF_BYTES or head[8:9] != b"{":
        return None
    length = int.from_bytes(head[:8], "little")
    return SNIFF_BYTES - 1 + length if 2 <= length <= _SAFETENSORS_MAX_HEADER else None


def load_plain_tensors(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True, mmap=mmap)``, after ``check_torch_file`` (PickleBombError, an
    UnpicklingError, for a pickle that describes an object far larger than the file). A failure on a file in
    the pickle format carries ``stopped_at``, the byte where torch stopped reading: a refused global whose name
    torch read to the end of the file is a class name cut short (``torch_load_reason`` reads it)."""
    check_torch_file(path)  # a pickle describing an object far larger than the file is refused unread
    # torch warns about files it then reads or refuses (a pickle protocol it did not write, a TorchScript archive):
    # noise above the one line saelab words a failure in. Only torch's warnings, some of which it files under its
    # caller, this module; catch_warnings sets the process's filters, so another thread's warnings from torch are
    # not shown meanwhile either (saelab loads before its own threads start).
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"(torch|{re.escape(__name__)})(\.|$)")
        if f.read(1) != PICKLE_HEAD:  # a zip archive, read by path as torch maps it, or no torch file at all
            return _with_tensors_the_file_holds(
                torch.load(path, map_location=map_location, weights_only=True, mmap=mmap), path)
        f.seek(0)
        try:
            loaded = torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:
            err.stopped_at = f.tell()  # the pickle reader reads through the file's own buffered read and readline
            raise
    return _with_tensors_the_file_holds(loaded, path)


COPIED_BYTES_PER_FILE_BYTE = 16
"""How many times the file's size a load's tensors may take once copied (counted per reference: tied weights twice):
a tensor, or a module's weights, in up to 15 places besides its own reads; 1,024 references to one tensor (1,000
times the file) do not."""
COPIED_BYTES_FREE = 2**16
"""What they may take beyond that whatever the file's size."""
PRINT_STEPS_PER_FILE_BYTE = 16
"""How many steps printing a load's tensors may take (see _print_steps), in times the file's size (and
PRINT_STEPS_FREE): a step is about 0.4 microseconds here, torch.load about 1.6 per byte of an ordinary file."""
PRINT_STEPS_FREE = 2**21
PRINT_STEPS_PER_TENSOR = 128
"""What printing one tensor (each reference) takes whatever its size: one element's tensor takes ~36 microseconds,
a Parameter ~120, so that 100,000 references to one tensor in a 200 KB file took 3.6 s to print."""


def _with_tensors_the_file_holds(loaded: Any, path: str | os.PathLike) -> Any:
    """``loaded``, after checking that its tensors, each copy counted (a cast at resume copies each reference),
    take at most COPIED_BYTES_PER_FILE_BYTE times the file's size (and COPIED_BYTES_FREE), and printing them at most
    PRINT_STEPS_PER_FILE_BYTE steps per byte (and PRINT_STEPS_FREE): a view of one stored element
    (``torch.zeros(1).expand(2**29)``: 4 bytes on disk, 2 GB once copied), a compressed or an uninitialised
    legacy storage, one tensor referred to thousands of times, or one of hundreds of dimensions, is refused, as is
    a storage outside any tensor, a tensor of over TENSOR_DIMS_MAX dimensions and a tensor that is not dense
    (sparse, nested, quantized). The walk is linear: check_torch_file charged each reference to a container with
    all it holds, and a tensor's attributes are walked once."""
    size = os.path.getsize(path)
    limit = COPIED_BYTES_PER_FILE_BYTE * size + COPIED_BYTES_FREE
    steps_limit = PRINT_STEPS_PER_FILE_BYTE * size + PRINT_STEPS_FREE
    total, steps, todo = 0, 0, [loaded]
    with_attributes: set[int] = set()  # the tensors whose attributes were walked: once each, however many references
    while todo:
        obj = todo.pop()
        if isinstance(obj, dict):  # dict's own methods: an OrderedDict's attributes may hide its keys and values
            todo.extend(dict.keys(obj))
            todo.extend(dict.values(obj))
            todo.extend(getattr(obj, "__dict__", {}).values())  # an OrderedDict's attributes, set by its state
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, (torch.TypedStorage, torch.UntypedStorage)):  # printed element by element in Python
            raise pickle.UnpicklingError("it holds a storage outside any tensor (torch.save writes weights as "
                                         "tensors; saelab reads nothing else)")
        elif torch.is_tensor(obj):
            if obj.__dict__ and id(obj) not in with_attributes:  # attributes a user set, a tensor among them too
                with_attributes.add(id(obj))
                todo.extend(obj.__dict__.values())
            total, steps = total + _copied_bytes(obj), steps + _print_steps(obj)
            if total > limit:
                raise pickle.UnpicklingError(f"its tensors count for {total:,} bytes or more once copied, over "
                                             f"{COPIED_BYTES_PER_FILE_BYTE} times the file's {size:,}")
            if steps > steps_limit:
                raise pickle.UnpicklingError(f"its tensors take {steps:,} steps or more to print (each element's text "
                                             f"joined once per dimension), over {PRINT_STEPS_PER_FILE_BYTE} per byte "
                                             f"of the file's {size:,}")
    return loaded


def _copied_bytes(t: torch.Tensor) -> int:
    """What ``t`` is charged in bytes: its bytes once copied; a tensor of no elements EMPTY_VIEW_BYTES per row of
    its dimensions before the first empty one (iterating one unbinds them: ``torch.zeros(3_000_000, 0)``, 1,866
    bytes on disk, is 2 GB of views; ``torch.zeros(0, 4096)`` none), and the bytes of its other dimensions' elements
    (what a sum over an empty dimension makes: ``torch.zeros(0, 2**28).sum(0)``, 1 GB from 1,548 bytes)."""
    # A sparse tensor's indices are not checked at load: out of range, they write out of bounds when it is used.
    kind = ("a nested tensor" if t.is_nested else "a quantized tensor" if t.is_quantized
            else None if t.layout == torch.strided else f"a tensor of layout {t.layout}")
    if kind:
        raise pickle.UnpicklingError(f"it holds {kind}, which saelab does not read (torch.save writes weights as "
                                     "dense tensors)")
    if t.dim() > TENSOR_DIMS_MAX:
        raise pickle.UnpicklingError(f"it holds a tensor of {t.dim():,} dimensions, over {TENSOR_DIMS_MAX} (torch.save "
                                     "writes weights in a few; torch's operations take their count squared)")
    if t.numel() == 0:
        return (EMPTY_VIEW_BYTES * math.prod(itertools.takewhile(bool, t.shape))
                + t.element_size() * math.prod(n for n in t.shape if n))
    return t.numel() * t.element_size()


TENSOR_DIMS_MAX = 64
"""The most dimensions a tensor may have, numpy's limit: one empty tensor of 100,000 (200 KB) took 35 s to double and
crashed Python when listed (its dimensions are walked by recursion)."""
EMPTY_VIEW_BYTES = 16
"""What each view iterating a tensor of no elements makes is charged (a view object takes about 700 bytes)."""


def _print_steps(t: torch.Tensor) -> int:
    """What printing ``t`` takes, in steps: PRINT_STEPS_PER_TENSOR, and dimensions**2 / 4 per element printed, as
    printing joins each element's text once per dimension, a text that grows with the depth (65,536 elements in 16
    dimensions of 2 and 48 of 1: 30-70 s, a view of one boolean or stored whole)."""
    printed = t.numel() if t.numel() <= PRINTED_WHOLE else math.prod(min(n, 2 * PRINTED_EDGE) for n in t.shape)
    return PRINT_STEPS_PER_TENSOR + printed * t.dim() ** 2 // 4


PRINTED_WHOLE, PRINTED_EDGE = 1000, 3
"""torch's default print options (threshold, edgeitems): a tensor of more elements is printed as the first and last
3 of each dimension longer than 6."""


# Fragments that mark a sentence of torch's load errors as advice, not a reason: to retry with weights_only=False (a
# title line, "(1) In PyTorch 2.6 ...", after "Cannot use weights_only=True with ..."), to allowlist a global, to
# read the docs. Retrying unsafely is exactly what an untrusted file must not get: a sentence naming False or trust
# at all is dropped, in case a reason quotes the file (those known to are shown with the file's words quoted:
# _FILE_TEXT_IN). (An operating system's error, which may quote a path holding such words, is taken whole.)
_TORCH_ADVICE = ("Weights only load failed", "can still be loaded", "In PyTorch 2.6", "Re-running", "Do it only if",
                 "trust", "safe_globals", "Alternatively", "recommended steps", "Please file an issue",
                 "Check the documentation", "False")
_REASON_CHARS = 200
"""At most this much of a name from the file (a refused global's) or of torch's reason is shown."""


def torch_load_reason(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """The informative part of a torch.load failure (e.g. 'Unsupported global: GLOBAL print was not an allowed
    global by default'), one line of printable characters, without torch's advice. ``path``, the file torch
    read, names the faults torch's own error leaves unsaid, by the file's size: an empty file (torch says
    EOFError), a zip archive cut short where its reader names no fault (torch says OSError [Errno 22] Invalid
    argument, for a file cut to under about 64 KiB), a file cut short or damaged (``_cut_short``)."""
    fault = torch_archive_fault(err)
    if fault is not None:
        return f"truncated or damaged archive: {fault}"
    size, head = _size_and_head(path)
    if size == 0:
        return "empty file (0 bytes)"
    if size is not None and head == _ZIP_SIGNATURE and isinstance(err, OSError) and err.errno == errno.EINVAL:
        return f"truncated or damaged archive ({size:,} bytes)"
    refused = _refused_global(err)
    cut = None if size is None else _cut_short(err, head, size, path, refused)
    if cut is not None:
        return f"{cut} ({size:,} byte{'s' * (size != 1)})"
    if refused is not None:
        return f"{type(err).__name__}: {refused[0]}"
    quoted = None if isinstance(err, OSError) else _with_file_text_quoted(str(err))
    if quoted is not None:
        return f"{type(err).__name__}: {quoted}"
    text = first_line(err) if isinstance(err, OSError) else next(_reason_sentences(str(err)), "")
    reason = _printable(text.rstrip("."))
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def shown_loaded(value: Any) -> str:
    """A value read from a torch file, for a message: text (cut to 200 characters) and numbers as Python writes
    them, anything else by its type, "(a tuple)": a crafted file's tuple of shared tuples, or a tensor viewed
    from one element, would take days to write out."""
    if isinstance(value, str):
        return repr(value[:_REASON_CHARS]) + ("..." if len(value) > _REASON_CHARS else "")
    if value is None or isinstance(value, float) or (isinstance(value, int) and value.bit_length() <= 64):
        return repr(value)
    return f"(a {type(value).__name__})"


def key_names(mapping: Any, n: int) -> list[str]:
    """The first ``n`` of a loaded mapping's keys in sorted order, for a message: text keys (cut to 200
    characters), any other as "(a tuple)" (see shown_loaded)."""
    return sorted(k[:_REASON_CHARS] if isinstance(k, str) else shown_loaded(k) for k in mapping)[:n]


def may_be_torch_file(head: bytes) -> bool:
    """Whether a file that starts with ``head`` (its first 4 bytes, or all of a shorter file) may be one torch.save
    wrote: a zip archive (or its first bytes) or a pickle."""
    return head[:1] == PICKLE_HEAD or _ZIP_SIGNATURE.startswith(head)


def refused_by_weights_only(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether torch.load(weights_only=True) refused a global off its allowlist that the file at ``path`` holds
    whole (a pickle cut within a class name reads as a refusal of the name's first part)."""
    refused = _refused_global(err)
    if refused is None:
        return False
    size, head = _size_and_head(path)
    return size is None or _cut_short(err, head, size, path, refused) is None


def _reason_sentences(text: str):
    """The sentences of torch's error text that are not advice, in order, without the place in torch's C++ code
    that raised it ('[enforce fail at inline_container.cc:180] . ')."""
    for line in text.splitlines():
        line = _CPP_PLACE.sub("", line.strip().removeprefix("WeightsUnpickler error:").strip())
        line = line.replace(_ALLOWLIST_POINTER, "")  # the pointer ends a reason's sentence: 'Can only build ...'
        for sentence in re.split(r"(?<=\.)\s+", line):
            if re.search(r"\w", sentence) and not any(fragment in sentence for fragment in _TORCH_ADVICE):
                yield sentence


_ALLOWLIST_POINTER = " via `add_safe_globals`"
# torch's reasons that hold text from the file (an object a pickle made, a record, an archive member's name: a
# crafted file makes it anything, advice and terminal escapes too), as (torch's words before it, torch's words after
# it or None for the end, the part of those kept): the file's text is shown quoted, as a refused global's name is
_AFTER_TORCH_REASON = "\n\nCheck the documentation of torch.load"
_FILE_TEXT_IN = (
    ("Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got ",
     _AFTER_TORCH_REASON, ""),
    ("Trying to call reduce for unrecognized function ", _AFTER_TORCH_REASON, ""),
    ("Invalid protocol version: ", None, ""),  # a pre-1.6 file's second pickle
    ("Unknown endianness type: ", None, ""),  # a zip archive's byteorder record
    ("file in archive is not in a subdirectory: ", None, ""),
    ("failed locating file ", ": file not found. This is an internal miniz error", ": file not found"),
)


def _with_file_text_quoted(text: str) -> str | None:
    """torch's reason ``text`` (not an operating system's) from the first of its words in _FILE_TEXT_IN, the file's
    text in it quoted, without torch's advice; None where it holds none of them. The words that come first are
    torch's: the file's text comes after them."""
    found = [(text.find(lead), lead, after, kept) for lead, after, kept in _FILE_TEXT_IN if lead in text]
    if not found:
        return None
    start, lead, after, kept = min(found, key=lambda hit: hit[0])
    end = text.rfind(after) if after else -1
    end, kept = (end, kept) if end >= start + len(lead) else (len(text), "")
    return lead.replace(_ALLOWLIST_POINTER, "") + _quoted(text[start + len(lead):end]) + kept


_CPP_PLACE = re.compile(r"^\[enforce fail at [^\]]*\][\s.]*")


def _printable(text: str) -> str:
    """``text`` cut to _REASON_CHARS, its control characters escaped (a class name in a file can hold terminal
    escapes or line breaks)."""
    cut = text[:_REASON_CHARS]
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in cut)
    return shown if len(cut) == len(text) else shown + "..."


# How torch words the refusal of a global. The name comes from the file and may hold any characters, torch's own
# words too: it is found by the whole of torch's fixed wording around it, which repeats it (the words of another
# torch, where that fails: up to the first of its words).
_UNSUPPORTED = ("Unsupported global: GLOBAL ", " was not an allowed global by default. Please use "
                "`torch.serialization.add_safe_globals([", "])` or the `torch.serialization.safe_globals([",
                "])` context manager to allowlist this global if you trust this class/function.")
_BLOCKED = ("Trying to load unsupported GLOBAL ", " whose module ", " is blocked.")


def _refused_global(err: BaseException) -> tuple[str, str] | None:
    """(torch's refusal of a global in its own words, the file's names quoted; the global's name as torch gives
    it), or None when ``err`` is no such refusal."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    text = str(err)
    unsupported, blocked = _unsupported_name(text), _blocked_name(text)
    if unsupported is not None and blocked is not None:  # a name holds the other refusal: torch's words end the text
        unsupported, blocked = ((unsupported, None) if text.rfind(_UNSUPPORTED[-1]) > text.rfind(_BLOCKED[-1])
                                else (None, blocked))
    if unsupported is None and blocked is None:  # another torch's wording
        unsupported, blocked = _between(text, _UNSUPPORTED[:2]), _between(text, _BLOCKED)
    if blocked is not None:  # torch checks the module first
        return (f"Trying to load unsupported GLOBAL {_quoted(blocked[0])} whose module {_quoted(blocked[1])} is "
                "blocked", blocked[0])
    if unsupported is not None:
        return f"Unsupported global: GLOBAL {_quoted(unsupported[0])} was not an allowed global by default", \
            unsupported[0]
    return None


def _quoted(name: str) -> str:
    """A name from a file, quoted as Python writes a string (control characters escaped), cut to _REASON_CHARS: it
    reads as the file's words, whatever they say."""
    return repr(name[:_REASON_CHARS]) + ("..." if len(name) > _REASON_CHARS else "")


def _unsupported_name(text: str) -> tuple[str] | None:
    """(the global's name,) in torch's 'Unsupported global' refusal, which says the name three times."""
    lead, between, again, tail = _UNSUPPORTED
    start, end = text.find(lead), text.rfind(tail)
    body = text[start + len(lead):end] if 0 <= start < end else ""
    n, odd = divmod(len(body) - len(between) - len(again), 3)
    if not odd and n >= 0 and body == body[:n] + between + body[:n] + again + body[:n]:
        return (body[:n],)
    return None


def _blocked_name(text: str) -> tuple[str, str] | None:
    """(the global's name, its module) in torch's refusal of a global of a blocked module, which says the module
    last (torch's, whatever the name holds) and first, as the name's start."""
    lead, between, tail = _BLOCKED
    start, end = text.find(lead), text.rfind(tail)
    middle = text.rfind(between, 0, max(end, 0))
    if 0 <= start and start + len(lead) <= middle:
        name, module = text[start + len(lead):middle], text[middle + len(between):end]
        if name.startswith(module + "."):
            return name, module
    return None


def _between(text: str, words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The pieces of ``text`` between ``words`` taken in order, each up to the first of the next (in linear
    time); None where a word is missing."""
    at, pieces = text.find(words[0]), []
    if at < 0:
        return None
    at += len(words[0])
    for word in words[1:]:
        end = text.find(word, at)
        if end < 0:
            return None
        pieces.append(text[at:end])
        at = end + len(word)
    return tuple(pieces)


def _cut_short(err: BaseException, head: bytes, size: int, path: str | os.PathLike,
               refused: tuple[str, str] | None) -> str | None:
    """How a file that torch ran out of data in reads: 'truncated file' for a zip signature cut within its 4 bytes;
    'truncated or damaged file' for EOFError and, in the pickle format, 'unexpected EOF' in the storages,
    IndexError, struct.error, UnicodeDecodeError or a refused global that the reader took to the end of the file
    (a pickle cut within a class name; a pickle holds the lengths it reads: one damaged byte runs it past the end
    as a cut does); None otherwise. ``refused``: ``_refused_global(err)``."""
    if size < len(_ZIP_SIGNATURE) and _ZIP_SIGNATURE.startswith(head):
        return "truncated file"
    if isinstance(err, EOFError):
        return "truncated or damaged file"
    if head[:1] != PICKLE_HEAD:
        return None
    ran_out = isinstance(err, (IndexError, struct.error, UnicodeDecodeError)) or (
        isinstance(err, RuntimeError) and str(err).startswith("unexpected EOF"))
    return "truncated or damaged file" if ran_out or _name_cut_at_the_end(err, path, size, refused) else None


def _name_cut_at_the_end(err: BaseException, path: str | os.PathLike, size: int,
                         refused: tuple[str, str] | None) -> bool:
    """Whether torch refused a global whose lines the end of the file cut short: it stopped reading at the end
    (``stopped_at``, where ``load_plain_tensors`` read the file) and the name's line has no
    newline there, or the file ends with the opcode and the module line alone (an empty name). A whole name at the
    end is a refusal. ``refused``: ``_refused_global(err)``."""
    if refused is None or getattr(err, "stopped_at", -1) < size:
        return False
    name = refused[1]
    with open(path, "rb") as f:  # the GLOBAL opcode, a whole module line, an empty name: as long as the name
        f.seek(max(0, size - len(name.encode()) - len(_BUILTIN_MODULE) - 2))
        tail = f.read()
    if not tail.endswith(b"\n"):
        return True
    modules = [name[:-1]] if name.endswith(".") else [] if name else ["builtins", _BUILTIN_MODULE]
    return any(tail.endswith(b"c" + module.encode() + b"\n") for module in modules)


_BUILTIN_MODULE = "__builtin__"
"""Python 2's name of builtins: torch names its globals without a module, as those of builtins."""


_ZIP_SIGNATURE = b"PK\x03\x04"
"""How the zip archive torch.save writes starts (torch reads any file that starts so as one)."""


def _size_and_head(path: str | os.PathLike | None) -> tuple[int | None, bytes]:
    """The size of the file at ``path`` and its first 4 bytes; (None, b"") when there is none to read."""
    if path is None:
        return None, b""
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size, f.read(len(_ZIP_SIGNATURE))
    except OSError:
        return None, b""


# torch's zip reader says what it found wrong with a checkpoint cut short or damaged, then, on the same line, a
# paragraph of advice ("This is an internal miniz error. If you are seeing this error, ...").
_TORCH_ZIP_READER = "PytorchStreamReader "


def torch_archive_fault(err: BaseException) -> str | None:
    """What torch's zip reader found wrong with a checkpoint cut short or damaged (e.g. 'failed finding central
    directory', 'failed locating file data.pkl: file not found'), without its advice; None for a failure of
    anything else."""
    text = str(err).strip()
    if not text.startswith(_TORCH_ZIP_READER):
        return None
    quoted = _with_file_text_quoted(text)  # a member's name, from the archive
    if quoted is not None:
        return quoted
    first = first_line(err).split(". ", 1)[0].removeprefix(_TORCH_ZIP_READER)
    return _printable(first.removeprefix("failed reading zip archive: "))
