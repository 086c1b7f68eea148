"""Compute-equivalent of an SAE's spliced loss (Gao et al. 2024, §4.1).

Splicing an SAE into a model raises its loss. The *compute-equivalent* says how much pretraining
compute a model of the same family needs to reach that raised loss: take a checkpoint series of
the family (the same model at several points of its training), measure each checkpoint's clean
loss on the evaluation tokens, fit loss against training compute, and read off where the fitted
curve crosses the spliced loss. The answer is given as a fraction of the series' full pretraining
compute. Definitions pinned here and in ``tests/test_compute_equivalent.py``:

- **Compute** is counted in training tokens ``C``. Within one series every checkpoint is the same
  model, so its training FLOPs are ``6 * params * C`` and the fraction of compute is the fraction
  of tokens.
- **Losses** are mean next-token cross-entropies (nats) on the same predictions for every model:
  packed eval contexts, and when the SAE leaves out position 0 the prediction made at position 0
  is left out too (``saelab.evals.downstream``). The spliced loss replaces the hook activation by
  the SAE reconstruction at positions >= 1 (same convention).
- **Fit** (``fit="power"``, the default): ``L(C) = a * C^(-b) + c``, a power law with an
  irreducible loss ``c`` (the Kaplan/Chinchilla form for loss against data at fixed size),
  fitted in log space with ``saelab.evals.power_law`` on the checkpoints with
  ``C >= fit_min_frac * C_total`` (default 1 %: after the learning-rate warmup of both hub
  series, whose first steps follow no power law; ``C = 0`` cannot enter one at all). Inverted:
  ``C* = (a / (L - c))^(1/b)``; unreachable (infinite compute) when ``L <= c``.
  A model-free check is always reported beside it (``fit="interp"`` makes it the headline):
  piecewise-linear interpolation of ``log C`` against loss between measured checkpoints (on the
  running minimum of the losses, so it is monotone). It needs no functional form but cannot say
  anything outside the measured range; the power law can extrapolate (flagged).
- **Fraction** = ``C* / C_total`` with ``C_total`` the tokens of the series' full training run
  (400k steps for the CRFM GPT-2 series, 143k for Pythia), whichever checkpoints were measured.
  ``clean_fraction`` places the SAE's own model (its clean loss) on the same curve (1 when the
  model is the series' last checkpoint); ``fraction_relative = C*(spliced) / C*(clean)`` corrects
  for a model that is not exactly the series' end (OpenAI's GPT-2 against the CRFM re-training).
- **Extrapolation**: ``extrapolated`` is true when the spliced loss lies outside the losses of
  the fitted checkpoints: ``"beyond_last"`` (lower than the best checkpoint: the fraction may
  exceed 1), ``"before_first"`` (higher than the first checkpoint fitted) or ``"unreachable"``
  (at or below the irreducible loss c; fraction None).

Series (``resolve_series``): ``crfm-gpt2-small`` (Stanford CRFM's GPT-2 small re-training
``stanford-crfm/alias-gpt2-small-x21``; ``crfm-gpt2-small-x49`` etc. for its other seeds),
``pythia-70m`` (``EleutherAI/pythia-70m``, any Pythia size, ``-deduped`` too), or a local folder
(``local_series``). ``series_for_model`` knows which series fits a model id.

Result schema (``run_compute_equivalent`` / ``compute_equivalent`` return a JSON-serializable dict)::

    metric              "compute_equivalent"
    series              {name, source, total_tokens, tokens_per_step (None for local series
                         without one), description}
    checkpoints         [{label, tokens, loss, used_in_fit, fitted_loss (None if not fitted), source}]
    fit                 {form, method ("power" | "interp": the one behind `fraction`), a, b, c,
                         b_se, c_se, rmse_log, n_points, min_tokens}
    spliced_loss, clean_loss, n_predictions
    tokens_equivalent   C* from the power law (None when unreachable)
    fraction            C* / total_tokens from `fit.method`
    fraction_power, fraction_interp       both estimates (interp: None outside the measured range)
    tokens_equivalent_interp
    clean_tokens_equivalent, clean_fraction, fraction_relative
    extrapolated, extrapolation           see above
    checkpoint_s, wall_s                  wall time of the checkpoint losses, of everything
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.evals._common import check_tokens, config_dict, first_position, json_float, run_option
from saelab.evals.power_law import FitError, fit_power_law
from saelab.utils.atomic import write_json


class SeriesError(SaelabError, ValueError):
    """A checkpoint series that is unknown, unreadable, too short or does not decrease."""


# ---- checkpoint series ------------------------------------------------------------------------
@dataclass
class SeriesCheckpoint:
    """One model of a series."""

    label: str
    """Name shown in tables ('checkpoint-1000', 'step1000', a folder name)."""
    tokens: int
    """Training tokens the model had seen."""
    load: Callable[[], Any] = field(repr=False)
    """Loads it as a saelab LanguageModel."""
    source: str = ""
    """Where it comes from ('hub:ID@REVISION' or a path)."""


@dataclass
class CheckpointSeries:
    """The same model at several points of its training."""

    name: str
    checkpoints: list[SeriesCheckpoint]
    total_tokens: int
    """Tokens of the full training run (the denominator of the fraction)."""
    tokens_per_step: int | None = None
    description: str = ""
    source: str = ""

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "total_tokens": self.total_tokens,
                "tokens_per_step": self.tokens_per_step, "description": self.description}


def _hub_loader(repo: str, revision: str, device: str | torch.device) -> Callable[[], Any]:
    def load():
        from saelab.models import load_model

        return load_model(repo, device=device, revision=revision)
    return load


# Stanford CRFM's GPT-2 small re-trainings (github.com/stanford-crfm/mistral): OpenWebText,
# effective batch 512 sequences of 1024 tokens (conf/gpt2-mistral-small-config.yaml: effective_bsz 512;
# conf/models/gpt2-small.yaml: seq_len 1024), 400k steps (conf/trainers/gpt2-small.yaml: max_steps),
# checkpoints every 10 steps to 100, every 50 to 2,000, every 100 to 20,000, every 1,000 to 400,000
# (checkpoint_frequency), each a hub branch named checkpoint-{step}.
CRFM_TOKENS_PER_STEP = 512 * 1024
CRFM_TOTAL_STEPS = 400_000
CRFM_RUNS = {21: "alias", 49: "battlestar", 81: "caprica", 343: "darkmatter", 777: "expanse"}
CRFM_DEFAULT_STEPS = (400, 1000, 2000, 4000, 10_000, 20_000, 40_000, 100_000, 200_000, 300_000, 400_000)

# Pythia (github.com/EleutherAI/pythia, Biderman et al. 2023): every size trained on the same data
# in the same order, batch 1024 sequences of 2048 tokens (2,097,152 tokens per step), 143k steps;
# checkpoints step0, the log-spaced step1, 2, 4, ..., 512 and every 1,000 steps to step143000, each
# a hub branch named step{step}.
PYTHIA_TOKENS_PER_STEP = 1024 * 2048
PYTHIA_TOTAL_STEPS = 143_000
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
PYTHIA_DEFAULT_STEPS = (128, 256, 512, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 100_000, 143_000)


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
                           device: str | torch.device = "cpu") -> CheckpointSeries:
    """Stanford CRFM's GPT-2 small trained with ``seed`` (21 'alias', 49, 81, 343, 777), at ``steps``."""
    if seed not in CRFM_RUNS:
        raise SeriesError(f"no CRFM GPT-2 small run with seed {seed}; known seeds: {sorted(CRFM_RUNS)}")
    name = "crfm-gpt2-small" + ("" if seed == 21 else f"-x{seed}")
    repo = f"stanford-crfm/{CRFM_RUNS[seed]}-gpt2-small-x{seed}"
    steps = _check_steps(steps or CRFM_DEFAULT_STEPS, crfm_checkpoint_steps(), name)
    cks = [SeriesCheckpoint(f"checkpoint-{s}", s * CRFM_TOKENS_PER_STEP, _hub_loader(repo, f"checkpoint-{s}", device),
                            f"hub:{repo}@checkpoint-{s}") for s in steps]
    return CheckpointSeries(name, cks, CRFM_TOTAL_STEPS * CRFM_TOKENS_PER_STEP, CRFM_TOKENS_PER_STEP,
                            "GPT-2 small re-trained on OpenWebText by Stanford CRFM (Mistral)", f"hub:{repo}")


