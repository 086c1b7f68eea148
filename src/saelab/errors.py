"""Errors raised for bad input. Each message names the input and what was expected."""

import errno
import os
import pickle
import pickletools
import struct


class SaelabError(Exception):
    """Base class of every error saelab raises on purpose."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (transformers' and the hub's run to paragraphs of advice)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Lines of torch's weights_only error that are advice, not a reason: to retry with weights_only=False (its
# title line, or a numbered "(1) ... Re-running torch.load with weights_only set to False will likely succeed"),
# to allowlist the global, to read the docs. Retrying unsafely is exactly what an untrusted file must not get.
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1) ", "(2) ")
_ALLOWLIST_ADVICE = " Please use `torch.serialization"


def torch_load_reason(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """The informative part of a torch.load failure (e.g. 'Unsupported global: GLOBAL print was not an allowed
    global by default'), one line, without torch's advice. ``path``, the file torch read, names the faults
    torch's own error leaves unsaid, by the file's size: an empty file (torch says EOFError), a zip archive cut
    short where its reader names no fault (torch says OSError [Errno 22] Invalid argument, for a file cut to
    under about 64 KiB), a file cut short in the older pickle format (EOFError, IndexError, struct.error or
    'unexpected EOF', by where it was cut) or within a zip's first 4 bytes (read by torch as a pickle)."""
    fault = torch_archive_fault(err)
    if fault is not None:
        return f"truncated or damaged archive: {fault}"
    size, head = _size_and_head(path)
    if size == 0:
        return "empty file (0 bytes)"
    if size is not None and head == _ZIP_SIGNATURE and isinstance(err, OSError) and err.errno == errno.EINVAL:
        return f"truncated or damaged archive ({size:,} bytes)"
    if size is not None and _cut_short(err, head, size, path):
        return f"truncated file ({size:,} byte{'s' * (size != 1)})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
             if not line.startswith(_TORCH_ADVICE)]
    reason = next((line for line in lines if line), "").split(_ALLOWLIST_ADVICE, 1)[0].rstrip(".")
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def refused_by_weights_only(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether torch.load(weights_only=True) refused what the pickle would have built (a global off its allowlist),
    in the file at ``path`` whole: a pickle cut within a class name reads as a refusal of the name's first part."""
    size, head = _size_and_head(path)
    refused = isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed")
    return refused and (size is None or not _cut_short(err, head, size, path))


_LEGACY_PICKLES = 5
"""A torch file in the pickle format (before torch 1.6) starts with this many pickles: magic number, protocol
version, system info, the object, its storages' keys; the storages' bytes follow."""


def _cut_short(err: BaseException, head: bytes, size: int, path: str | os.PathLike | None) -> bool:
    """Whether torch ran out of data: EOFError, a zip signature cut within its 4 bytes, or, in the pickle format,
    the reader's errors for reading past the end, or any error where a pickle ends before its STOP."""
    if isinstance(err, EOFError) or (size < len(_ZIP_SIGNATURE) and _ZIP_SIGNATURE.startswith(head)):
        return True
    if head[:1] != b"\x80":
        return False
    if isinstance(err, (IndexError, struct.error)) or (isinstance(err, RuntimeError)
                                                     and str(err).startswith("unexpected EOF")):
        return True
    return _pickles_cut_short(path, size)


def _pickles_cut_short(path: str | os.PathLike, size: int) -> bool:
    """Whether the file's leading pickles end before their STOP opcode (pickletools parses them; nothing is built
    or run)."""
    with open(path, "rb") as f:
        try:
            for _ in range(_LEGACY_PICKLES):
                if f.tell() == size:
                    return False
                for _ in pickletools.genops(f):
                    pass
        except Exception:  # noqa: BLE001 - an unknown opcode or bad argument before the end, or data run out at it
            return f.tell() >= size
    return False


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
