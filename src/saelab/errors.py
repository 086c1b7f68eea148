"""Errors raised for bad input. Each message names the input and what was expected."""


class SaelabError(Exception):
    """Base class of every error saelab raises on purpose."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (transformers' and the hub's run to paragraphs of advice)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Lines of torch's weights_only error that are advice, not a reason; the advice to retry with
# weights_only=False is exactly what an untrusted file must not get.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def torch_load_reason(err: BaseException) -> str:
    """The informative part of a torch.load failure (e.g. 'Unsupported operand 60'), one line."""
    fault = torch_archive_fault(err)
    if fault is not None:
        return f"truncated or damaged archive: {fault}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line.removeprefix("WeightsUnpickler error:").strip() for line in lines
             if not line.startswith(_TORCH_BOILERPLATE)]
    reason = next((line for line in lines if line), "")
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


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
