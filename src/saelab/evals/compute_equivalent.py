"""Compute-equivalent of an SAE's spliced loss (Gao et al. 2024, §4.1), and its training-progress twin.

Splicing an SAE into a model raises its loss. The paper's *compute-equivalent* says how much
pretraining compute a language model would need to reach that raised loss, as a fraction of the
compute of the model the SAE reads: measure the clean loss of a *family* of models of increasing
size and compute (final checkpoints, one training each), fit loss against compute, and read off
where the fitted curve crosses the spliced loss. Two kinds of reference, one fit and inversion
(``compute_equivalent``), pinned in ``tests/test_compute_equivalent.py`` and
``tests/test_compute_equivalent_family.py``:

- ``kind = "model_family"`` (**compute-equivalent**, the paper's definition): members of one
  family (same data, tokenizer and recipe; sizes differ). Member i has ``N_i`` *non-embedding*
  parameters (``saelab.models.lm_series.count_parameters``: everything but the token/position
  embeddings and the unembedding; Kaplan et al. 2020's N, the Pythia paper's "non-embedding
  params") and was trained on ``D_i`` tokens; its compute is ``C_i = 6 N_i D_i`` FLOPs (Kaplan's
  approximation: 2 N multiply-adds forward, twice that backward, per token). Every member is
  fitted (``fit_min_frac`` does not apply). The fraction's denominator is the compute of the
  evaluated model itself: the member it is (matched by hub id or path); when it is none of them,
  the compute at which the fit reaches its clean loss (``reference.how = "clean_loss"``).
- ``kind = "training_progress"`` (**training-progress equivalent**, what saelab computed before
  families existed): checkpoints of ONE training run. Compute is counted in training tokens ``C``
  (one model, so FLOPs = ``6 * params * C`` and fractions of tokens are fractions of FLOPs); the
  fit uses the checkpoints with ``C >= fit_min_frac * C_total`` (default 1 %: after the
  learning-rate warmup of both hub series, whose first steps follow no power law; ``C = 0`` cannot
  enter one at all); the denominator is ``C_total``, the tokens of the series' full run (400k
  steps for CRFM GPT-2, 143k for Pythia), whichever checkpoints were measured. It answers "how far
  into its own training did the model have this loss", which is not the paper's question: a
  model stopped early is not a compute-optimal smaller model.

Shared definitions:

- **Losses** are mean next-token cross-entropies (nats) on the same predictions for every model:
  packed eval contexts, and when the SAE leaves out position 0 the prediction made at position 0
  is left out too (``saelab.evals.downstream``). The spliced loss replaces the hook activation by
  the SAE reconstruction at positions >= 1 (same convention). Every reference model must share the
  evaluated model's tokenizer (checked).
- **Fit** (``fit="power"``, the default): ``L(C) = a * C^(-b) + c`` with an irreducible loss
  ``c``, fitted in log space with ``saelab.evals.power_law``. Inverted: ``C* = (a / (L - c))^(1/b)``;
  unreachable (infinite compute) when ``L <= c``. A model-free check is always reported beside it
  (``fit="interp"`` makes it the headline): piecewise-linear interpolation of ``log C`` against
  loss between measured points (on the running minimum of the losses, so it is monotone); it
  cannot say anything outside the measured range, the power law can extrapolate (flagged).
- **Fraction** = ``C* / C_ref`` (``reference_compute``). ``clean_fraction`` places the evaluated
  model's clean loss on the same curve (about 1 when the model is the reference: the fit's error
  at that point); ``fraction_relative = C*(spliced) / C*(clean)`` corrects for a model that is
  not exactly on the curve (OpenAI's GPT-2 against the CRFM re-training, say).
- **Extrapolation**: ``extrapolated`` is true when the headline's compute lies outside the compute
  of the fitted points: ``"beyond_last"`` (C* above the best checkpoint's or largest member's
  compute: the fraction may exceed 1), ``"before_first"`` (below the first one fitted) or
  ``"unreachable"`` (spliced loss at or below the irreducible loss c; fraction None). The power
  law's C* is compared with the compute, not the spliced loss with the measured losses: a model
  below the fitted curve puts C* past its compute for a spliced loss between its measured and
  fitted loss. (The interpolation exists exactly between the measured losses.)
- **Below the fit's error**: ``below_fit_error`` is true when the spliced loss is worse than the
  clean loss yet the fraction is >= 1: the model lies below the fitted curve by more than the SAE
  raised its loss, so the fraction says where the fit is off, not what the SAE costs;
  ``fraction_relative`` (< 1) places both losses on the same curve.
- **Interval** (``intervals``): every loss is a mean over the same sampled eval contexts, so
  ``fraction``, ``clean_fraction`` and ``fraction_relative`` get a 95 % paired bootstrap interval over
  the documents the contexts were drawn from (each context alone when they are not known), as the
  other metrics' (``saelab.evals.bootstrap``): 1,000 draws of the documents with replacement; in each,
  the spliced, clean and every reference model's loss is recomputed from the drawn documents'
  per-document sums, the curve refitted as the headline's (``_fit_series``: the same power law, checks
  and fitted models; the interpolation too) and both losses placed on it; the interval is the 2.5 and
  97.5 percentiles of the draws. What stays fixed: the reference models and the SAE. A draw is placed
  as the headline is (``interval_draws`` counts where: ``inside``, ``beyond_last``, ``before_first``,
  ``unreachable``, ``failed``): an extrapolated power-law draw counts with the compute the law gives
  it; an unreachable one (spliced loss at or below its floor c) at infinite compute, so an upper bound
  that falls among them is None (unbounded; reports show ∞) and ``n_infinite`` counts them; the
  interpolation puts a loss outside the measured ones at 0 or infinite compute, the end it lies beyond;
  a draw whose refit fails (its curve does not fall) is left out (``n_undefined``). A refit takes ~7 ms
  (the floor grid's starts computed for all draws at once, ``floor_grid_starts``): 1,000 draws add
  ~7 s, against a forward of every reference model.

References (``resolve_series``; the CLI's ``--series``):

- families: ``pythia-family`` (EleutherAI's Pythia suite, final checkpoints = branch
  ``step143000`` = ``main``; sizes 14m 31m 70m 160m 410m 1b 1.4b by default, ``pythia-family:70m,160m,...``
  to choose, ``pythia-family-deduped`` for the deduplicated Pile; every size saw 143,000 steps of
  1,024 x 2,048 = 299,892,736,000 tokens), or a folder with ``family.json`` (``local_family``,
  written by ``saelab.models.lm_series.train_model_family``);
- checkpoint series: ``crfm-gpt2-small`` (Stanford CRFM's GPT-2 small re-training
  ``stanford-crfm/alias-gpt2-small-x21``; ``crfm-gpt2-small-x49`` etc. for its other seeds),
  ``pythia-70m`` (``EleutherAI/pythia-70m``, any Pythia size, ``-deduped`` too), or a folder with
  ``series.json`` or trainer states (``local_series``).

``series_for_model`` gives a model's default: the Pythia family for Pythia models (the paper's
definition), ``crfm-gpt2-small`` for GPT-2 small (no public GPT-2 family with known training
tokens, so only the training-progress equivalent is built in there).

Result schema (``run_compute_equivalent`` / ``compute_equivalent`` return a JSON-serializable dict)::

    metric              "compute_equivalent"
    kind                "model_family" | "training_progress"
    compute_unit        "FLOPs" (6 N D) | "tokens"
    series              {name, kind, source, total_tokens (training_progress; None for a family),
                         tokens_per_step, description, params ("non_embedding", families)}
    checkpoints         [{label, tokens, params (families: non-embedding N), compute, loss, used_in_fit,
                          fitted_loss (None if not fitted), source}]   (ordered by compute)
    fit                 {form, method ("power" | "interp": the one behind `fraction`), a, b, c,
                         b_se, c_se, rmse_log, n_points, min_compute}
    spliced_loss, clean_loss, n_predictions
    compute_equivalent  C* from the power law, in compute_unit (None when unreachable)
    compute_equivalent_interp             C* by interpolation (None outside the measured range)
    reference_compute   C_ref, the fraction's denominator
    reference           {how: "series_total" | "member" | "clean_loss", label}
    fraction            C* / C_ref from `fit.method`
    fraction_power, fraction_interp       both estimates
    clean_compute_equivalent, clean_fraction, fraction_relative
    extrapolated, extrapolation           see above
    below_fit_error                       see above (absent from results written before it existed)
    intervals           {fraction, clean_fraction, fraction_relative}: each {estimate, low, high, level, n_boot,
                        n_groups, n_undefined, n_infinite} (see Interval; the clean ones with a clean loss);
                        {} when there is none (interval_note says why)
    interval_draws      {inside, beyond_last, before_first, unreachable, failed}: where the draws' compute lay
    interval_groups     what the interval resamples: "documents" (the contexts' documents given) or "contexts"
    interval_method     how the interval was made (INTERVAL_METHOD; an earlier saelab's result records none)
    interval_note       None, or why there is no interval (reference losses cached before the per-context
                        sums were kept: remove the cache file to measure them again)
    checkpoint_s, wall_s                  wall time of the reference losses, of everything

Results written before families existed (no ``kind``; ``tokens_equivalent``,
``clean_tokens_equivalent``, ``fit.min_tokens``) are read through ``upgrade_result``; results written
before the interval existed have no ``intervals`` and the ``interval_*`` keys, and are read as they are
(reports print no interval and say why; the paper suite computes such a result again rather than reuse it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from saelab.errors import SaelabError, ShapeMismatchError
from saelab.evals._common import check_tokens, config_dict, first_position, json_float
from saelab.evals.bootstrap import (bounded_groups, by_document, check_documents, format_interval, percentile_interval,
                                    resample_counts, resampled_documents)
from saelab.evals.config import (CRFM_DEFAULT_STEPS, CRFM_RUNS, CRFM_TOKENS_PER_STEP, CRFM_TOTAL_STEPS, DEFAULT_LEVEL,
                                 DEFAULT_N_BOOT, PYTHIA_DEFAULT_STEPS, PYTHIA_FAMILY_SIZES, PYTHIA_SIZES,
                                 PYTHIA_TOKENS_PER_STEP, PYTHIA_TOTAL_STEPS, PYTHIA_TOTAL_TOKENS,
                                 ComputeEquivalentConfig, check_bootstrap_args, known_series_names)
from saelab.evals.power_law import FitError, fit_power_law, floor_grid_starts
from saelab.models.lm import check_token_ids
from saelab.models.lm_series import FAMILY_FILE, count_parameters
from saelab.models.loading import (check_before_load, check_context_fits, configured_vocab_size, dtype_name,
                                   library_bars, same_model, tokenizer_before_load)
from saelab.utils.atomic import write_json

DType = torch.dtype | str


class SeriesError(SaelabError, ValueError):
    """A checkpoint series or model family that is unknown, unreadable, too short or does not decrease."""


KIND_PROGRESS = "training_progress"
"""One model's checkpoints: the training-progress equivalent (compute counted in tokens)."""
KIND_FAMILY = "model_family"
"""Final models of increasing size: the paper's compute-equivalent (compute = 6 N D FLOPs)."""
KINDS = (KIND_FAMILY, KIND_PROGRESS)
KIND_TITLES = {KIND_FAMILY: "compute-equivalent", KIND_PROGRESS: "training-progress equivalent"}
COMPUTE_UNITS = {KIND_FAMILY: "FLOPs", KIND_PROGRESS: "tokens"}