def pythia_series(size: str = "70m", steps: Sequence[int] = PYTHIA_DEFAULT_STEPS, deduped: bool = False,
                  device: str | torch.device = "cpu") -> CheckpointSeries:
    """EleutherAI's Pythia of ``size`` (``70m`` ...), at ``steps``."""
    if size not in PYTHIA_SIZES:
        raise SeriesError(f"no Pythia of size {size!r}; known sizes: {', '.join(PYTHIA_SIZES)}")
    name = f"pythia-{size}" + ("-deduped" if deduped else "")
    repo = f"EleutherAI/{name}"
    steps = _check_steps(steps or PYTHIA_DEFAULT_STEPS, pythia_checkpoint_steps(), name)
    cks = [SeriesCheckpoint(f"step{s}", s * PYTHIA_TOKENS_PER_STEP, _hub_loader(repo, f"step{s}", device),
                            f"hub:{repo}@step{s}") for s in steps]
    return CheckpointSeries(name, cks, PYTHIA_TOTAL_STEPS * PYTHIA_TOKENS_PER_STEP, PYTHIA_TOKENS_PER_STEP,
                            f"Pythia-{size}{' (deduplicated Pile)' if deduped else ''} by EleutherAI", f"hub:{repo}")


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


def local_series(folder: str | Path, device: str | torch.device = "cpu") -> CheckpointSeries:
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

    def loader(path: Path):
        def load():
            from saelab.models import load_model

            return load_model(str(path), device=device)
        return load

    cks = [SeriesCheckpoint(label, tokens, loader(path), str(path)) for label, tokens, path in entries]
    total = int(meta.get("total_tokens") or max(c.tokens for c in cks))
    return CheckpointSeries(str(meta.get("name") or folder.name), cks, total, int(tps) if tps else None,
                            f"local checkpoint series in {folder}", str(folder))


