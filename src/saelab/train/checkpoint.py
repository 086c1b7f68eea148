"""Run folders: config, resumable checkpoints, metrics log, finished-run protection.

A run folder has one writer at a time: the trainer holds its :class:`~saelab.utils.folder_lock.RunLock`
while it writes there.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from saelab.errors import CheckpointError, RunExistsError
from saelab.run_folder import CHECKPOINT, RUN_RESULTS, STATUS, TRAIN_CONFIG, TRAINING_LOG
from saelab.train import distributed as ddp
from saelab.train.config import unused_settings
from saelab.utils.atomic import (SET_ASIDE, atomic_path, is_being_replaced, is_paused, put_back_set_aside,
                                 remove_entry, replacing_entries, resuming_replacement, write_bytes, write_json)
from saelab.utils.differences import visible_difference
from saelab.utils.folder_lock import RunFolderBusyError, RunLock
from saelab.utils.torch_files import key_names, load_plain_tensors, torch_load_reason
from saelab.utils.words import listed_names

METRICS = TRAINING_LOG  # the training log's name, kept for callers of this module


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run folder is damaged") from e


def recorded_train_seconds(status: dict[str, Any]) -> float:
    """status.json's train_seconds: the training loop's time over every call, as of the last checkpoint
    (0 when absent or not a number)."""
    seconds = status.get("train_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0 \
        else 0.0


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    write_json(run_dir / STATUS, {"state": state, **extra})


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's train_config.json, None when there is none; a damaged one is refused."""
    path = run_dir / TRAIN_CONFIG
    if not path.exists():
        return None
    damaged = "the run folder is damaged: move it away, or pass overwrite=True (--overwrite)"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {damaged}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, expected a JSON object; {damaged}")
    return config


