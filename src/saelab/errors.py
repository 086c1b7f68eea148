"""Errors raised for bad input. Each message names the input and what was expected."""

import errno
import os
import pickle
import re
import struct


class SaelabError(Exception):
    """Base class of every error saelab raises on purpose."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (transformers' and the hub's run to paragraphs of advice)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Fragments that mark a sentence of torch's load errors as advice, not a reason: to retry with weights_only=False
# (in several wordings: a title line, "(1) In PyTorch 2.6 ...", after "Cannot use weights_only=True with ..."), to
# allowlist a global, to read the docs. Retrying unsafely is exactly what an untrusted file must not get; a
# sentence that names False at all is dropped, whatever a file's own class names make it say.
_TORCH_ADVICE = ("Weights only load failed", "can still be loaded", "In PyTorch 2.6", "Re-running", "Do it only if",
                 "trust", "safe_globals", "Alternatively", "recommended steps", "Please file an issue",
                 "Check the documentation", "False")
_REASON_CHARS = 200
"""At most this much of torch's reason is shown: past torch's own words it quotes the file (a class name)."""


def torch_load_reason(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """The informative part of a torch.load failure (e.g. 'Unsupported global: GLOBAL print was not an allowed
    global by default'), one line of printable characters, without torch's advice. ``path``, the file torch
    read, names the faults torch's own error leaves unsaid, by the file's size: an empty file (torch says
    EOFError), a zip archive cut short where its reader names no fault (torch says OSError [Errno 22] Invalid
    argument, for a file cut to under about 64 KiB), a file cut short (``_cut_short``), and a file in the older
    pickle format whose bytes the unpickler could not read as a pickle (IndexError, struct.error or
    UnicodeDecodeError, by where it was cut or damaged)."""
    fault = torch_archive_fault(err)
    if fault is not None:
        return f"truncated or damaged archive: {fault}"
    size, head = _size_and_head(path)
    if size == 0:
        return "empty file (0 bytes)"
    if size is not None and head == _ZIP_SIGNATURE and isinstance(err, OSError) and err.errno == errno.EINVAL:
        return f"truncated or damaged archive ({size:,} bytes)"
    if size is not None and _cut_short(err, head, size, path):
        return f"truncated file ({_bytes(size)})"
    if size is not None and head[:1] == _PICKLE and isinstance(err, (IndexError, struct.error, UnicodeDecodeError)):
        return f"truncated or damaged file ({_bytes(size)})"
    reason = _printable(next(_reason_sentences(str(err)), "").rstrip("."))
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def _bytes(size: int) -> str:
    return f"{size:,} byte{'s' * (size != 1)}"


def may_be_torch_file(head: bytes) -> bool:
    """Whether a file that starts with ``head`` (its first 4 bytes, or all of a shorter file) may be one torch.save
    wrote: a zip archive (or its first bytes) or a pickle."""
    return head[:1] == _PICKLE or _ZIP_SIGNATURE.startswith(head)


def _reason_sentences(text: str):
    """The sentences of torch's error text that are not advice, in order, without the place in torch's C++ code
    that raised it ('[enforce fail at inline_container.cc:180] . ')."""
    for line in text.splitlines():
        line = _CPP_PLACE.sub("", line.strip().removeprefix("WeightsUnpickler error:").strip())
        for sentence in re.split(r"(?<=\.)\s+", line):
            if re.search(r"\w", sentence) and not any(fragment in sentence for fragment in _TORCH_ADVICE):
                yield sentence


_CPP_PLACE = re.compile(r"^\[enforce fail at [^\]]*\][\s.]*")


def _printable(text: str) -> str:
    """``text`` with its control characters escaped (a class name in a file can hold terminal escapes), cut to
    _REASON_CHARS."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def refused_by_weights_only(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether torch.load(weights_only=True) refused a global off its allowlist that the file at ``path`` holds
    whole (a pickle cut within a class name reads as a refusal of the name's first part)."""
    if not isinstance(err, pickle.UnpicklingError) or _REFUSED_GLOBAL.search(str(err)) is None:
        return False
    size, head = _size_and_head(path)
    return size is None or not _cut_short(err, head, size, path)


_PICKLE = b"\x80"
"""How a pickle of protocol 2 or later starts: a torch file in the format before torch 1.6 is a few of them."""
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S*)")
"""How torch names the global it refused ('Unsupported global: GLOBAL print', 'unsupported GLOBAL posix.system')."""


def _cut_short(err: BaseException, head: bytes, size: int, path: str | os.PathLike) -> bool:
    """Whether torch ran out of data: EOFError, a zip signature cut within its 4 bytes, 'unexpected EOF' in the
    storages of the pickle format, or a refused global whose name the file's end cuts short."""
    if isinstance(err, EOFError) or (size < len(_ZIP_SIGNATURE) and _ZIP_SIGNATURE.startswith(head)):
        return True
    if head[:1] != _PICKLE:
        return False
    return (isinstance(err, RuntimeError) and str(err).startswith("unexpected EOF")) or _global_cut_at_end(err, path)


def _global_cut_at_end(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether the global torch refused is what a GLOBAL opcode ('c', then a module line and a name line) at the
    file's end reads as, its last line running to the end: a class name the end cut short."""
    found = _REFUSED_GLOBAL.search(str(err))
    if found is None or not isinstance(err, pickle.UnpicklingError):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - len(found.group(1).encode()) - 3))  # 'c', module, newline, name, a byte dropped
        tail = f.read()
    return any(tail[start:start + 1] == b"c" and _global_as_read(tail[start + 1:]) == found.group(1)
               for start in range(len(tail)))


def _global_as_read(lines: bytes) -> str | None:
    """'module.name' as torch's unpickler reads a GLOBAL's two lines that run to the end of the file: it drops each
    line's last byte, taken for its newline; None where the name line has a newline (it does not run to the end)."""
    module, newline, name = lines.partition(b"\n")
    if b"\n" in name:
        return None
    module, name = (module, name[:-1]) if newline else (module[:-1], b"")
    return f"{module.decode(errors='replace')}.{name.decode(errors='replace')}"


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
    text = first_line(err)
    if not text.startswith(_TORCH_ZIP_READER):
        return None
    return text.split(". ", 1)[0].removeprefix(_TORCH_ZIP_READER).removeprefix("failed reading zip archive: ")


class HookNameError(SaelabError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ShapeMismatchError(SaelabError, ValueError):
    """Two things that must agree in size do not (e.g. SAE d_in vs. hook width)."""


class CheckpointError(SaelabError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, foreign or unsafe."""


class CorpusError(SaelabError, ValueError):
    """A corpus that is missing, empty or unreadable."""


class NonFiniteError(SaelabError, ValueError):
    """NaN or inf where finite numbers are required."""


class NonFiniteActivationsError(NonFiniteError):
    """NaN or inf in the activations handed to training (the data, not the training, is at fault)."""


class RunExistsError(SaelabError, FileExistsError):
    """A finished run would be overwritten."""


class ConfigError(SaelabError, ValueError):
    """An option or config field with a value outside what it accepts; the message names the
    option and what it expects. Every config class raises this one type."""