_CRFM_RE = re.compile(r"^crfm-gpt2-small(?:-x(\d+))?$")
_PYTHIA_RE = re.compile(r"^pythia-([0-9.]+[mb])(-deduped)?$")


def known_series_names() -> list[str]:
    return (["crfm-gpt2-small"] + [f"crfm-gpt2-small-x{s}" for s in CRFM_RUNS if s != 21]
            + [f"pythia-{s}" for s in PYTHIA_SIZES] + [f"pythia-{s}-deduped" for s in PYTHIA_SIZES])


def resolve_series(spec: str, steps: Sequence[int] = (), device: str | torch.device = "cpu") -> CheckpointSeries:
    """A series by name (``crfm-gpt2-small``, ``pythia-70m``, see ``known_series_names``) or folder path."""
    if not isinstance(spec, str) or not spec:
        raise SeriesError(f"checkpoint series must be a name or a folder, got {spec!r}")
    m = _CRFM_RE.match(spec)
    if m:
        return crfm_gpt2_small_series(steps, seed=int(m.group(1) or 21), device=device)
    m = _PYTHIA_RE.match(spec)
    if m:
        return pythia_series(m.group(1), steps, deduped=bool(m.group(2)), device=device)
    path = Path(spec).expanduser()
    if path.exists() or "/" in spec or spec.startswith("."):
        if steps:
            raise SeriesError(f"series steps apply to the hub series, not to the local folder {spec!r}")
        return local_series(path, device=device)
    raise SeriesError(f"unknown checkpoint series {spec!r}: expected one of {', '.join(known_series_names()[:3])}, "
                      "pythia-<size>[-deduped] or a folder of checkpoints")


_PYTHIA_MODEL_RE = re.compile(r"^(?:EleutherAI/)?(pythia-[0-9.]+[mb](?:-deduped)?)$")


def series_for_model(model_name: str) -> str | None:
    """The built-in series of a model id: GPT-2 small -> crfm-gpt2-small, EleutherAI/pythia-X -> pythia-X."""
    if model_name in ("gpt2", "openai-community/gpt2"):
        return "crfm-gpt2-small"
    m = _PYTHIA_MODEL_RE.match(model_name or "")
    if m and _PYTHIA_RE.match(m.group(1)).group(1) in PYTHIA_SIZES:
        return m.group(1)
    return None