def check_run_dir(run_dir: Path, config: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Whether the run folder can take this run, without changing it; True when there is a
    checkpoint to resume from.

    A finished run is never overwritten unless ``overwrite``; an unfinished one with the same
    config (but for RESUMABLE_CHANGES) resumes; one with a different config is refused (it would mix
    two experiments).
    """
    if overwrite:
        return False
    old = _recorded_config(run_dir)
    changes = training_changes(old, config) if old is not None else []
    if read_status(run_dir).get("state") == "finished":
        other = f" trained with other settings ({', '.join(changes)})" if changes else ""
        raise RunExistsError(
            f"run folder {run_dir} holds a finished run{other}; pick another folder or pass overwrite=True (--overwrite)"
        )
    # Without a checkpoint (a run that failed before its first one) there is nothing to resume: the
    # new run starts over in the folder, and its start clears the old log.
    if changes and (run_dir / CHECKPOINT).exists():
        raise RunExistsError(f"run folder {run_dir} holds an unfinished run with a different config (differs in "
                             f"{', '.join(changes)}); {_how_to_go_on(changes)}")
    return (run_dir / CHECKPOINT).exists()


def _how_to_go_on(changes: list[str]) -> str:
    """What to do about an unfinished run that these settings may not resume."""
    if any(c.endswith(HARVESTED_AGAIN) for c in changes):
        # The same options cannot resume it: the rows it trained on are no longer in the cache.
        return ("the rows it was training on were replaced by that harvest, so it cannot resume on them: pass "
                "overwrite=True (--overwrite) to train it again from the start on the rows there now, or pick another "
                "folder; to resume it, harvest its rows into the cache again (the harvest it was trained on, with "
                "--overwrite) and the other rows into another folder")
    return ("resume it with the same options (--checkpoint-every and --log-every may change), pick another folder, "
            "or pass overwrite=True (--overwrite)")


RESUMABLE_CHANGES = (("train", "checkpoint_every"), ("train", "log_every"))
"""Settings a resumed run may change: when it saves and logs, not what it trains."""


_UNSET = object()


def _shown(value: Any) -> str:
    if value is _UNSET or value is None:
        return "absent" if value is _UNSET else "none"
    return json.dumps(value, default=str)


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'group.field old -> new' for each setting that differs between two run configs ({group: {field:
    value}}), nested dicts (an SAE's ``extra``) named down to the key that differs."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            shown_a, shown_b = visible_difference(_shown(a), _shown(b))
            changed.append(f"{prefix}{key} {shown_a} -> {shown_b}")
    return changed


def training_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """changed_fields of two run configs (or their "train" groups alone), less the settings a resume may
    change and those that act on nothing in one of the two runs (``unused_settings``: a ReLU run's k, which the
    change of architecture names): empty when both train the same SAE."""
    a, b = _what_it_trains(old), _what_it_trains(new)
    trains = [c["train"] for c in (a, b) if isinstance(c.get("train"), dict)]
    for field in set().union(*map(unused_settings, trains)):
        for train in trains:
            train.pop(field, None)
    return changed_fields(a, b) + data_changes(old, new)


def data_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'--activations OLD -> NEW' when two run configs trained on other activations (their "data": the
    cache's folder and a fingerprint of its rows). Compared by the fingerprint, so a moved cache is the
    same; a run recorded before "data" existed is taken as trained on these."""
    a, b = old.get("data"), new.get("data")
    if not isinstance(a, dict) or not isinstance(b, dict) or a.get("fingerprint") == b.get("fingerprint") or \
            a.get("fingerprint") == b.get("fingerprint_with_seconds", b.get("fingerprint")):  # older runs' form
        return []
    was, now = a.get("activations"), b.get("activations")
    return [f"--activations {was} -> {now}" if was != now else f"--activations {now}{HARVESTED_AGAIN}"]


HARVESTED_AGAIN = " (harvested again since)"
"""How a data change reads when the cache is in the same folder with other rows."""


def _what_it_trains(config: dict[str, Any]) -> dict[str, Any]:
    """A run config less the settings a resume may change, and less the SAE's copies of the training
    settings (sae.extra.train, and sae.k, sae.n_latents, sae.input_norm: they follow from train's), so
    that a change is named once, as the option that makes it."""
    config = json.loads(json.dumps(config, default=str))
    config.pop("data", None)  # data_changes names it
    sae, train = config.get("sae"), config.get("train")
    if isinstance(sae, dict) and isinstance(train, dict):
        for field in set(sae) & set(train):
            sae.pop(field)
    extra = sae.get("extra") if isinstance(sae, dict) else None
    if isinstance(extra, dict):
        extra.pop("train", None)
    for group, field in RESUMABLE_CHANGES:
        if isinstance(config.get(group), dict):
            config[group].pop(field, None)
    return config


def commit_run_dir(run_dir: Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
    """Once the run has started (initialised or resumed without error): clear what an overwritten run left
    and record the config. Written only now, so a start that failed leaves no config behind that would make
    the corrected rerun look like a different experiment. Under :func:`replacing_run` (train_sae, the CLI)
    the earlier run is already set aside and nothing is left to clear; a direct ``TrainingRun(overwrite=True)``
    loses it here, since beside the new config its SAE, report or browser would read as the new run's."""
    if overwrite:
        for name in RUN_RESULTS:
            remove_entry(run_dir / name)
    write_json(run_dir / TRAIN_CONFIG, config)


@contextlib.contextmanager
def replacing_run(run_dir: Path) -> Iterator[None]:
    """An overwrite of the run in ``run_dir``: the earlier run's files (RUN_RESULTS) are set aside while
    the block trains (and evaluates) the new one, removed once the new run has finished, and put back when
    it is interrupted or fails, so an overwrite never leaves less than it found. A block that ends with the
    new run unfinished (``stop_after_steps``: a deliberate pause) keeps them set aside for the resume that
    finishes it (:func:`resuming_run`). Set aside rather than left in place: beside the new config, the old
    SAE, report or browser would be read as the new run's."""
    if Path(run_dir).is_dir():
        RunLock(run_dir).acquire().release()  # a live writer's files are never moved: it is refused first
    with replacing_entries(run_dir, RUN_RESULTS, complete=lambda: _finished(run_dir)):
        yield


@contextlib.contextmanager
def resuming_run(run_dir: Path) -> Iterator[None]:
    """A call that resumes the run in ``run_dir``: when it resumes a paused overwrite, the earlier run
    still set aside is removed once the new run has finished; until then it stays set aside."""
    with resuming_replacement(run_dir, complete=lambda: _finished(run_dir)):
        yield


def _finished(run_dir: Path) -> bool:
    try:
        return read_status(run_dir).get("state") == "finished"
    except CheckpointError:  # a damaged status.json: keep the earlier run rather than lose it
        return False


def settle_cut_off_replacement(run_dir: Path) -> None:
    """Put back the earlier run an overwrite killed mid-way (SIGKILL, power loss) left set aside, before a
    writer reads the folder: the same state Ctrl-C leaves. Else the new run's partial files would be resumed
    and the set-aside put back later, over it. A live replacement in another process is refused instead; a
    paused one is left for the resume to finish."""
    if not is_being_replaced(run_dir) and not is_paused(run_dir) and put_back_set_aside(run_dir, RUN_RESULTS):
        print(f"saelab: {run_dir}: an overwrite of this run was cut off; its earlier results are back in place",
              file=sys.stderr)


def settle_before_reading(*run_dirs: Path, busy_left: bool = False) -> None:
    """:func:`settle_cut_off_replacement` of each run folder before it is read for a finished run, so the same
    command again finds the earlier run, not the killed overwrite's partial files. A folder's lock is taken only
    where that puts a run back (a live evaluation of a finished run, or a paused overwrite being resumed, keeps no
    reader out); under torchrun rank 0 settles while the others wait, so every rank reads one state. ``busy_left``:
    a folder another process writes is left to it (a sweep's neighbours), not refused."""
    if ddp.rank() == 0:
        for run_dir in map(Path, run_dirs):
            if not (run_dir / SET_ASIDE).is_dir() or is_paused(run_dir) or is_being_replaced(run_dir):
                continue
            try:
                lock = RunLock(run_dir).acquire()
            except RunFolderBusyError:
                if busy_left:
                    continue
                raise
            try:
                settle_cut_off_replacement(run_dir)
            finally:
                lock.release()
    ddp.wait_for_every_rank()


CHECKPOINT_KEYS = ("step", "sae", "optimizer", "tokens_since_fired", "normalizer", "ema")


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor on the CPU: checkpoints do not depend on the
    device that wrote them."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    # Serialized in memory first: torch.save into a file that cannot grow (full disk) fails with an
    # opaque RuntimeError; writing the bytes raises a plain OSError naming the file, and the previous
    # checkpoint stays in place either way.
    buf = io.BytesIO()
    torch.save(to_cpu(state), buf)
    write_bytes(run_dir / CHECKPOINT, buf.getbuffer())


def cannot_resume(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot resume from {path}: {why}; expected a training checkpoint written by saelab. It was left as "
        "it is: move it away, or pass overwrite=True (--overwrite) to start the run over"
    )


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The training state in ``run_dir``, its tensors on ``map_location`` (the trainer moves them to
    its own device, so a run started on a GPU resumes on the CPU and the other way round)."""
    path = run_dir / CHECKPOINT
    try:
        # Only tensors and plain containers: a checkpoint is never allowed to run code.
        state = load_plain_tensors(path, map_location=map_location)
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        raise cannot_resume(path, f"unreadable, truncated or corrupt ({torch_load_reason(e, path)})") from e
    if not isinstance(state, dict):
        raise cannot_resume(path, f"it holds a {type(state).__name__}, not a dict")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise cannot_resume(path, f"missing {', '.join(missing)} (found {listed_names(key_names(state, len(state)))})")
    return state


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Metrics lines; a torn last line (killed mid-write) is ignored."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so nothing is counted twice."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", -1) <= last_step]
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