# ---- reference models: checkpoint series and model families -------------------------------------
@dataclass
class SeriesCheckpoint:
    """One reference model: a checkpoint of a series, or a member of a family."""

    label: str
    """Name shown in tables ('checkpoint-1000', 'step1000', 'pythia-70m', a folder name)."""
    tokens: int
    """Training tokens the model had seen (D)."""
    load: Callable[[], Any] = field(repr=False)
    """Loads it as a saelab LanguageModel."""
    source: str = ""
    """Where it comes from ('hub:ID@REVISION' or a path)."""
    params: int | None = None
    """Non-embedding parameters N (families); None = counted after loading."""
    model_id: str = ""
    """What it is loaded from (hub id or absolute path): tells a family which member is the evaluated model,
    and the checks before its load what to read."""
    revision: str | None = None
    """The hub revision ``model_id`` is loaded at ('checkpoint-1000'); None: its main branch, or a path."""


@dataclass
class CheckpointSeries:
    """The reference of a compute-equivalent: one model's checkpoints or a family's final models (``kind``)."""

    name: str
    checkpoints: list[SeriesCheckpoint]
    total_tokens: int | None
    """Tokens of the full training run (training_progress: the denominator of the fraction); None for a family."""
    tokens_per_step: int | None = None
    description: str = ""
    source: str = ""
    kind: str = KIND_PROGRESS
    """``training_progress`` (one run's checkpoints) or ``model_family`` (final models of increasing size)."""
    dtype: str = "float32"
    """The dtype its models are loaded in: the evaluated model's, whose spliced loss is set against theirs."""

    def info(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "source": self.source, "total_tokens": self.total_tokens,
               "tokens_per_step": self.tokens_per_step, "description": self.description}
        return (out | ({"params": "non_embedding"} if self.kind == KIND_FAMILY else {})
                | ({"dtype": self.dtype} if self.dtype != "float32" else {}))  # float32: as recorded before


def _hub_loader(repo: str, revision: str | None, device: str | torch.device, dtype: DType) -> Callable[[], Any]:
    def load():
        from saelab.models import load_model

        return load_model(repo, device=device, dtype=dtype, revision=revision)
    return load


def _path_loader(path: Path, device: str | torch.device, dtype: DType) -> Callable[[], Any]:
    def load():
        from saelab.models import load_model

        return load_model(str(path), device=device, dtype=dtype)
    return load


def crfm_checkpoint_steps() -> list[int]:
    """Every step with a published CRFM GPT-2 small checkpoint."""
    steps = {0}
    for every, until, start in ((10, 100, 10), (50, 2000, 150), (100, 20_000, 2100), (1000, 400_000, 21_000)):
        steps.update(range(start, until + 1, every))
    return sorted(steps)


def pythia_checkpoint_steps() -> list[int]:
    """Every step with a published Pythia checkpoint (154 of them)."""
    return [0] + [2 ** i for i in range(10)] + list(range(1000, PYTHIA_TOTAL_STEPS + 1, 1000))


def _check_steps(steps: Sequence[int], allowed: list[int], series: str) -> list[int]:
    ok = set(allowed)
    bad = [s for s in steps if int(s) not in ok]
    if bad:
        raise SeriesError(f"series {series!r} has no checkpoint at step(s) {bad}; published steps are "
                          f"{allowed[:12]} ... {allowed[-3:]}")
    return sorted({int(s) for s in steps})


def crfm_gpt2_small_series(steps: Sequence[int] = CRFM_DEFAULT_STEPS, seed: int = 21,
                           device: str | torch.device = "cpu", dtype: DType = torch.float32) -> CheckpointSeries:
    """Stanford CRFM's GPT-2 small trained with ``seed`` (21 'alias', 49, 81, 343, 777), at ``steps``."""
    if seed not in CRFM_RUNS:
        raise SeriesError(f"no CRFM GPT-2 small run with seed {seed}; known seeds: {sorted(CRFM_RUNS)}")
    name = "crfm-gpt2-small" + ("" if seed == 21 else f"-x{seed}")
    repo = f"stanford-crfm/{CRFM_RUNS[seed]}-gpt2-small-x{seed}"
    steps = _check_steps(steps or CRFM_DEFAULT_STEPS, crfm_checkpoint_steps(), name)
    cks = [SeriesCheckpoint(f"checkpoint-{s}", s * CRFM_TOKENS_PER_STEP, _hub_loader(repo, f"checkpoint-{s}", device, dtype),
                            f"hub:{repo}@checkpoint-{s}", model_id=repo, revision=f"checkpoint-{s}") for s in steps]
    return CheckpointSeries(name, cks, CRFM_TOTAL_STEPS * CRFM_TOKENS_PER_STEP, CRFM_TOKENS_PER_STEP,
                            "GPT-2 small re-trained on OpenWebText by Stanford CRFM (Mistral)", f"hub:{repo}",
                            dtype=dtype_name(dtype))


