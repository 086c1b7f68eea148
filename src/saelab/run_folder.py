"""The run-folder layout: every file name a run folder holds, and how to open one.

A run folder holds everything about one SAE::

    run/
      activations/        on-disk activation cache (quickstart; several SAEs may share one)
      train_config.json   the training and SAE config, and the activation cache trained on (written once
                          validation passed)
      checkpoint.pt       latest training state (resume)
      status.json         state, step, total_steps
      metrics.jsonl       the training log, one JSON line every few steps
      tensorboard/        the same log as TensorBoard event files (--log-to tensorboard)
      wandb/  wandb_run_id  Weights & Biases' local files and the W&B run's id (--log-to wandb)
      sae/                the trained SAE (SAELens folder format)
      metrics.json        the evaluation on held-out text (with the hash of the SAE it describes)
      latent_frequencies.safetensors  each latent's firing frequency in that evaluation (same hash)
      density.png  training_curves.png  report.md
      evals/              the paper suite: <metric>.json, suite.json, report.md and plots; its core metric's
                          latent_frequencies.safetensors (as above, for evals/density.png)
      browser/            the feature browser site

A sweep folder holds run folders side by side (``saelab sweep``). This module sits just above
``saelab.sae``: it knows file names and SAE loading, nothing about training or evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from saelab.errors import CheckpointError, ConfigError, RunExistsError
from saelab.sae.config import (  # below: where saving an SAE refuses a run, and loading names what is no SAE
    CHECKPOINT,
    MADE_FROM_SAES,
    SAE_DIR,
    TRAIN_CONFIG,
    holds_a_run,
    run_folders_in,
)
from saelab.utils.cache_manifest import MANIFEST, holds_an_activation_cache
from saelab.utils.folder_lock import RunFolderBusyError, held_by
from saelab.utils.words import listed_names

if TYPE_CHECKING:
    import torch

ACTIVATIONS_DIR = "activations"
STATUS = "status.json"
TRAINING_LOG = "metrics.jsonl"
EVAL_METRICS = "metrics.json"
DENSITY_PLOT = "density.png"
LATENT_FREQUENCIES = "latent_frequencies.safetensors"
TRAINING_CURVES = "training_curves.png"
REPORT = "report.md"
EVALS_DIR = "evals"
BROWSER_DIR = "browser"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
"""Where W&B keeps a run's local files: ``wandb.init(dir=RUN)`` writes them into RUN/wandb/."""
WANDB_ID_FILE = "wandb_run_id"
"""The W&B run a resumed training logs into (train/metric_sinks.py)."""

EVAL_OUTPUTS = (EVAL_METRICS, LATENT_FREQUENCIES, DENSITY_PLOT, EVALS_DIR)
"""What evaluating a run writes."""

RUN_RESULTS = (TRAIN_CONFIG, CHECKPOINT, STATUS, TRAINING_LOG, TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE, SAE_DIR,
               REPORT, TRAINING_CURVES, BROWSER_DIR, *EVAL_OUTPUTS)
"""Everything that describes a run's SAE: an overwrite replaces all of it together (the activation cache,
which does not depend on the SAE, stays)."""


def is_run(path: str | Path) -> bool:
    """A run folder: a folder with a trained SAE in ``sae/``."""
    path = Path(path)
    return path.is_dir() and (path / SAE_DIR).is_dir()


def sweep_runs(folder: str | Path) -> list[Path]:
    """Run folders with a trained SAE directly inside ``folder``, in natural order (n4096 before n16384).
    Hidden folders are not runs: an overwrite keeps the run it replaces in RUN/.set-aside/."""
    return [p for p in run_folders_in(folder) if (p / TRAIN_CONFIG).exists() and (p / SAE_DIR / "cfg.json").exists()]


def unfinished_sweep_runs(folder: str | Path) -> list[Path]:
    """Run folders directly inside ``folder`` whose training has not finished (no SAE yet), in the order of
    :func:`sweep_runs`: an interrupted sweep leaves them, and they belong in its messages."""
    return [p for p in run_folders_in(folder) if holds_a_run(p) and not (p / SAE_DIR / "cfg.json").exists()]


