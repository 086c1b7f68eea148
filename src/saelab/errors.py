"""Errors raised for bad input. Each message names the input and what was expected."""

import errno
import os


class SaelabError(Exception):
    """Base class of every error saelab raises on purpose."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (transformers' and the hub's run to paragraphs of advice)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Lines of torch's weights_only error that are advice, not a reason; the advice to retry with
# weights_only=False is exactly what an untrusted file must not get.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def torch_load_reason(err: BaseException, path: str | os.PathLike | None = None) -> str:
    """The informative part of a torch.load failure (e.g. 'Unsupported operand 60'), one line. ``path``, the file
    torch read, names the faults torch's own error leaves unsaid, by the file's size: an empty file (torch says
    EOFError), a zip archive cut short where its reader names no fault (torch says OSError [Errno 22] Invalid
    argument, for a file cut to under about 64 KiB), an older pickle-format file cut short (EOFError)."""
    fault = torch_archive_fault(err)
    if fault is not None:
        return f"truncated or damaged archive: {fault}"
    size, head = _size_and_head(path)
    if size == 0:
        return "empty file (0 bytes)"
    if size is not None and head == _ZIP_SIGNATURE and isinstance(err, OSError) and err.errno == errno.EINVAL:
        return f"truncated or damaged archive ({size:,} bytes)"
    if size is not None and isinstance(err, EOFError):
        return f"truncated file ({size:,} byte{'s' * (size != 1)})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
             if not line.startswith(_TORCH_BOILERPLATE)]
    reason = next((line for line in lines if line), "")
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


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