def pythia_series(size: str = "70m", steps: Sequence[int] = PYTHIA_DEFAULT_STEPS, deduped: bool = False,
                  device: str | torch.device = "cpu", dtype: DType = torch.float32) -> CheckpointSeries:
    """EleutherAI's Pythia of ``size`` (``70m`` ...), at ``steps``."""
    if size not in PYTHIA_SIZES:
        raise SeriesError(f"no Pythia of size {size!r}; known sizes: {', '.join(PYTHIA_SIZES)}")
    name = f"pythia-{size}" + ("-deduped" if deduped else "")
    repo = f"EleutherAI/{name}"
    steps = _check_steps(steps or PYTHIA_DEFAULT_STEPS, pythia_checkpoint_steps(), name)
    cks = [SeriesCheckpoint(f"step{s}", s * PYTHIA_TOKENS_PER_STEP, _hub_loader(repo, f"step{s}", device, dtype),
                            f"hub:{repo}@step{s}", model_id=repo, revision=f"step{s}") for s in steps]
    return CheckpointSeries(name, cks, PYTHIA_TOTAL_STEPS * PYTHIA_TOKENS_PER_STEP, PYTHIA_TOKENS_PER_STEP,
                            f"Pythia-{size}{' (deduplicated Pile)' if deduped else ''} by EleutherAI", f"hub:{repo}",
                            dtype=dtype_name(dtype))


def pythia_family(sizes: Sequence[str] = (), deduped: bool = False, device: str | torch.device = "cpu",
                  local_root: str | Path | None = None, dtype: DType = torch.float32) -> CheckpointSeries:
    """EleutherAI's Pythia suite as a model family: the final checkpoint (``step143000``) of each size.

    Every size was trained on the same 299,892,736,000 tokens; N (non-embedding) is counted after
    loading. ``local_root``: a folder holding copies as ``<root>/pythia-<size>[-deduped]/``
    (anything ``load_model`` reads), loaded instead of the hub.
    """
    sizes = list(sizes or PYTHIA_FAMILY_SIZES)
    bad = [s for s in sizes if s not in PYTHIA_SIZES]
    if bad:
        raise SeriesError(f"no Pythia of size(s) {bad} in the Pythia family (--series); known sizes: "
                          f"{', '.join(PYTHIA_SIZES)}")
    sizes = sorted(set(sizes), key=PYTHIA_SIZES.index)
    suffix = "-deduped" if deduped else ""
    cks = []
    for size in sizes:
        label = f"pythia-{size}{suffix}"
        repo = f"EleutherAI/{label}"
        revision = f"step{PYTHIA_TOTAL_STEPS}" if local_root is None else None
        if local_root is None:
            load, source, model_id = _hub_loader(repo, revision, device, dtype), f"hub:{repo}@{revision}", repo
        else:
            path = (Path(local_root).expanduser() / label).resolve()
            load, source, model_id = _path_loader(path, device, dtype), str(path), str(path)
        cks.append(SeriesCheckpoint(label, PYTHIA_TOTAL_TOKENS, load, source, model_id=model_id, revision=revision))
    return CheckpointSeries(f"pythia-family{suffix}", cks, None, PYTHIA_TOKENS_PER_STEP,
                            f"Pythia suite by EleutherAI{' (deduplicated Pile)' if deduped else ''}, final checkpoints "
                            f"of {', '.join(sizes)}", "hub:EleutherAI" if local_root is None else str(local_root),
                            kind=KIND_FAMILY, dtype=dtype_name(dtype))


_STEP_RE = re.compile(r"(?:checkpoint|step|global_step)[-_]?(\d+)$")


def _listed_checkpoints(meta: dict, meta_path: Path, folder: Path, tps) -> list[tuple[str, int, Path]]:
    """(label, tokens, path) of the checkpoints series.json lists."""
    entries = []
    for i, item in enumerate(meta["checkpoints"]):
        path = folder / str(item.get("path", ""))
        if "tokens" in item:
            tokens = int(item["tokens"])
        elif "step" in item and tps:
            tokens = int(item["step"]) * int(tps)
        else:
            raise SeriesError(f"{meta_path}: checkpoints[{i}] needs 'tokens' (or 'step' with a top-level "
                              "'tokens_per_step')")
        if not path.is_dir():
            raise SeriesError(f"{meta_path}: checkpoints[{i}] path {str(path)!r} is not a folder")
        entries.append((path.name, tokens, path))
    return entries


def _trainer_checkpoints(folder: Path, meta_path: Path, tps) -> list[tuple[str, int, Path]]:
    """(label, tokens, path) of the subfolders with a Hugging Face trainer_state.json."""
    entries = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        state_path = sub / "trainer_state.json"
        if not state_path.exists():
            continue
        state = json.loads(state_path.read_text())
        if state.get("num_input_tokens_seen"):
            tokens = int(state["num_input_tokens_seen"])
        elif "global_step" in state and tps:
            tokens = int(state["global_step"]) * int(tps)
        else:
            raise SeriesError(f"{state_path}: has no num_input_tokens_seen; put 'tokens_per_step' in "
                              f"{meta_path} to count global_step in tokens")
        entries.append((sub.name, tokens, sub))
    if not entries:
        raise SeriesError(f"checkpoint series folder {folder}: no series.json and no subfolder with a "
                          "trainer_state.json; expected checkpoint folders and a mapping to training tokens")
    return entries