def unfinished_runs_line(folder: str | Path) -> str | None:
    """The words naming the runs of a folder of runs that have not finished training, or None when all have.
    A run may be one of a sweep or a `saelab train` run in a folder of its own; one being trained is named so."""
    unfinished = unfinished_sweep_runs(folder)
    if not unfinished:
        return None
    holders = [held_by(p) for p in unfinished]
    names = ", ".join(p.name + (f" (being trained by {h})" if h else "") for p, h in zip(unfinished, holders))
    several = len(unfinished) > 1
    line = (f"{'runs' if several else 'run'} {names} {'have' if several else 'has'} not finished training (no "
            f"{SAE_DIR}/ yet)")
    if all(holders):  # running the command again would be refused as a second writer
        return f"{line}; wait for the training to finish"
    again = "run the same `saelab sweep` or `saelab train` command again to finish"
    if any(holders):  # until those finish, the command would be refused for them
        held = [p.name for p, h in zip(unfinished, holders) if h]
        free = [p.name for p, h in zip(unfinished, holders) if not h]
        return f"{line}; wait for {', '.join(held)} to finish training, then {again} {', '.join(free)}"
    return f"{line}; {again} {'them' if several else 'it'}"


def check_sweep_has_finished_runs(folder: str | Path) -> list[Path]:
    """The finished runs of a folder of runs; none yet (an interrupted sweep) is refused in one line naming them."""
    runs = sweep_runs(folder)
    if not runs:
        raise CheckpointError(f"{folder} holds no finished run: its {unfinished_runs_line(folder)}")
    return runs


def listed_paths(paths: list[Path], most: int = 6) -> str:
    """``paths`` as words to paste into a command (quoted where needed); past ``most``, the first ones
    and how many more."""
    shown = shlex.join(str(p) for p in paths[:most])
    return shown if len(paths) <= most else f"{shown} ... ({len(paths) - most} more)"


def is_sweep(path: str | Path) -> bool:
    """A folder that is not a run or SAE folder itself but holds run folders."""
    path = Path(path)
    return (path.is_dir() and not is_run(path) and not (path / "cfg.json").exists() and not holds_a_run(path)
            and bool(sweep_runs(path) or unfinished_sweep_runs(path)))


def open_sae(source: str | Path, *, allow_http: bool = False, several: bool = False):
    """(SAE, run folder or None) for a run folder, a SAELens or sparsify folder, an OpenAI ``.pt`` file,
    an https URL or ``hf://owner/repo/path``; ``allow_http`` also accepts plain http URLs. ``several``: the
    caller takes several SAEs (browse, families), so a sweep folder's refusal lists all its runs to pass."""
    from saelab.sae import load_sae  # lazy: safetensors and the format readers load only when needed

    path = Path(str(source)).expanduser()
    if is_run(path):
        return load_sae(path / SAE_DIR), path
    # a run folder whose SAE is not written yet; an overwrite's first moments hold only the earlier run set aside
    if path.is_dir() and holds_a_run(path):
        holder = held_by(path)
        if holder:  # a training in progress: running it again would be refused as a second writer
            raise RunFolderBusyError(f"{path} is being trained by another process ({holder}) and has no {SAE_DIR}/ "
                                     "yet; wait for the training to finish, then run this command again")
        raise CheckpointError(f"{path}: a run folder whose training has not finished (no {SAE_DIR}/ yet); run "
                              "the same `saelab train` (or sweep) command again to finish it")
    if is_sweep(path):
        runs = check_sweep_has_finished_runs(path)
        if several:
            raise CheckpointError(f"{path} is a sweep folder of {len(runs)} runs, not an SAE: pass its run folders: "
                                  f"{listed_paths(runs)}")
        raise CheckpointError(f"{path} is a sweep folder of {len(runs)} runs; expected one SAE: pass one of its run "
                              f"folders, e.g. {runs[0]}")
    return load_sae(str(source), allow_http=allow_http), None