# ---- losses -----------------------------------------------------------------------------------
@torch.no_grad()
def mean_loss(lm, tokens_NT: torch.Tensor, first: int, edits=None, lm_batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token CE (nats) of predictions at positions first..T-2, and their count."""
    from saelab.evals.downstream import ce_and_kl

    total, count = 0.0, 0
    for i in range(0, tokens_NT.shape[0], lm_batch_size):
        toks = tokens_NT[i:i + lm_batch_size]
        ce, _, _ = ce_and_kl(lm.logits(toks, edits=edits), None, toks.to(lm.device), first)
        total += float(ce.double().sum())
        count += ce.numel()
    return total / count, count


def _tokens_key(tokens_NT: torch.Tensor, first: int) -> str:
    h = hashlib.sha256(tokens_NT.cpu().numpy().astype(np.int64).tobytes())
    h.update(f"|{first}|{tuple(tokens_NT.shape)}".encode())
    return h.hexdigest()[:16]


def _check_tokenizer(ckpt, reference_tokenizer, tokens_NT: torch.Tensor, label: str) -> None:
    top = int(tokens_NT.max())
    if top >= ckpt.vocab_size:
        raise SeriesError(f"checkpoint {label}: vocabulary of {ckpt.vocab_size} tokens, but the eval tokens use "
                          f"id {top}; a series must share the evaluated model's tokenizer")
    if reference_tokenizer is None:
        return
    probe = reference_tokenizer.decode(tokens_NT[0, 1:].tolist())
    ours = reference_tokenizer(probe, add_special_tokens=False)["input_ids"]
    theirs = ckpt.tokenizer(probe, add_special_tokens=False)["input_ids"]
    if list(ours) != list(theirs):
        raise SeriesError(f"checkpoint {label} tokenizes the eval text differently from the evaluated model; "
                          "a series must share its tokenizer")


def checkpoint_losses(series: CheckpointSeries, tokens_NT: torch.Tensor, first: int, *, lm_batch_size: int = 8,
                      cache_path: str | Path | None = None, reference_tokenizer=None,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Clean loss of every checkpoint of ``series`` on ``tokens_NT`` (predictions from ``first``).

    With ``cache_path`` each loss is saved (atomically) as soon as it is known and reused by a later
    call on the same tokens: an interrupted run over hub checkpoints resumes where it stopped.
    """
    from tqdm.auto import tqdm

    tokens_NT = check_tokens(tokens_NT)
    key = _tokens_key(tokens_NT, first)
    cache: dict[str, Any] = {}
    if cache_path is not None and Path(cache_path).exists():
        old = json.loads(Path(cache_path).read_text())
        if old.get("tokens_key") == key:
            cache = old.get("losses", {})
    out = []
    for ck in tqdm(series.checkpoints, desc=f"series {series.name}", unit="ckpt", disable=not progress):
        hit = cache.get(ck.source)
        if hit is None:
            lm = ck.load()
            _check_tokenizer(lm, reference_tokenizer, tokens_NT, ck.label)
            t0 = time.perf_counter()
            loss, n = mean_loss(lm, tokens_NT, first, lm_batch_size=lm_batch_size)
            del lm
            hit = {"loss": loss, "n_predictions": n, "seconds": round(time.perf_counter() - t0, 2)}
            cache[ck.source] = hit
            if cache_path is not None:
                write_json(cache_path, {"tokens_key": key, "losses": cache})
        out.append({"label": ck.label, "tokens": ck.tokens, "loss": hit["loss"], "source": ck.source})
    return out


# ---- the fit and its inversion -----------------------------------------------------------------
def interp_tokens(tokens: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Tokens at which the measured curve reaches ``target``: piecewise-linear in log C, None outside the range.

    The curve is the running minimum of the losses in token order (monotone, so the crossing is unique).
    """
    C = np.asarray(tokens, dtype=np.float64)
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


def _fit_series(points: Sequence[dict[str, Any]], total_tokens: int, fit_min_frac: float, series_name: str):
    """The checkpoints as rows (with their fitted loss), the power law fitted to those past fit_min_frac of
    training, the tokens and losses it was fitted to, and that token threshold."""
    rows = sorted(({"label": p.get("label", str(p["tokens"])), "tokens": int(p["tokens"]), "loss": float(p["loss"]),
                    "source": p.get("source", "")} for p in points), key=lambda r: r["tokens"])
    if any(not math.isfinite(r["loss"]) for r in rows):
        raise SeriesError(f"checkpoint series {series_name!r}: non-finite losses {[r['loss'] for r in rows]}")
    min_tokens = max(1, int(math.ceil(fit_min_frac * total_tokens)))
    used = [r for r in rows if r["tokens"] >= min_tokens]
    table = ", ".join(f"{r['tokens']:,}: {r['loss']:.4f}" for r in rows)
    if len(used) < 3:
        raise SeriesError(f"checkpoint series {series_name!r} has {len(used)} checkpoints with >= {min_tokens:,} "
                          f"training tokens; the fit needs at least 3 (tokens: loss = {table or 'none'})")
    C = np.array([r["tokens"] for r in used], dtype=np.float64)
    L = np.array([r["loss"] for r in used], dtype=np.float64)
    if not L[-1] < L[0]:
        raise SeriesError(f"checkpoint series {series_name!r} does not decrease: the loss goes from {L[0]:.4f} "
                          f"to {L[-1]:.4f} (tokens: loss = {table}); expected a series of one model in training")
    try:
        law = fit_power_law(C, L, what=f"checkpoint series {series_name!r}")
    except FitError as e:
        raise SeriesError(str(e)) from e
    if law.alpha <= 0:
        raise SeriesError(f"checkpoint series {series_name!r} does not decrease along its fit (exponent b = "
                          f"{law.alpha:.3g}; tokens: loss = {table})")
    for r in rows:
        r["used_in_fit"] = r["tokens"] >= min_tokens
        r["fitted_loss"] = json_float(law(r["tokens"])) if r["tokens"] > 0 else None
    return rows, law, C, L, min_tokens


def compute_equivalent(points: Sequence[dict[str, Any]], spliced_loss: float, *, total_tokens: int,
                       clean_loss: float | None = None, fit: str = "power", fit_min_frac: float = 0.01,
                       series_name: str = "series") -> dict[str, Any]:
    """Fit loss against tokens and place ``spliced_loss`` on it (module docstring; pure function).

    ``points``: ``[{"tokens", "loss", "label"?, "source"?}]``, one per checkpoint.
    """
    if fit not in ("power", "interp"):
        raise ValueError(f"fit must be 'power' or 'interp', got {fit!r}")
    rows, law, C, L, min_tokens = _fit_series(points, total_tokens, fit_min_frac, series_name)
    c_star = law.invert(spliced_loss)
    c_interp = interp_tokens(C, L, spliced_loss)
    if spliced_loss <= law.c:
        extrapolation = "unreachable"
    elif spliced_loss < L.min():
        extrapolation = "beyond_last"
    elif spliced_loss > L[0]:
        extrapolation = "before_first"
    else:
        extrapolation = None
    frac_power = c_star / total_tokens if math.isfinite(c_star) else None
    frac_interp = c_interp / total_tokens if c_interp is not None else None
    out = {
        "metric": "compute_equivalent",
        "checkpoints": rows,
        "fit": {"form": "L(C) = a * C^-b + c (C: training tokens)", "method": fit, "a": law.a, "b": law.alpha,
                "c": law.c, "b_se": law.alpha_se, "c_se": law.c_se, "rmse_log": law.rmse_log,
                "n_points": law.n_points, "min_tokens": min_tokens},
        "spliced_loss": spliced_loss,
        "clean_loss": clean_loss,
        "tokens_equivalent": json_float(c_star),
        "fraction": json_float(frac_power if fit == "power" else frac_interp),
        "fraction_power": json_float(frac_power),
        "fraction_interp": json_float(frac_interp),
        "tokens_equivalent_interp": c_interp,
        "clean_tokens_equivalent": None, "clean_fraction": None, "fraction_relative": None,
        "extrapolated": extrapolation is not None,
        "extrapolation": extrapolation,
    }
    if clean_loss is not None:
        c_clean = law.invert(clean_loss) if fit == "power" else interp_tokens(C, L, clean_loss)
        c_main = c_star if fit == "power" else c_interp
        if c_clean is not None and math.isfinite(c_clean):
            out["clean_tokens_equivalent"] = c_clean
            out["clean_fraction"] = c_clean / total_tokens
            if c_main is not None and math.isfinite(c_main) and c_clean > 0:
                out["fraction_relative"] = c_main / c_clean
    return out


# ---- the metric ---------------------------------------------------------------------------------
@dataclass
class ComputeEquivalentConfig:
    """Settings of the compute-equivalent metric."""

    series: str | None = run_option(None)
    """Checkpoint series: crfm-gpt2-small, pythia-70m (any pythia-<size>[-deduped]) or a folder of
    checkpoints; None = the built-in series of the evaluated model, if it has one."""
    steps: tuple[int, ...] = run_option(())
    """Training steps of the hub series to measure; () = a default log-spaced subset (11-12 checkpoints)."""
    fit: str = "power"
    """'power': L(C) = a C^-b + c, inverted; 'interp': piecewise-linear in log C between checkpoints."""
    fit_min_frac: float = 0.01
    """Fit only checkpoints with at least this fraction of the full run's tokens: the default leaves
    out the learning-rate warmup (CRFM: 3,200 of 400k steps; Pythia: a hundredth of the run) and the
    initial plateau."""
    lm_batch_size: int = 8
    """Contexts per forward."""
    exclude_first: bool | None = run_option(None)
    """Leave the prediction at position 0 out; None = follow the SAE's cfg.exclude_first."""
    hook: str | None = run_option(None)
    """Hook to splice at; None = the SAE's cfg.hook_name."""
    progress: bool = run_option(False)
    """Show a progress bar over checkpoints."""

    def __post_init__(self) -> None:
        if self.fit not in ("power", "interp"):
            raise ValueError(f"fit must be 'power' or 'interp', got {self.fit!r}")
        if not 0 <= self.fit_min_frac < 1:
            raise ValueError(f"fit_min_frac must be in [0, 1), got {self.fit_min_frac}")


@torch.no_grad()
def run_compute_equivalent(lm, sae, tokens_NT: torch.Tensor, cfg: ComputeEquivalentConfig | None = None, *,
                           series: CheckpointSeries | None = None, spliced_loss: float | None = None,
                           clean_loss: float | None = None, cache_path: str | Path | None = None) -> dict[str, Any]:
    """Compute-equivalent of ``sae`` spliced into ``lm`` (module docstring).

    ``spliced_loss`` / ``clean_loss``: already measured on exactly these tokens and predictions
    (e.g. by the core eval); measured here when None. ``series`` overrides ``cfg.series``.
    """
    from saelab.evals._common import resolve_hook
    from saelab.evals.downstream import replace_from

    cfg = cfg or ComputeEquivalentConfig()
    t0 = time.perf_counter()
    tokens_NT = check_tokens(tokens_NT)
    hook = resolve_hook(lm, sae, cfg.hook)
    first = first_position(sae, cfg.exclude_first)
    if series is None:
        spec = cfg.series or series_for_model(lm.name)
        if spec is None:
            raise SeriesError(f"no checkpoint series given and none is known for model {lm.name!r}; pass one "
                              f"({', '.join(known_series_names()[:2])}, ... or a folder)")
        series = resolve_series(spec, cfg.steps, device=lm.device)
    if spliced_loss is None:
        spliced_loss, _ = mean_loss(lm, tokens_NT, first, {hook: replace_from(first, sae)}, cfg.lm_batch_size)
    if clean_loss is None:
        clean_loss, _ = mean_loss(lm, tokens_NT, first, lm_batch_size=cfg.lm_batch_size)
    t1 = time.perf_counter()
    points = checkpoint_losses(series, tokens_NT, first, lm_batch_size=cfg.lm_batch_size, cache_path=cache_path,
                               reference_tokenizer=lm.tokenizer, progress=cfg.progress)
    t2 = time.perf_counter()
    out = compute_equivalent(points, spliced_loss, total_tokens=series.total_tokens, clean_loss=clean_loss,
                             fit=cfg.fit, fit_min_frac=cfg.fit_min_frac, series_name=series.name)
    n_pred = tokens_NT.shape[0] * (tokens_NT.shape[1] - 1 - first)
    out = {"metric": "compute_equivalent", "hook": hook, "config": config_dict(cfg), "series": series.info(),
           **{k: v for k, v in out.items() if k != "metric"}, "n_predictions": n_pred,
           "checkpoint_s": t2 - t1, "wall_s": time.perf_counter() - t0}
    return out


__all__ = [
    "CRFM_TOKENS_PER_STEP", "CheckpointSeries", "ComputeEquivalentConfig", "PYTHIA_TOKENS_PER_STEP",
    "SeriesCheckpoint", "SeriesError", "checkpoint_losses", "compute_equivalent", "crfm_checkpoint_steps",
    "crfm_gpt2_small_series", "interp_tokens", "known_series_names", "local_series", "mean_loss",
    "pythia_checkpoint_steps", "pythia_series", "resolve_series", "run_compute_equivalent", "series_for_model",
]
