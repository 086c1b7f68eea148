"""Experiment logging next to a run's metrics.jsonl: TensorBoard and Weights & Biases, off by default.

A sink receives every metrics row the trainer appends to metrics.jsonl (``log(step, row)``) and is
closed with the run. Only the writing process (rank 0) opens sinks. Resuming never logs a step
twice: metrics.jsonl is cut back to the checkpoint's step, and so are the sinks:

- TensorBoard (RUN/tensorboard/) reopens with ``purge_step`` = checkpoint step + 1, a marker that
  makes TensorBoard drop the events a crashed session wrote after the checkpoint.
- An overwrite replaces RUN/tensorboard/, RUN/wandb/ and RUN/wandb_run_id with the rest of the earlier
  run (``run_folder.RUN_RESULTS``): TensorBoard reads every event file of the folder, so an earlier run's
  would show as the new one's; W&B's offline runs beside the new one's would be synced with them, and an
  interrupted overwrite's run id would make the earlier run, resumed, log into the new W&B run.
- W&B continues the same run (``resume="allow"``, its id kept in RUN/wandb_run_id). W&B cannot
  delete history: online, it ignores (with a warning) steps at or below the last one it holds, so
  the rows a crashed session logged after its checkpoint stay as they were; offline, each session
  is its own folder under RUN/wandb/, synced into the same run. A run started from step 0 (new,
  overwritten, or killed before its first checkpoint) starts a new W&B run. ``WANDB_MODE=offline``
  works without a network; ``WANDB_PROJECT`` names the project (default: saelab).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from saelab.errors import ConfigError
from saelab.run_folder import TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE
from saelab.train.config import LOG_TARGETS
from saelab.utils.atomic import write_text

WANDB_MIN_VERSION = "0.19.10"
TAG_PREFIX = "train/"
"""Scalars are named train/<metrics.jsonl field> (TensorBoard groups them by this prefix)."""


class MetricSink(Protocol):
    def log(self, step: int, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def check_log_targets(log_to: str | Sequence[str] | None) -> tuple[str, ...]:
    """The logging targets asked for, each known and its package importable (a one-line ConfigError
    otherwise), so that a missing package is reported before any work starts."""
    targets = (log_to,) if isinstance(log_to, str) else tuple(log_to or ())
    for name in targets:
        if name not in LOG_TARGETS:
            raise ConfigError(f"--log-to {name!r}: expected one of {', '.join(LOG_TARGETS)}")
    if "tensorboard" in targets:
        try:
            import torch.utils.tensorboard  # noqa: F401 - raises when the tensorboard package is missing
        except ImportError:
            raise ConfigError("--log-to tensorboard needs the tensorboard package: pip install tensorboard") \
                from None
    if "wandb" in targets:
        _check_wandb()
    return tuple(dict.fromkeys(targets))  # each once, in the order given


def _check_wandb() -> None:
    try:
        import wandb
    except ImportError:
        raise ConfigError("--log-to wandb needs the wandb package: pip install wandb") from None
    from packaging.version import InvalidVersion, Version

    try:  # reinit="create_new" (several runs at once, as a sweep trains them) came in 0.19.10
        too_old = Version(wandb.__version__) < Version(WANDB_MIN_VERSION)
    except InvalidVersion:
        too_old = False
    if too_old:
        raise ConfigError(f"--log-to wandb needs wandb >= {WANDB_MIN_VERSION}, found {wandb.__version__}: "
                          "pip install -U wandb")


def numeric_fields(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numbers except ``step`` (the x axis), as ``train/<field>``."""
    return {TAG_PREFIX + k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """One scalar per numeric field into RUN/tensorboard/, flushed after every row so the event
    file keeps up with metrics.jsonl."""

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: readers drop events at or after this step from earlier (crashed) sessions.
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        for tag, value in numeric_fields(row).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(run_dir: Path, resume_step: int) -> str:
    """The W&B run id of this run folder: the recorded one when resuming, a new one from step 0."""
    path = Path(run_dir) / WANDB_ID_FILE
    if resume_step > 0 and path.exists():
        recorded = path.read_text().strip()
        if recorded:
            return recorded
    run_id = secrets.token_hex(8)
    write_text(path, run_id + "\n")
    return run_id


class WandbSink:
    """A W&B run named after the run folder, its config the training config, its files in RUN/wandb/
    (WANDB_DIR: W&B names that folder itself, inside ``dir``)."""

    def __init__(self, run_dir: Path, resume_step: int, config: Mapping[str, Any], group: str | None = None):
        import wandb

        run_dir = Path(run_dir)
        # reinit="create_new": a sweep trains several runs at once in this process, each its own W&B run.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "saelab", name=run_dir.name,
                              id=wandb_run_id(run_dir, resume_step), config=dict(config), group=group,
                              dir=str(run_dir), resume="allow", reinit="create_new")

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        self.run.log(numeric_fields(row), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(log_to: Sequence[str], run_dir: Path, resume_step: int, config: Mapping[str, Any],
               group: str | None = None) -> list[MetricSink]:
    """The sinks ``log_to`` names (checked by :func:`check_log_targets`) for one run folder."""
    sinks: list[MetricSink] = []
    try:
        for name in check_log_targets(log_to):
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run_dir, resume_step))
            else:
                sinks.append(WandbSink(run_dir, resume_step, config, group))
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: Sequence[MetricSink]) -> None:
    """Close every sink, even when one fails to (its error is raised after the others closed)."""
    error: BaseException | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - raised below, once every sink had its chance
            error = error or e
    if error is not None:
        raise error


__all__ = ["LOG_TARGETS", "TENSORBOARD_DIR", "WANDB_DIR", "WANDB_ID_FILE", "MetricSink", "TensorBoardSink",
           "WandbSink", "check_log_targets", "close_sinks", "open_sinks"]
