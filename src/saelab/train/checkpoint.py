"""Run folders: config, resumable checkpoints, metrics log, finished-run protection."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from saelab.errors import CheckpointError, RunExistsError
from saelab.run_folder import CHECKPOINT, SAE_DIR, STATUS, TRAIN_CONFIG, TRAINING_LOG, clear_eval_outputs
from saelab.utils.atomic import atomic_path, write_bytes, write_json

METRICS = TRAINING_LOG  # the training log's name, kept for callers of this module


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run folder is damaged") from e


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    write_json(run_dir / STATUS, {"state": state, **extra})


def prepare_run_dir(run_dir: Path, config: dict[str, Any], *, overwrite: bool = False, write: bool = True) -> bool:
    """Create or reopen a run folder. Returns True when there is a checkpoint to resume from.

    A finished run is never overwritten unless ``overwrite``; an unfinished one with the same
    config resumes; one with a different config is refused (it would mix two experiments).
    Only the writing process (rank 0 when data-parallel) changes files.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    status = read_status(run_dir)
    cfg_path = run_dir / TRAIN_CONFIG
    if overwrite and write:
        for name in (CHECKPOINT, STATUS, TRAINING_LOG):
            (run_dir / name).unlink(missing_ok=True)
        clear_eval_outputs(run_dir)  # they describe the SAE being replaced
    elif status.get("state") == "finished":
        raise RunExistsError(
            f"run folder {run_dir} holds a finished run; pick another folder or pass overwrite=True (--overwrite)"
        )
    elif cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise RunExistsError(
                f"run folder {run_dir} holds an unfinished run with a different config (differs in {changed}); "
                "resume it with the same options, pick another folder, or pass overwrite=True"
            )
    if write:
        write_json(cfg_path, config)
    return (run_dir / CHECKPOINT).exists() and not overwrite


CHECKPOINT_KEYS = ("step", "sae", "optimizer", "tokens_since_fired", "normalizer", "ema")


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    # Serialized in memory first: torch.save into a file that cannot grow (full disk) fails with an
    # opaque RuntimeError; writing the bytes raises a plain OSError naming the file, and the previous
    # checkpoint stays in place either way.
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(run_dir / CHECKPOINT, buf.getbuffer())


def cannot_resume(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot resume from {path}: {why}; expected a training checkpoint written by saelab. It was left as "
        "it is: move it away, or pass overwrite=True (--overwrite) to start the run over"
    )


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    try:
        # Only tensors and plain containers: a checkpoint is never allowed to run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        lines = str(e).strip().splitlines()
        detail = lines[0] if lines else ""
        if "weights_only" in detail:  # torch's advice to load with weights_only=False is wrong here
            detail = "not a plain tensor checkpoint (objects other than tensors and containers are refused)"
        raise cannot_resume(path, f"unreadable, truncated or corrupt ({type(e).__name__}: {detail})") from e
    if not isinstance(state, dict):
        raise cannot_resume(path, f"it holds a {type(state).__name__}, not a dict")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise cannot_resume(path, f"missing {', '.join(missing)} (found {sorted(map(str, state))[:8]})")
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
