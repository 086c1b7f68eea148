"""Errors raised for bad input. Each message names the input and what was expected."""


class SaelabError(Exception):
    """Base class of every error saelab raises on purpose."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (transformers' and the hub's run to paragraphs of advice)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class HookNameError(SaelabError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ShapeMismatchError(SaelabError, ValueError):
    """Two things that must agree in size do not (e.g. SAE d_in vs. hook width)."""


class CheckpointError(SaelabError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, foreign or unsafe."""


class NotThatKindOfFileError(CheckpointError):
    """A readable file of another kind than the one expected: no torch file, a safetensors file, a torch file
    without the expected tensors (not a damaged or refused one)."""


class CorpusError(SaelabError, ValueError):
    """A corpus that is missing, empty or unreadable."""


class PeerProcessError(SaelabError, RuntimeError):
    """Under torchrun, another process of the run stopped while this one waited for it (its error says why)."""


class NonFiniteError(SaelabError, ValueError):
    """NaN or inf where finite numbers are required."""


class NonFiniteActivationsError(NonFiniteError):
    """NaN or inf in the activations handed to training (the data, not the training, is at fault)."""


class RunExistsError(SaelabError, FileExistsError):
    """A finished run would be overwritten."""


class ConfigError(SaelabError, ValueError):
    """An option or config field with a value outside what it accepts; the message names the
    option and what it expects. Every config class raises this one type."""


class InterruptedBeforeAnyResult(KeyboardInterrupt):
    """A Ctrl-C that left nothing to resume from (a harvest before its first rows whose input had no state to keep):
    the same call starts over."""