def local_series(folder: str | Path, device: str | torch.device = "cpu",
                 dtype: DType = torch.float32) -> CheckpointSeries:
    """A folder of checkpoint folders (each loadable by ``load_model``) with a mapping to tokens.

    The mapping is ``series.json`` in the folder: ``{"checkpoints": [{"path": "checkpoint-100",
    "tokens": 12800}, ...], "total_tokens": ...}`` (``tokens`` may instead be given as ``step`` with
    a top-level ``tokens_per_step``; ``total_tokens`` defaults to the last checkpoint's). Without
    ``series.json``, each subfolder's ``trainer_state.json`` (Hugging Face Trainer) gives its
    ``num_input_tokens_seen``, or its ``global_step`` times a ``tokens_per_step`` that then must be
    in ``series.json``. ``saelab.models.lm_series.train_checkpoint_series`` writes such a folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SeriesError(f"checkpoint series {str(folder)!r}: no such folder (and not a known series name: "
                          f"{', '.join(known_series_names())})")
    meta_path = folder / "series.json"
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise SeriesError(f"{meta_path}: not valid JSON ({e})") from e
    tps = meta.get("tokens_per_step")
    entries = _listed_checkpoints(meta, meta_path, folder, tps) if "checkpoints" in meta else \
        _trainer_checkpoints(folder, meta_path, tps)
    entries.sort(key=lambda e: e[1])

    cks = [SeriesCheckpoint(label, tokens, _path_loader(path, device, dtype), str(path), model_id=str(path.resolve()))
           for label, tokens, path in entries]
    total = int(meta.get("total_tokens") or max(c.tokens for c in cks))
    return CheckpointSeries(str(meta.get("name") or folder.name), cks, total, int(tps) if tps else None,
                            f"local checkpoint series in {folder}", str(folder), dtype=dtype_name(dtype))


def local_family(folder: str | Path, device: str | torch.device = "cpu",
                 dtype: DType = torch.float32) -> CheckpointSeries:
    """A model family from ``folder/family.json`` (``saelab.models.lm_series`` documents the format).

    Each member needs ``path`` (relative to the folder, or absolute: a folder ``load_model`` reads)
    and ``tokens`` (D); ``params`` (non-embedding N) is counted after loading when absent.
    """
    folder = Path(folder).expanduser()
    meta_path = folder / FAMILY_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SeriesError(f"model family {str(folder)!r}: cannot read {FAMILY_FILE} ({e})") from e
    members = meta.get("members")
    if not isinstance(members, list) or not members:
        raise SeriesError(f"{meta_path}: expected a non-empty 'members' list of {{path, tokens, params?}}")
    cks = []
    for i, item in enumerate(members):
        if not isinstance(item, dict) or "path" not in item or "tokens" not in item:
            raise SeriesError(f"{meta_path}: members[{i}] needs 'path' and 'tokens' (training tokens D)")
        path = (folder / str(item["path"])).resolve()
        if not path.is_dir():
            raise SeriesError(f"{meta_path}: members[{i}] path {str(path)!r} is not a folder")
        params = int(item["params"]) if item.get("params") is not None else None
        cks.append(SeriesCheckpoint(path.name, int(item["tokens"]), _path_loader(path, device, dtype), str(path), params,
                                    str(path)))
    return CheckpointSeries(str(meta.get("name") or folder.name), cks, None, None,
                            f"local model family in {folder}", str(folder), kind=KIND_FAMILY,
                            dtype=dtype_name(dtype))


_CRFM_RE = re.compile(r"^crfm-gpt2-small(?:-x(\d+))?$")
_PYTHIA_RE = re.compile(r"^pythia-([0-9.]+[mb])(-deduped)?$")
_PYTHIA_FAMILY_RE = re.compile(r"^pythia-family(-deduped)?(?::(.*))?$")


def resolve_series(spec: str, steps: Sequence[int] = (), device: str | torch.device = "cpu",
                   dtype: DType = torch.float32) -> CheckpointSeries:
    """A reference by name (``pythia-family[-deduped][:SIZES]``, ``crfm-gpt2-small``, ``pythia-70m``, see
    ``known_series_names``) or folder path (``family.json``: a family; else a checkpoint series), its models
    loaded on ``device`` in ``dtype`` (the evaluated model's: its spliced loss is set against theirs)."""
    if not isinstance(spec, str) or not spec:
        raise SeriesError(f"checkpoint series must be a name or a folder, got {spec!r}")
    m = _PYTHIA_FAMILY_RE.match(spec)
    path = Path(spec).expanduser()
    is_family = m is not None or (path / FAMILY_FILE).is_file()
    if is_family and steps:
        raise SeriesError(f"--series-steps apply to a checkpoint series, not to the model family {spec!r}")
    if m:
        sizes = [x.strip() for x in (m.group(2) or "").split(",") if x.strip()]
        if m.group(2) is not None and not sizes:
            raise SeriesError(f"model family {spec!r} (--series): expected sizes after ':', "
                              "e.g. pythia-family:70m,160m")
        return pythia_family(sizes, deduped=bool(m.group(1)), device=device, dtype=dtype)
    m = _CRFM_RE.match(spec)
    if m:
        return crfm_gpt2_small_series(steps, seed=int(m.group(1) or 21), device=device, dtype=dtype)
    m = _PYTHIA_RE.match(spec)
    if m:
        return pythia_series(m.group(1), steps, deduped=bool(m.group(2)), device=device, dtype=dtype)
    if is_family:
        return local_family(path, device=device, dtype=dtype)
    if path.exists() or "/" in spec or spec.startswith("."):
        if steps:
            raise SeriesError(f"series steps apply to the hub series, not to the local folder {spec!r}")
        return local_series(path, device=device, dtype=dtype)
    raise SeriesError(f"unknown checkpoint series {spec!r} (--series): expected a model family (pythia-family"
                      f"[-deduped][:SIZES] or a folder with {FAMILY_FILE}), a checkpoint series "
                      f"({', '.join(known_series_names()[:1])}, pythia-<size>[-deduped]) or a folder of checkpoints")


_PYTHIA_MODEL_RE = re.compile(r"^(?:EleutherAI/)?(pythia-[0-9.]+[mb](?:-deduped)?)$")


def series_for_model(model_name: str, kind: str | None = None) -> str | None:
    """The built-in reference of a model id, of ``kind`` (None: the default, a family where one exists).

    EleutherAI/pythia-X -> ``pythia-family`` (with X among its sizes) or, as training progress,
    ``pythia-X``; GPT-2 small -> ``crfm-gpt2-small`` (training progress only).
    """
    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if model_name in ("gpt2", "openai-community/gpt2"):
        return "crfm-gpt2-small" if kind != KIND_FAMILY else None
    m = _PYTHIA_MODEL_RE.match(model_name or "")
    if not m:
        return None
    size, deduped = _PYTHIA_RE.match(m.group(1)).groups()
    if size not in PYTHIA_SIZES:
        return None
    if kind == KIND_PROGRESS:
        return m.group(1)
    family = "pythia-family" + (deduped or "")
    return family if size in PYTHIA_FAMILY_SIZES else f"{family}:{','.join(PYTHIA_FAMILY_SIZES + (size,))}"


# ---- losses -----------------------------------------------------------------------------------
@torch.no_grad()
def mean_loss(lm, tokens_NT: torch.Tensor, first: int, edits=None, lm_batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token CE (nats) of predictions at positions first..T-2, and their count."""
    return loss_sums(lm, tokens_NT, first, edits, lm_batch_size)[:2]


@torch.no_grad()
def loss_sums(lm, tokens_NT: torch.Tensor, first: int, edits=None,
              lm_batch_size: int = 8) -> tuple[float, int, torch.Tensor]:
    """:func:`mean_loss`'s mean and count, and each context's summed CE ``[N]`` float64 (what the interval
    resamples)."""
    from saelab.evals.downstream import ce_and_kl, check_predictions

    check_predictions(tokens_NT, first, "tokens_NT")
    total, count, per_context = 0.0, 0, []
    for i in range(0, tokens_NT.shape[0], lm_batch_size):
        toks = tokens_NT[i:i + lm_batch_size]
        ce, _, _ = ce_and_kl(lm.logits(toks, edits=edits), None, toks.to(lm.device), first)
        total += float(ce.double().sum())  # the mean summed as before, so that it keeps its bits
        count += ce.numel()
        per_context.append(ce.double().reshape(toks.shape[0], -1).sum(1).cpu())
    return total / count, count, torch.cat(per_context)


def _tokens_key(tokens_NT: torch.Tensor, first: int, dtype: str = "float32") -> str:
    """What the cached losses were measured on: the tokens, the first position and (other than float32, so
    earlier caches stay valid) the dtype the models ran in."""
    h = hashlib.sha256(tokens_NT.cpu().numpy().astype(np.int64).tobytes())
    h.update(f"|{first}|{tuple(tokens_NT.shape)}".encode())
    if dtype != "float32":
        h.update(f"|{dtype}".encode())
    return h.hexdigest()[:16]


def _check_tokenizer(ckpt, reference_tokenizer, tokens_NT: torch.Tensor, label: str) -> None:
    _check_vocab_size(ckpt.vocab_size, tokens_NT, label)
    _check_same_tokenizer(ckpt.tokenizer, reference_tokenizer, tokens_NT, label)


def _check_vocab_size(vocab_size: int | None, tokens_NT: torch.Tensor, label: str) -> None:
    """Refuse eval token ids past a reference model's vocabulary (None: not known yet, checked after its load):
    check_token_ids' refusal, as the series' error, with what the reference models must share."""
    try:
        check_token_ids(tokens_NT, vocab_size, "the checkpoint", f"checkpoint {label}: the eval tokens")
    except ShapeMismatchError as e:
        raise SeriesError(f"{e}; expected reference models that share the evaluated model's tokenizer") from None


def _check_same_tokenizer(tokenizer, reference_tokenizer, tokens_NT: torch.Tensor, label: str) -> None:
    if reference_tokenizer is None:
        return
    probe = reference_tokenizer.decode(tokens_NT[0, 1:].tolist())
    ours = reference_tokenizer(probe, add_special_tokens=False)["input_ids"]
    theirs = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if list(ours) != list(theirs):
        raise SeriesError(f"checkpoint {label} tokenizes the eval text differently from the evaluated model; "
                          "expected reference models that share its tokenizer")


EVAL_CONTEXT = "the eval context of {n} tokens"
"""How a reference model's refusal of the eval contexts' length names them where no setting gave it."""


def check_checkpoints_before_load(checkpoints: Sequence[SeriesCheckpoint], tokens_NT: torch.Tensor,
                                  reference_tokenizer=None, *, context_named: str = EVAL_CONTEXT) -> None:
    """Refuse eval contexts that reference models cannot read, from each one's config and tokenizer alone (a
    hub model's fetched at its revision, as its load takes them): longer than it takes, with ids past its
    vocabulary, or text it tokenizes otherwise than ``reference_tokenizer`` (the evaluated model's); so a wrong
    series is named before any of their weights download. Each refusal names its checkpoint; ``context_named``
    names the contexts' length ({n}) by where it came from (a setting, the SAE's); the check after the load,
    which does not know, says the eval context."""
    T = int(tokens_NT.shape[1])
    for ck in checkpoints:
        if not ck.model_id:  # a reference given only by its loader: checked once loaded
            continue
        check_before_load(ck.model_id, None, revision=ck.revision)  # no hook: nothing spliced in; fetches its config
        check_context_fits(ck.model_id, T, f"checkpoint {ck.label}: {context_named}", ck.revision)
        _check_vocab_size(configured_vocab_size(ck.model_id, ck.revision), tokens_NT, ck.label)  # from that config
        if reference_tokenizer is None:  # nothing to compare its tokenizer with: not fetched
            continue
        tokenizer = tokenizer_before_load(ck.model_id, ck.revision)
        if tokenizer is not None:  # else it comes with the load, and is checked then
            _check_same_tokenizer(tokenizer, reference_tokenizer, tokens_NT, ck.label)


def point_compute(kind: str, tokens: int, params: int | None) -> float:
    """The compute axis of one reference model: tokens (training progress) or 6 N D FLOPs (family)."""
    if kind == KIND_PROGRESS:
        return tokens
    if params is None:
        raise SeriesError(f"a model-family member trained on {tokens:,} tokens has no parameter count")
    return 6.0 * params * tokens


def _to_load(ck: SeriesCheckpoint, cache: dict[str, Any], family: bool) -> bool:
    """Whether ``ck`` must be loaded: the cache lacks its loss, or (a family member of unknown N) its parameter
    count."""
    hit = cache.get(ck.source)
    return hit is None or (family and ck.params is None and hit.get("params") is None)


def _cached_losses(cache_path: str | Path | None, key: str) -> dict[str, Any]:
    """The losses ``cache_path`` holds for the tokens of ``key`` (``_tokens_key``): {} when it holds another
    evaluation's, or none, or is unreadable (they are measured again)."""
    try:
        old = json.loads(Path(cache_path).read_text()) if cache_path is not None else {}
    except (OSError, ValueError):
        return {}
    losses = old.get("losses") if isinstance(old, dict) and old.get("tokens_key") == key else None
    return losses if isinstance(losses, dict) else {}


def _checkpoints_to_load(series: CheckpointSeries, cache: dict[str, Any]) -> list[SeriesCheckpoint]:
    return [ck for ck in series.checkpoints if _to_load(ck, cache, series.kind == KIND_FAMILY)]


def checkpoints_to_load(series: CheckpointSeries, tokens_NT: torch.Tensor, first: int,
                        cache_path: str | Path | None = None) -> list[SeriesCheckpoint]:
    """The models of ``series`` that :func:`checkpoint_losses` (with these arguments) loads: those whose loss
    on ``tokens_NT`` ``cache_path`` lacks."""
    key = _tokens_key(check_tokens(tokens_NT), first, series.dtype)
    return _checkpoints_to_load(series, _cached_losses(cache_path, key))


def checkpoint_losses(series: CheckpointSeries, tokens_NT: torch.Tensor, first: int, *, lm_batch_size: int = 8,
                      cache_path: str | Path | None = None, reference_tokenizer=None,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Clean loss of every model of ``series`` on ``tokens_NT`` (predictions from ``first``), with its compute
    and ``context_losses``, each context's summed loss (for the interval; None from an older cache).

    Family members whose N is not given have it counted (non-embedding) when loaded. With
    ``cache_path`` each loss (and count, and the per-context sums) is saved (atomically) as soon as it is known
    and reused by a later call on the same tokens: an interrupted run over hub models resumes where it stopped.
    A cache written before the per-context sums were kept is read as it is (no model is loaded again for them).
    ``progress``: a bar over the models, and the libraries' bars of each load (hidden without it).
    """
    from tqdm.auto import tqdm

    tokens_NT = check_tokens(tokens_NT)
    key = _tokens_key(tokens_NT, first, series.dtype)
    family = series.kind == KIND_FAMILY
    cache = _cached_losses(cache_path, key)
    # before any of their weights download
    check_checkpoints_before_load(_checkpoints_to_load(series, cache), tokens_NT, reference_tokenizer)
    out = []
    for ck in tqdm(series.checkpoints, desc=f"series {series.name}", unit="model", disable=not progress):
        hit = cache.get(ck.source)
        if _to_load(ck, cache, family):
            with library_bars(progress):  # a loader of the caller's own included
                lm = ck.load()
            # its config may not have been at hand before the load
            lm.check_context_size(int(tokens_NT.shape[1]), f"checkpoint {ck.label}: {EVAL_CONTEXT}")
            _check_tokenizer(lm, reference_tokenizer, tokens_NT, ck.label)
            t0 = time.perf_counter()
            loss, n, per_context = loss_sums(lm, tokens_NT, first, lm_batch_size=lm_batch_size)
            hit = {"loss": loss, "n_predictions": n, "seconds": round(time.perf_counter() - t0, 2),
                   "params": count_parameters(lm.model)[1], "context_losses": per_context.tolist()}
            del lm
            cache[ck.source] = hit
            if cache_path is not None:
                write_json(cache_path, {"tokens_key": key, "losses": cache})
        # Each context's summed loss (None where a cache from before they were kept holds the loss alone)
        row = {"label": ck.label, "tokens": ck.tokens, "loss": hit["loss"], "source": ck.source,
               "context_losses": hit.get("context_losses")}
        if family:
            row["params"] = ck.params if ck.params is not None else int(hit["params"])
        out.append(row | {"compute": point_compute(series.kind, ck.tokens, row.get("params"))})
    return out


# ---- the fit and its inversion -----------------------------------------------------------------
def interp_compute(compute: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Compute at which the measured curve reaches ``target``: piecewise-linear in log C, None outside the range.

    The curve is the running minimum of the losses in compute order (monotone, so the crossing is unique).
    """
    C = np.asarray(compute, dtype=np.float64)
    order = np.argsort(C)
    C, L = C[order], np.minimum.accumulate(np.asarray(losses, dtype=np.float64)[order])
    if not (L[-1] <= target <= L[0]):
        return None
    i = int(np.argmax(L <= target))
    if i == 0:
        return float(C[0])
    hi, lo = L[i - 1], L[i]
    t = (hi - target) / (hi - lo) if hi > lo else 1.0
    return float(math.exp(math.log(C[i - 1]) + t * (math.log(C[i]) - math.log(C[i - 1]))))


interp_tokens = interp_compute  # the name from when the only axis was training tokens


def _reference_rows(points: Sequence[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    """The points as result rows, in their order (``compute`` from tokens and params when not given)."""
    rows = []
    for p in points:
        params = p.get("params")
        row = {"label": p.get("label", str(p["tokens"])), "tokens": int(p["tokens"]),
               **({"params": int(params)} if kind == KIND_FAMILY else {}),
               "compute": float(p["compute"]) if p.get("compute") is not None else
               point_compute(kind, int(p["tokens"]), params),
               "loss": float(p["loss"]), "source": p.get("source", "")}
        if kind == KIND_PROGRESS:
            row["compute"] = int(row["compute"])
        rows.append(row)
    if any(not math.isfinite(r["loss"]) for r in rows):
        raise SeriesError(f"{_what(kind, name)}: non-finite losses {[r['loss'] for r in rows]}")
    return rows


def _compute_order(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The rows' indices ordered by compute (ties kept in their order): the order of the result's rows."""
    return sorted(range(len(rows)), key=lambda i: rows[i]["compute"])


def _what(kind: str, name: str) -> str:
    return f"model family {name!r}" if kind == KIND_FAMILY else f"checkpoint series {name!r}"


def _fit_series(rows: list[dict[str, Any]], min_compute: float, kind: str, name: str, start=None):
    """The power law fitted to the rows with compute >= min_compute (each row gets its fitted loss),
    and the compute and losses it was fitted to. ``start``: a bootstrap refit's start (``floor_grid_starts``),
    which skips the exponent's profile interval that the result does not report."""
    used = [r for r in rows if r["compute"] >= min_compute]
    unit = COMPUTE_UNITS[kind]
    table = ", ".join(f"{r['compute']:,.4g}: {r['loss']:.4f}" if kind == KIND_FAMILY else
                      f"{r['tokens']:,}: {r['loss']:.4f}" for r in rows)
    if len(used) < 3:
        where = (f"{len(used)} members" if kind == KIND_FAMILY else
                 f"{len(used)} checkpoints with >= {int(min_compute):,} training tokens")
        raise SeriesError(f"{_what(kind, name)} has {where}; the fit needs at least 3 ({unit}: loss = "
                          f"{table or 'none'})")
    C = np.array([r["compute"] for r in used], dtype=np.float64)
    L = np.array([r["loss"] for r in used], dtype=np.float64)
    expected = ("expected models of increasing compute" if kind == KIND_FAMILY else
                "expected a series of one model in training")
    if not L[-1] < L[0]:
        raise SeriesError(f"{_what(kind, name)} does not decrease: the loss goes from {L[0]:.4f} to {L[-1]:.4f} "
                          f"({unit}: loss = {table}); {expected}")
    try:
        law = (fit_power_law(C, L, what=_what(kind, name)) if start is None else
               fit_power_law(C, L, what=_what(kind, name), interval_level=None, start=start))
    except FitError as e:
        raise SeriesError(str(e)) from e
    if law.alpha <= 0:
        raise SeriesError(f"{_what(kind, name)} does not decrease along its fit (exponent b = {law.alpha:.3g}; "
                          f"{unit}: loss = {table})")
    for r in rows:
        r["used_in_fit"] = r["compute"] >= min_compute
        r["fitted_loss"] = json_float(law(r["compute"])) if r["compute"] > 0 else None
    return law, C, L


def _extrapolation(law, C: np.ndarray, L: np.ndarray, spliced_loss: float, fit: str) -> str | None:
    """Where the headline's compute lies outside the fitted models' compute, or None inside it."""
    if spliced_loss <= law.c:
        return "unreachable"
    if fit == "power":
        # Judged by C* itself: a measured model may lie off the curve, so a spliced loss between its
        # measured and fitted loss is inside the measured losses while C* is past its compute.
        c_star = law.invert(spliced_loss)
        return "beyond_last" if c_star > C.max() else "before_first" if c_star < C.min() else None
    # The interpolation exists exactly between the measured losses (running minimum, so L.min() is its end).
    if spliced_loss < L.min():
        return "beyond_last"
    if spliced_loss > L[0]:
        return "before_first"
    return None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def compute_equivalent(points: Sequence[dict[str, Any]], spliced_loss: float, *,
                       reference_compute: float | None, kind: str = KIND_PROGRESS, clean_loss: float | None = None,
                       fit: str = "power", fit_min_frac: float = 0.01, series_name: str = "series",
                       reference_label: str | None = None, loss_sums: Mapping[str, torch.Tensor] | None = None,
                       n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, Any]:
    """Fit loss against compute and place ``spliced_loss`` on it (module docstring; pure function).

    ``points``: ``[{"tokens", "loss", "params"? (families), "compute"?, "label"?, "source"?}]``, one per
    reference model. ``reference_compute``: the fraction's denominator (training_progress: the full
    run's tokens; model_family: the evaluated model's 6 N D, or None to take the compute the fit
    needs for ``clean_loss``). ``fit_min_frac`` applies to training progress only.
    ``loss_sums``: the losses' per-group totals, ``{"spliced": [G], "clean": [G] (with clean_loss), "n": [G]
    predictions, "references": [G, M] (columns in the order of points)}``: the result then holds the
    fractions' bootstrap ``intervals`` (``n_boot`` draws of the G groups, ``level``, seeded by ``seed``) and
    ``interval_draws`` (module docstring).
    """
    if fit not in ("power", "interp"):
        raise ValueError(f"fit must be 'power' or 'interp', got {fit!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == KIND_PROGRESS and not reference_compute:
        raise ValueError("a training-progress equivalent needs reference_compute = the full run's tokens")
    if loss_sums is not None:
        check_bootstrap_args(n_boot, level)
        _check_loss_sums(loss_sums, len(points), clean_loss is not None)
    rows = _reference_rows(points, kind, series_name)
    order = _compute_order(rows)
    rows = [rows[i] for i in order]
    min_compute = max(1, math.ceil(fit_min_frac * reference_compute)) if kind == KIND_PROGRESS else 0
    law, C, L = _fit_series(rows, min_compute, kind, series_name)
    invert = law.invert if fit == "power" else (lambda y: interp_compute(C, L, y))
    c_star, c_interp = law.invert(spliced_loss), interp_compute(C, L, spliced_loss)
    c_clean = _finite(invert(clean_loss)) if clean_loss is not None else None
    c_main = _finite(c_star if fit == "power" else c_interp)
    how = "series_total" if kind == KIND_PROGRESS else "member"
    if reference_compute is None:
        reference_compute, how = c_clean, "clean_loss"
    ratio = (lambda x: _finite(x) / reference_compute if _finite(x) is not None else None) if reference_compute \
        else (lambda x: None)
    extrapolation = _extrapolation(law, C, L, spliced_loss, fit)
    fraction = ratio(c_main)
    # A loss worse than the clean one needs less compute than the model had: a fraction >= 1 then comes
    # from the model lying below the fitted curve (the fit's error there), not from the SAE.
    below_fit_error = (clean_loss is not None and spliced_loss > clean_loss and fraction is not None
                       and fraction >= 1)
    out = {
        "metric": "compute_equivalent",
        "kind": kind,
        "compute_unit": COMPUTE_UNITS[kind],
        "checkpoints": rows,
        "fit": {"form": f"L(C) = a * C^-b + c (C: training {COMPUTE_UNITS[kind]}"
                        + (", 6 N D)" if kind == KIND_FAMILY else ")"),
                "method": fit, "a": law.a, "b": law.alpha, "c": law.c, "b_se": law.alpha_se, "c_se": law.c_se,
                "rmse_log": law.rmse_log, "n_points": law.n_points, "min_compute": min_compute},
        "spliced_loss": spliced_loss,
        "clean_loss": clean_loss,
        "compute_equivalent": json_float(c_star),
        "compute_equivalent_interp": c_interp,
        "reference_compute": reference_compute,
        "reference": {"how": how, "label": reference_label},
        "fraction": fraction,
        "fraction_power": ratio(c_star),
        "fraction_interp": ratio(c_interp),
        "clean_compute_equivalent": c_clean,
        "clean_fraction": ratio(c_clean),
        "fraction_relative": c_main / c_clean if c_main is not None and c_clean else None,
        "extrapolated": extrapolation is not None,
        "extrapolation": extrapolation,
        "below_fit_error": below_fit_error,
    }
    if loss_sums is not None:
        refs = loss_sums["references"].double().cpu()[:, order]  # columns in the rows' order
        out.update(_bootstrap(out, {**loss_sums, "references": refs}, series_name, n_boot, level, seed))
    return out


# ---- the interval: a paired bootstrap over the eval documents -----------------------------------------
INTERVAL_STATS = ("fraction", "clean_fraction", "fraction_relative")
"""The headline numbers that get an interval (the clean ones where a clean loss was given)."""
DRAW_PLACES = ("inside", "beyond_last", "before_first", "unreachable", "failed")
"""Where a draw's headline compute lies (``extrapolation``'s words; "failed": its refit failed)."""
INTERVAL_METHOD = ("documents of its contexts (those contexts where they lie in one document); the headline's "
                   "losses and the draws' sums from one measurement")
"""How compute-equivalent's intervals are made, as its results record it (``interval_method``): a result
that records another or none is computed again, not reused (:func:`saelab.evals.bootstrap.earlier_intervals`)."""


def _check_loss_sums(sums: Mapping[str, torch.Tensor], n_points: int, clean: bool) -> None:
    """Refuse per-group totals that do not name one total per group of every loss ``compute_equivalent`` reads."""
    need = ("spliced", "n", "references") + (("clean",) if clean else ())
    missing = [k for k in need if k not in sums]
    if missing:
        raise ValueError(f"loss_sums lacks {missing}; expected per-group totals of {list(need)}")
    G = sums["n"].shape[0]
    shapes = {k: tuple(sums[k].shape) for k in need}
    if any(shape != ((G, n_points) if k == "references" else (G,)) for k, shape in shapes.items()):
        raise ValueError(f"loss_sums must hold [G] totals and references [G, {n_points}] (one column per point), "
                         f"got shapes {shapes}")


def _compute_at(law, C: np.ndarray, L: np.ndarray, loss: float, fit: str) -> float:
    """A draw's compute for ``loss``, in [0, inf]: the power law's (inf: never reached), or the interpolation's,
    which puts a loss outside the measured ones at the end it lies beyond (0: worse than the first model's,
    inf: better than the best)."""
    if fit == "power":
        return law.invert(loss)
    c = interp_compute(C, L, loss)
    return c if c is not None else 0.0 if loss > L[0] else math.inf


def _draw(head: dict[str, Any], losses_M: np.ndarray, spliced: float, clean: float | None,
          name: str, start: np.ndarray) -> tuple[str, list[float]]:
    """One draw: the curve refitted as the headline's (``_fit_series``) to the draw's reference losses, where its
    spliced loss lies on it, and its fraction, clean fraction and fraction relative (NaN where undefined)."""
    fit, kind, ref = head["fit"]["method"], head["kind"], head["reference"]
    rows = [{"compute": r["compute"], "tokens": r["tokens"], "loss": float(x)}
            for r, x in zip(head["checkpoints"], losses_M)]
    try:
        law, C, L = _fit_series(rows, head["fit"]["min_compute"], kind, name, start=start)
    except (SaelabError, ValueError, ArithmeticError):  # a curve that does not fall, or a fit that fails
        return "failed", [math.nan] * 3
    c_main = np.float64(_compute_at(law, C, L, spliced, fit))
    # The clean loss placed as the headline places it: where the curve never reaches it (or, interpolated, lies
    # outside the measured losses) every fraction it divides is undefined, not 0
    c = (law.invert(clean) if fit == "power" else interp_compute(C, L, clean)) if clean is not None else None
    c_clean = np.float64(c if _finite(c) else math.nan)
    denominator = c_clean if ref["how"] == "clean_loss" else np.float64(head["reference_compute"])
    with np.errstate(divide="ignore", invalid="ignore"):  # inf / inf and 0 / 0: undefined (NaN)
        values = [float(c_main / denominator), float(c_clean / denominator), float(c_main / c_clean)]
    return _extrapolation(law, C, L, spliced, fit) or "inside", values


def _bootstrap(head: dict[str, Any], sums: Mapping[str, torch.Tensor], name: str, n_boot: int, level: float,
               seed: int) -> dict[str, Any]:
    """``intervals`` of the headline's fractions and ``interval_draws`` (where each draw's compute lay): each
    draw takes G groups with replacement (``resample_counts``, as the other metrics' bootstraps), recomputes
    every mean loss from the drawn groups' totals, refits the curve and places the losses on it."""
    G = int(sums["n"].shape[0])
    stats = INTERVAL_STATS if "clean" in sums else INTERVAL_STATS[:1]
    if G < 2 or n_boot == 0:
        draws, places = np.empty((0, 3)), dict.fromkeys(DRAW_PLACES, 0)
    else:
        counts = resample_counts(G, n_boot, torch.Generator().manual_seed(seed))
        total = {k: torch.tensordot(counts, v.double().cpu(), dims=1).numpy() for k, v in sums.items()}
        n = total["n"]
        losses = total["references"] / n[:, None]
        fitted = [r["compute"] >= head["fit"]["min_compute"] for r in head["checkpoints"]]
        starts = floor_grid_starts([r["compute"] for r, f in zip(head["checkpoints"], fitted) if f],
                                   losses[:, fitted])
        spliced = (total["spliced"] / n).tolist()
        clean = (total["clean"] / n).tolist() if "clean" in total else [None] * n_boot
        results = [_draw(head, losses[b], spliced[b], clean[b], name, starts[b]) for b in range(n_boot)]
        draws = np.array([values for _, values in results])
        places = {p: sum(where == p for where, _ in results) for p in DRAW_PLACES}
    return {"intervals": {k: _draw_interval(head[k], draws[:, INTERVAL_STATS.index(k)], level, G) for k in stats},
            "interval_draws": places}


def _draw_interval(estimate: float | None, draws_B: np.ndarray, level: float, n_groups: int) -> dict[str, Any]:
    """The JSON-ready percentile interval of one fraction from its draws (``percentile_interval``'s record, and
    ``n_infinite``): a draw at inf (its compute never reached) counts on the high side, and a bound that falls
    among such draws is None (unbounded); NaN draws (no value) are left out and counted as ``n_undefined``."""
    out = percentile_interval(math.nan if estimate is None else estimate, torch.empty(0, dtype=torch.float64),
                              level, n_groups)
    ok = np.sort(draws_B[~np.isnan(draws_B)])
    out.update(n_boot=int(draws_B.size), n_undefined=int(draws_B.size - ok.size), n_infinite=int(np.isinf(ok).sum()))
    if ok.size:
        out.update(low=_quantile(ok, (1 - level) / 2), high=_quantile(ok, (1 + level) / 2))
    return out


def format_fraction_interval(interval: dict | None, fmt: str = "{:.4g}") -> str:
    """``format_interval`` of a fraction for reports; an upper bound among draws that never reach the spliced
    loss (infinite compute) is shown as ∞."""
    if not interval or not interval.get("n_infinite") or interval.get("high") is not None:
        return format_interval(interval, fmt)
    if interval.get("low") is None:
        return f" (no interval: {interval['n_infinite']:,} of {interval['n_boot']:,} draws never reach it)"
    return f" [{fmt.format(interval['low'])}, ∞)"


def _quantile(sorted_x: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of sorted values, linear between neighbours (as ``torch.quantile``); None when it
    falls on or next to an infinite value."""
    pos = q * (sorted_x.size - 1)
    i = int(math.floor(pos))
    t = pos - i
    lo, hi = sorted_x[i], sorted_x[min(i + 1, sorted_x.size - 1)]
    if math.isinf(lo) or (t > 0 and math.isinf(hi)):
        return None
    return float(lo + (hi - lo) * t)


def upgrade_result(result: dict[str, Any]) -> dict[str, Any]:
    """A result in today's schema: one written before families existed (no ``kind``) is a training-progress
    equivalent counted in tokens, its ``*tokens_equivalent*`` and ``min_tokens`` renamed."""
    if "kind" in result:
        return result
    r = dict(result)
    total = (r.get("series") or {}).get("total_tokens")
    r.update(kind=KIND_PROGRESS, compute_unit=COMPUTE_UNITS[KIND_PROGRESS],
             checkpoints=[c | {"compute": c["tokens"]} for c in r.get("checkpoints", [])],
             fit=r["fit"] | {"min_compute": r["fit"].get("min_tokens")},
             compute_equivalent=r.pop("tokens_equivalent", None),
             compute_equivalent_interp=r.pop("tokens_equivalent_interp", None),
             clean_compute_equivalent=r.pop("clean_tokens_equivalent", None),
             reference_compute=total, reference={"how": "series_total", "label": None})
    r["series"] = (r.get("series") or {}) | {"kind": KIND_PROGRESS}
    return r


# ---- the metric ---------------------------------------------------------------------------------
def _reference(series: CheckpointSeries, points: list[dict[str, Any]], lm_name: str) -> tuple[float | None, str | None]:
    """The fraction's denominator and its label: the full run (series), the evaluated model's member
    (family), or (None, None) when the evaluated model is none of the family's members."""
    if series.kind == KIND_PROGRESS:
        return series.total_tokens, series.name
    for ck, row in zip(series.checkpoints, points):
        if same_model(ck.model_id, lm_name):  # a reference model's hub id or path, the evaluated lm.name
            return row["compute"], ck.label
    return None, None


@torch.no_grad()
def run_compute_equivalent(lm, sae, tokens_NT: torch.Tensor, cfg: ComputeEquivalentConfig | None = None, *,
                           series: CheckpointSeries | None = None, spliced_loss: float | None = None,
                           clean_loss: float | None = None, cache_path: str | Path | None = None,
                           documents: torch.Tensor | None = None,
                           context_sums: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Compute-equivalent (family) or training-progress equivalent (series) of ``sae`` spliced into ``lm``.

    ``context_sums``: the spliced and clean losses' per-context sums ``{"spliced", "clean"}`` ``[N]``
    (``downstream_sums``', e.g. the core eval's on exactly these tokens and predictions), which the interval
    resamples; ``spliced_loss`` / ``clean_loss``: their means, if known (else taken from the sums). Without the
    sums both are measured here, a pass each: the headline and its interval's draws read one measurement, never
    a mean from one and sums from another (a mean given without its sums is refused). ``documents``: the document
    of each context, which the interval resamples (None: each context alone). ``series`` overrides ``cfg.series``.
    """
    from saelab.evals._common import resolve_hook

    cfg = cfg or ComputeEquivalentConfig()
    t0 = time.perf_counter()
    tokens_NT = check_tokens(tokens_NT)
    check_documents(documents, tokens_NT)
    _check_context_sums(context_sums, tokens_NT, spliced_loss, clean_loss)
    hook = resolve_hook(lm, sae, cfg.hook)
    first = first_position(sae, cfg.exclude_first)
    if series is None:
        spec = cfg.series or series_for_model(lm.name)
        if spec is None:
            raise SeriesError(f"no checkpoint series or model family given and none is known for model "
                              f"{lm.known_as!r}; "
                              f"pass one (--series {', '.join(known_series_names()[:2])}, ... or a folder)")
        series = resolve_series(spec, cfg.steps, device=lm.device, dtype=lm.dtype)
    spliced_loss, clean_loss, per_context = _own_losses(lm, sae, tokens_NT, first, hook, cfg.lm_batch_size,
                                                        spliced_loss, clean_loss, context_sums)
    t1 = time.perf_counter()
    points = checkpoint_losses(series, tokens_NT, first, lm_batch_size=cfg.lm_batch_size, cache_path=cache_path,
                               reference_tokenizer=lm.tokenizer, progress=cfg.progress)
    t2 = time.perf_counter()
    reference, label = _reference(series, points, lm.name)
    documents = resampled_documents(documents)
    sums, note = _group_sums(per_context, points, documents, tokens_NT.shape[1] - 1 - first, cache_path)
    out = compute_equivalent(points, spliced_loss, reference_compute=reference, kind=series.kind,
                             clean_loss=clean_loss, fit=cfg.fit, fit_min_frac=cfg.fit_min_frac,
                             series_name=series.name, reference_label=label, loss_sums=sums)
    n_pred = tokens_NT.shape[0] * (tokens_NT.shape[1] - 1 - first)
    return {"metric": "compute_equivalent", "hook": hook, "config": config_dict(cfg), "series": series.info(),
            **{k: v for k, v in out.items() if k != "metric"}, "n_predictions": n_pred,
            "intervals": out.get("intervals", {}),
            "interval_groups": "contexts" if documents is None else "documents", "interval_note": note,
            "interval_method": INTERVAL_METHOD,
            "checkpoint_s": t2 - t1, "wall_s": time.perf_counter() - t0}


def _check_context_sums(sums: Mapping[str, torch.Tensor] | None, tokens_NT: torch.Tensor, spliced_loss: float | None,
                        clean_loss: float | None) -> None:
    """Refuse per-context sums that do not hold the spliced and clean loss of every context of ``tokens_NT``, and
    a mean loss given without them (the interval would resample sums measured again, not the mean's)."""
    if sums is None:
        given = [name for name, x in (("spliced_loss", spliced_loss), ("clean_loss", clean_loss)) if x is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} given without context_sums; expected both the mean losses and "
                             "their per-context sums (one measurement for the headline and its interval), or neither")
        return
    shapes = {k: tuple(sums[k].shape) if k in sums else None for k in ("spliced", "clean")}
    if any(shape != (tokens_NT.shape[0],) for shape in shapes.values()):
        raise ValueError(f"context_sums must hold 'spliced' and 'clean' sums of each of the {tokens_NT.shape[0]} "
                         f"contexts, got shapes {shapes}")


def _own_losses(lm, sae, tokens_NT: torch.Tensor, first: int, hook: str, batch: int, spliced_loss: float | None,
                clean_loss: float | None, context_sums: Mapping[str, torch.Tensor] | None
                ) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The evaluated model's spliced and clean losses and their per-context sums, from one source: as given (a
    mean not given: its sums' mean), else both measured in the same forwards."""
    from saelab.evals.downstream import replace_from

    if context_sums is not None:
        sums = {k: context_sums[k].double().cpu() for k in ("spliced", "clean")}
        count = tokens_NT.shape[0] * (tokens_NT.shape[1] - 1 - first)
        return (float(sums["spliced"].sum()) / count if spliced_loss is None else spliced_loss,
                float(sums["clean"].sum()) / count if clean_loss is None else clean_loss, sums)
    losses, sums = {}, {}
    for name, edits in (("spliced", {hook: replace_from(first, sae)}), ("clean", None)):
        losses[name], _, sums[name] = loss_sums(lm, tokens_NT, first, edits, batch)
    return losses["spliced"], losses["clean"], sums


def _group_sums(per_context: dict[str, torch.Tensor], points: list[dict[str, Any]], documents: torch.Tensor | None,
                per_ctx: int, cache_path: str | Path | None) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The losses' totals per group (a document, or a context) for the interval, or None and why there is none:
    reference losses from a cache written before the per-context sums were kept."""
    old = [p["label"] for p in points if p.get("context_losses") is None]
    if old:
        return None, (f"No interval: the losses of {', '.join(old)} cached in {cache_path} were measured before "
                      "saelab kept each context's loss; remove that file to measure them again with them")
    N = per_context["spliced"].shape[0]
    totals = {**per_context, "n": torch.full((N,), float(per_ctx), dtype=torch.float64),
              "references": torch.tensor([p["context_losses"] for p in points], dtype=torch.float64).T}
    return by_document(totals, bounded_groups(documents if documents is not None else torch.arange(N))), None


__all__ = [
    "CRFM_TOKENS_PER_STEP", "CheckpointSeries", "ComputeEquivalentConfig", "KINDS", "KIND_FAMILY", "KIND_PROGRESS",
    "KIND_TITLES", "PYTHIA_TOKENS_PER_STEP", "PYTHIA_TOTAL_TOKENS", "SeriesCheckpoint", "SeriesError",
    "check_checkpoints_before_load", "checkpoint_losses", "checkpoints_to_load", "compute_equivalent",
    "crfm_checkpoint_steps", "crfm_gpt2_small_series", "format_fraction_interval", "interp_compute", "interp_tokens",
    "known_series_names", "local_family", "local_series", "loss_sums", "mean_loss", "point_compute",
    "pythia_checkpoint_steps", "pythia_family", "pythia_series", "resolve_series", "run_compute_equivalent",
    "series_for_model", "upgrade_result",
]