def sae_sha256(sae) -> str:
    """Hash of an SAE's weights and shape-defining config: evaluation results belong to exactly these."""
    h = hashlib.sha256()
    c = sae.cfg
    h.update(json.dumps([c.d_in, c.n_latents, c.k, c.input_norm, c.hook_name, c.exclude_first]).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def sae_files_key(sae_dir: Path) -> list:
    """What identifies the SAE files of a folder as written: each file's name, inode, size and modification
    time (saving writes each file anew, so a new SAE changes them)."""
    files = sorted(p for p in Path(sae_dir).iterdir() if p.is_file())
    return [[p.name, st.st_ino, st.st_size, st.st_mtime_ns] for p, st in ((p, p.stat()) for p in files)]


class SaeHashes:
    """:func:`sae_sha256` of run folders' SAEs, each kept with :func:`sae_files_key` of its sae/ as read: a
    sweep's evaluation and its scaling study in one process hash each SAE once, and again where sae/ was
    written since (so a stale metrics.json is still told from a current one)."""

    def __init__(self) -> None:
        self._known: dict[Path, tuple[list, str]] = {}

    def load(self, run: Path):
        """(the run's SAE, its hash), read now and kept."""
        from saelab.sae import load_sae  # lazy, as in open_sae

        key = sae_files_key(run / SAE_DIR)  # before the read: a write meanwhile leaves the key stale, never the hash
        sae = load_sae(run / SAE_DIR)
        digest = sae_sha256(sae)
        self._known[run.resolve()] = (key, digest)
        return sae, digest

    def known(self, run: Path) -> str | None:
        """The hash kept for the run while its sae/ holds the files it was read from; else None."""
        kept = self._known.get(run.resolve())
        return kept[1] if kept is not None and kept[0] == sae_files_key(run / SAE_DIR) else None

    def of(self, run: Path) -> str:
        """The run's hash: the one kept, else read now."""
        return self.known(run) or self.load(run)[1]


def read_json_value(path: Path, name: str, advice: str) -> Any:
    """The JSON in ``path``, of any type; a file that cannot be read, is no text or no JSON is refused in one
    line (CheckpointError) naming it as ``name``, with ``advice``: what to do, or what was expected."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{name}: not a text file; {advice}") from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot be read: {e.strerror or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:  # the parser's own words name no file
        raise CheckpointError(f"{name}: not JSON (line {e.lineno}, column {e.colno}); {advice}") from None
    except RecursionError:
        raise CheckpointError(f"{name}: JSON nested too deep to read; {advice}") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file saelab wrote, or a one-line error naming it when it is damaged."""
    data = read_json_value(path, str(path), f"the {what} is damaged: remove it, or run the command that wrote it "
                                            "again with --overwrite")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a JSON object ({what})")
    return data


def read_eval_metrics(run_dir: str | Path, sae=None, *, sae_hash: str | None = None) -> dict[str, Any]:
    """The run's evaluation metrics, or {} when there are none or they describe other SAE weights
    (``sae`` or ``sae_hash`` given: the hash must match the one recorded), so no report shows stale numbers.
    ``sae_hash``: :func:`sae_sha256` of the SAE when the caller has it already (hashing reads every weight)."""
    path = Path(run_dir) / EVAL_METRICS
    if not path.exists():
        return {}
    metrics = read_json(path, "evaluation metrics file")
    if (sae is not None or sae_hash) and metrics.get("sae_sha256") != (sae_hash or sae_sha256(sae)):
        return {}
    return check_eval_metrics(metrics, path)


EVAL_COUNTS = ("n_tokens", "n_predictions")
"""The token counts an evaluation records in metrics.json; reports print them with thousands separators."""
EVAL_NUMBERS = ("nmse", "nmse_sae_input", "l0", "dead_frac", "dense_frac", "ce_clean", "ce_spliced", "delta_ce", "kl",
                "ce_zero_abl", "ce_recovered_zero", "ce_mean_abl", "ce_recovered_mean")
"""The measurements an evaluation records in metrics.json (numbers; null where one was not measured)."""


def check_eval_metrics(metrics: dict[str, Any], path: Path) -> dict[str, Any]:
    """``metrics`` when its counts are non-negative integers and its measurements numbers (each or absent);
    a hand-edited one is refused as the file's other damage is, in one line naming it."""
    for key in [k for k in EVAL_COUNTS + EVAL_NUMBERS if k in metrics]:
        value = metrics[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in EVAL_COUNTS and not (number and isinstance(value, int) and value >= 0):
            expected = "a non-negative integer (a count of tokens)"
        elif key in EVAL_NUMBERS and value is not None and not number:
            expected = "a number"
        else:
            continue
        raise CheckpointError(f"{path}: {key} is {value!r}, expected {expected}; the evaluation metrics file is "
                              "damaged: remove it, or run the command that wrote it again with --overwrite")
    return metrics


@dataclass
class LatentFrequencies:
    """Each latent's firing frequency in one evaluation, and what it measured: ``density.png`` is drawn
    from it, so ``saelab report`` can draw it again without the model."""

    frequencies_N: torch.Tensor
    """Fraction of the evaluation's reconstruction tokens each latent fired on (a float64 tensor)."""
    sae_sha256: str
    """:func:`sae_sha256` of the SAE measured: frequencies of other weights are never drawn as this SAE's."""
    evaluation: dict[str, Any]
    """The evaluation's settings (``saelab.evals.core.eval_settings``: model, corpus, n_tokens, ...), so
    they can be matched with the metrics.json beside them."""


def write_latent_frequencies(folder: str | Path, saved: LatentFrequencies) -> Path:
    """``folder/latent_frequencies.safetensors``, atomically; safetensors, so reading it runs no code."""
    from safetensors.torch import save as save_safetensors  # lazy: as open_sae

    from saelab.utils.atomic import write_bytes

    metadata = {"sae_sha256": saved.sae_sha256, "evaluation": json.dumps(saved.evaluation, sort_keys=True)}
    tensors = {"frequencies": saved.frequencies_N.detach().to("cpu").double().contiguous()}
    path = Path(folder) / LATENT_FREQUENCIES
    write_bytes(path, save_safetensors(tensors, metadata=metadata))
    return path


def read_latent_frequencies(folder: str | Path) -> LatentFrequencies | None:
    """The latent frequencies an evaluation saved in ``folder``; None when there are none (a folder
    evaluated before saelab saved them). A damaged file is a one-line CheckpointError naming it."""
    path = Path(folder) / LATENT_FREQUENCIES
    if not path.exists():
        return None
    try:
        tensors, metadata = _read_safetensors_with_metadata(path)
        saved = LatentFrequencies(tensors["frequencies"], metadata["sae_sha256"], json.loads(metadata["evaluation"]))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a latent-frequencies file saelab wrote ({type(e).__name__}: {e}); "
                              "remove it, or evaluate again with --overwrite") from e
    if (saved.frequencies_N.dim() != 1 or not saved.frequencies_N.is_floating_point()
            or not isinstance(saved.evaluation, dict)):
        raise CheckpointError(f"{path} holds frequencies of shape {tuple(saved.frequencies_N.shape)} "
                              f"({saved.frequencies_N.dtype}) and evaluation {type(saved.evaluation).__name__}; "
                              "expected one float per latent and an object")
    # Fractions of tokens: a NaN or a value past 1 (a damaged file) would break the histogram's range.
    if not ((saved.frequencies_N >= 0) & (saved.frequencies_N <= 1)).all():
        raise CheckpointError(f"{path} holds frequencies outside [0, 1] (or NaN); expected fractions of tokens: "
                              "remove it, or evaluate again with --overwrite")
    return saved


def _read_safetensors_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # lazy: as open_sae

    with safe_open(str(path), framework="pt", device="cpu") as f:  # only the tensor saelab writes
        return {"frequencies": f.get_tensor("frequencies")}, f.metadata() or {}


ARTEFACTS = {"activations": (MANIFEST, "an activation cache"), "run": (TRAIN_CONFIG, "a run folder"),
             "sae": ("cfg.json", "an SAE folder")}
"""Each kind of folder saelab writes: the file that marks it, and its name in messages."""


def holds_artefact(path: Path, kind: str) -> bool:
    """Whether ``path`` may be that kind of ARTEFACTS folder: its marker file is there (any manifest.json counts:
    a folder to write into or read is refused on the safe side), or, for an activation cache, an interrupted
    overwrite left its manifest only in its stage."""
    return (path / ARTEFACTS[kind][0]).is_file() or (kind == "activations" and holds_an_activation_cache(path))


def check_output_folder(path: str | Path, option: str, kind: str | None = None) -> Path:
    """Refuse, before any slow work, an output folder that is a file or cannot be created or written,
    or (given the ``kind`` of ARTEFACTS it will be, or "sweep": a folder of runs) one that is another kind
    of saelab folder; a run's, one that holds anything but a run (:func:`_refuse_a_folder_a_run_would_mix_with`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{option} {path} is a file; expected a folder (new or existing)")
    for other, (marker, what) in ARTEFACTS.items():
        if kind is not None and other != kind and holds_artefact(path, other):
            raise CheckpointError(f"{option} {path} is {what} ({marker}); expected a new folder or "
                                  f"{ARTEFACTS[kind][1] if kind in ARTEFACTS else f'a {kind} folder'}")
    if kind in ("run", "activations"):
        _refuse_a_folder_a_run_would_mix_with(path, option, "a run" if kind == "run" else "a cache")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{option} {path}: {existing} is not a writable folder; expected a place saelab can "
                              "write to")
    return path


NOT_A_RUN = (*MADE_FROM_SAES, (LATENT_FREQUENCIES, "an evaluation's folder"),
             (EVALS_DIR, "a paper-suite evaluation's folder"))
"""The folders saelab writes that hold no run, by the entry that marks each (a run holds some of them too,
beside its train_config.json), and their names in messages. An SAE folder and an activation cache: ARTEFACTS."""


def _refuse_a_folder_a_run_would_mix_with(path: Path, option: str, made: str = "a run") -> None:
    """Refuse, as the output folder of ``made`` (a run, or an activation cache: "a cache"), one that holds results
    but no run: a run written into a sweep folder makes it read as that one run (a cache, as a cache: its runs are
    no longer found, nor resumed); one in a site, an export or an evaluation, or
    beside files a run writes (another tool's metrics.json), mixes or replaces their results. Taken: a new
    folder, a run (to resume, or set aside by --overwrite), a run in its first moments (quickstart harvests into
    RUN/activations/ first), and a folder of the user's other files (the log a shell redirects there, the
    --config file)."""
    if not path.is_dir():
        return
    if holds_a_run(path):  # a run's own folder takes a run (to resume or replace it), never a cache beside it
        if made == "a run":
            return
        raise CheckpointError(f"{option} {path} holds a run ({TRAIN_CONFIG}, or the one an overwrite set aside): "
                              f"{made} there would mix with its files; {_NOT_FOR_A_RUN}")
    if is_sweep(path):
        raise CheckpointError(f"{option} {path} is a sweep folder (a folder of runs): {made} there would hide its "
                              f"runs; {_NOT_FOR_A_RUN}")
    for marker, what in NOT_A_RUN:
        if (path / marker).exists():
            raise CheckpointError(f"{option} {path} is {what} ({marker}{'/' * (path / marker).is_dir()}): {made} "
                                  f"there would mix with its files; {_NOT_FOR_A_RUN}")
    written = [name + "/" * (path / name).is_dir() for name in RUN_RESULTS if (path / name).exists()]
    if written:
        them = "them" if len(written) > 1 else "it"
        raise CheckpointError(f"{option} {path} holds {', '.join(written)}, which a run writes, but no run "
                              f"({TRAIN_CONFIG}): {made} there would mix with or replace {them}; move {them} out or "
                              f"{_NOT_FOR_A_RUN}")


_NOT_FOR_A_RUN = "pick another folder (a new one, or one holding only other files such as a log, is taken)"


def refuse_others_files(folder: Path, own: Callable[[str], bool], what: str, option: str) -> None:
    """Refuse to replace ``folder``, which holds ``what`` (a site, an export: replaced whole), while it also holds
    entries ``own`` does not name as its own: the user's notes, another tool's files would go with it."""
    others = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if not own(p.name))
    if others:
        raise RunExistsError(f"{option} {folder} holds {listed_names(others, 5, bracketed=False)} beside {what}, "
                             "which replacing it would delete; move them out or choose another folder")


def refuse_a_run_file(path: str | Path, named: str) -> None:
    """Refuse, as the file of another result, a name a run writes in a run folder (its metrics.json, report.md) or
    a file in a folder it writes (evals/, browser/, sae/): the run's own next command would replace it, or it the
    run's."""
    path = Path(path).resolve()
    run = next((folder for folder in path.parents if holds_a_run(folder)), None)
    if run is None:
        return
    first = path.relative_to(run).parts[0]
    if first in (*RUN_RESULTS, ACTIVATIONS_DIR):
        written = first if path.parent == run else first + "/"
        raise ConfigError(f"{named} {path}: the run {run} writes its own {written} there; pick another file name")


def model_for(sae, named: Any = None) -> str:
    """The model spec to load for an SAE: the one it was trained with (e.g. 'default' for the offline
    SmolLM2 whose hub id the SAE records), its model_name, or the offline default. An export that names a local
    model folder by its base name alone is refused (:func:`check_model_carried`; ``named``: the SAE as given)."""
    check_model_carried(sae, named)
    return recorded_model(_model_source(sae), sae.cfg.model_name, "the SAE")


LOCAL_MODELS = {"local_folder": "a local model folder", "local_file": "a local model file"}
"""How an export records a model read from this disk (``model_source``): its base name under one of these keys, and
no spec. Its path means nothing on another machine, and its name may name another model on the hub."""


def model_left_behind(sae) -> str | None:
    """Words naming the local model an export records by its base name alone (LOCAL_MODELS), which saelab cannot
    load from the record; None where the SAE records a model it can load, or none."""
    source = _model_source(sae)
    if not isinstance(source, dict) or source.get("spec"):
        return None
    kind = next((key for key in LOCAL_MODELS if isinstance(source.get(key), str)), None)
    return None if kind is None else f"{LOCAL_MODELS[kind]} named {source[kind]!r}"


def check_model_carried(sae, named: Any = None) -> None:
    """Refuse, before any slow work, to find the model of an export trained on a local model (model_left_behind):
    a hub model of that name would be another model. ``named``: the SAE as given, for the message."""
    left = model_left_behind(sae)
    if left is not None:
        raise ConfigError(f"{f'SAE {named}' if named else 'the SAE'} was trained on {left}, which the export does "
                          "not carry; pass its path with --model")


def names_a_model(sae) -> bool:
    """Whether the SAE records the model it reads (else :func:`model_for` falls back to the offline default)."""
    return bool(sae.cfg.model_name or _model_source(sae))


def _model_source(sae) -> Any:
    return sae.cfg.extra.get("model_source") if isinstance(sae.cfg.extra, dict) else None


def check_sae_hook(sae, source: Any) -> None:
    """Refuse an SAE that records no hook (a bare weights file, say): what it reads must be given."""
    if not sae.cfg.hook_name:
        raise ConfigError(f"SAE {source} records no hook; pass the hook it reads (--hook), e.g. --hook "
                          "blocks.8.hook_resid_post for an OpenAI .pt file outside its release layout")


def recorded_model(source: Any, model_name: str | None, what: str) -> str:
    """The model spec an SAE or activation cache records (:func:`recorded_spec`), else (with a warning) the offline
    default."""
    spec = recorded_spec(source, model_name)
    if spec is None:
        print(f"saelab: warning: {what} records no model; using the offline default (--model chooses another)",
              file=sys.stderr)
    return spec or "default"


def recorded_spec(source: Any, model_name: str | None) -> str | None:
    """The model spec of a ``model_source`` record, else ``model_name`` (an export's local model: its base name);
    None where neither names one."""
    if isinstance(source, dict) and source.get("spec"):
        return str(source["spec"])
    return model_name or None


def sae_model(sae) -> str | None:
    """The model spec the SAE records (:func:`recorded_spec`), None where it records none: no warning, as a model
    given instead of its own is compared with it."""
    return recorded_spec(_model_source(sae), sae.cfg.model_name)
