"""report.md for a run folder: configuration, evaluation table, plots, wall times."""

from __future__ import annotations

import math
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

from saelab.errors import CheckpointError
from saelab.evals.bootstrap import earlier_intervals, format_interval
from saelab.evals.core import INTERVAL_METHOD as CORE_INTERVALS, eval_settings
from saelab.report.plots import density_histogram, training_curves
from saelab.run_folder import (DENSITY_PLOT, EVAL_METRICS, EVALS_DIR, LATENT_FREQUENCIES, REPORT, SAE_DIR,
                               TRAIN_CONFIG, TRAINING_CURVES, LatentFrequencies, read_eval_metrics, read_json,
                               read_latent_frequencies, sae_sha256)
from saelab.sae import load_sae
from saelab.train.checkpoint import read_metrics, read_status
from saelab.train.config import TrainConfig
from saelab.train.trainer import INACTIVE_WINDOW
from saelab.utils.atomic import write_text
from saelab.utils.folder_lock import held_by
from saelab.utils.words import plural

METRIC_ROWS = [
    ("nmse", "nMSE (FVU), raw activation space", "{:.4f}"),
    ("nmse_sae_input", "nMSE in the SAE's input space (after its normalization; the paper's)", "{:.4f}"),
    ("l0", "L0 (active latents per token)", "{:.2f}"),
    ("dead_frac", "latents inactive on the eval tokens (never fired there; not the training-time dead window)",
     "{:.2%}"),
    ("dense_frac", "dense latents (fire on >10% of tokens)", "{:.2%}"),
    ("ce_clean", "CE loss, clean model (nats)", "{:.4f}"),
    ("ce_spliced", "CE loss, SAE spliced in (nats)", "{:.4f}"),
    ("delta_ce", "delta CE (spliced - clean)", "{:.4f}"),
    ("kl", "KL(clean || spliced) per prediction", "{:.4f}"),  # the mean over n_predictions, not the eval tokens
    ("ce_zero_abl", "CE loss, hook zero-ablated", "{:.4f}"),
    ("ce_mean_abl", "CE loss, hook mean-ablated", "{:.4f}"),
    ("ce_recovered_zero", "CE recovered vs zero-ablation", "{:.2%}"),
    ("ce_recovered_mean", "CE recovered vs mean-ablation", "{:.2%}"),
]


SUMMARY_WIDTH = 110
"""The widest line of a run's short summary (one line of ~200 characters was hard to read in a terminal)."""

HEADLINE_METRICS = ("nmse", "l0", "delta_ce", "kl", "ce_recovered_zero", "ce_recovered_mean")
"""The rows a run's short summary shows (quickstart's output); metrics.json and report.md hold the rest."""


def metric_rows(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """The evaluation table's rows of ``metrics`` (metrics.json or core.json's result), with the bootstrap
    interval of each sampled number; a measurement without a value (null; NaN in an earlier saelab's file)
    shows as "—" with why. ``keys``: only these rows (None: all)."""
    rows, intervals = [], metrics.get("intervals") or {}
    for key, label, fmt in METRIC_ROWS:
        if key in metrics and (keys is None or key in keys):
            value = metrics[key]
            rows.append((label, fmt.format(value) + format_interval(intervals.get(key), fmt)
                         if value is not None and math.isfinite(value) else "—" + _why_undefined(key, metrics)))
    return rows


def intervals_note(metrics: dict[str, Any]) -> list[str]:
    """What the table's [low, high] are, or why there are none (an earlier saelab's evaluation without them:
    :func:`earlier_intervals_note` says so)."""
    if "intervals" not in metrics:
        return []
    some = next((i for i in (metrics.get("intervals") or {}).values() if isinstance(i, dict) and i.get("n_boot")),
                None)
    if some is None or some.get("level") is None:
        groups = next((i.get("n_groups") for i in metrics["intervals"].values() if isinstance(i, dict)), None)
        return [] if groups is None else ["", f"No intervals: the eval contexts came from {groups:,} "
                                              f"{plural(groups, metrics.get('interval_groups', 'group').rstrip('s'))}."]
    over, caveat = _resampled(metrics)
    return ["", f"[low, high]: {some['level']:.0%} bootstrap intervals over {over}, {some['n_boot']:,} draws{caveat}."]


def _resampled(metrics: dict[str, Any]) -> tuple[str, str]:
    """What core's intervals resampled, with each part's count: the documents of its contexts, or the contexts
    themselves where they lie in one document or the corpus marks none (docs/evals.md: likely too narrow)."""
    count = {part: (metrics["intervals"].get(key) or {}).get("n_groups")
             for part, key in (("nMSE", "nmse"), ("the losses", "delta_ce"))}
    counts = "; ".join(f"{part}: {n:,}" for part, n in count.items() if isinstance(n, int))
    if metrics.get("interval_groups", "documents") == "documents":
        return f"the documents of the eval contexts ({counts} documents)", ""
    return (f"the eval contexts themselves ({counts} contexts)",
            "; likely too narrow, as the contexts lie in one document or the corpus marks none")


def measured_on(metrics: dict[str, Any]) -> str:
    """How much text core's metrics measured, as report.md, the paper report and quickstart's summary say it."""
    return (f"{metrics.get('n_tokens', 0):,} tokens for reconstruction, {metrics.get('n_predictions', 0):,} "
            "next-token predictions for the downstream loss")


def run_summary(run_dir: Path, metrics: dict[str, Any]) -> str:
    """A few lines on a terminal: the headline metrics with their intervals, the stages reused (quickstart's
    ``reused``), and where report.md and the full metrics.json lie (what quickstart prints at its end; ~140 lines
    of JSON buried the numbers). A line wider than :data:`SUMMARY_WIDTH` goes on indented below."""
    rows = metric_rows(metrics, HEADLINE_METRICS)
    width = max((len(label) for label, _ in rows), default=0)
    lines = [_wrapped("", f"Evaluated on {metrics.get('eval_text', 'held-out text')}: {measured_on(metrics)}"),
             *(_wrapped(f"  {label:<{width}}  ", value, indent=width + 4) for label, value in rows),
             *(_wrapped("", line) for line in intervals_note(metrics) if line),
             *([_wrapped("", f"reused: {', '.join(metrics['reused'])} (found done with these settings; --overwrite "
                             "trains and evaluates again, with --overwrite-activations harvests too)")]
               if metrics.get("reused") else []),
             f"report:  {Path(run_dir) / REPORT}",
             _wrapped(f"metrics: {Path(run_dir) / EVAL_METRICS} ", "(every measurement, the settings, the stage times)",
                      indent=len("metrics: "))]
    return "\n".join(lines)


def _wrapped(lead: str, text: str, indent: int = 2) -> str:
    """``lead`` and ``text`` in lines of at most SUMMARY_WIDTH characters, the lines after the first ``indent``
    spaces in; ``lead`` (a path, a table's label column) is never broken, nor a word (a number, an option)."""
    pad = " " * indent
    fill = partial(textwrap.fill, width=SUMMARY_WIDTH, subsequent_indent=pad, break_long_words=False,
                   break_on_hyphens=False)
    if len(lead) + len(text.split(" ", 1)[0]) <= SUMMARY_WIDTH:
        return fill(text, initial_indent=lead)
    return f"{lead.rstrip()}\n{fill(text, initial_indent=pad)}"  # a path wider than a line: text goes below


def earlier_intervals_note(result: dict[str, Any], method: str, again: str) -> list[str]:
    """The line under a result whose intervals (or their absence) are not the ones this saelab computes
    (``method``: its metric's now), which ``again`` computes anew: shown as it was written, beside new
    results, it says so; [] for a result of ``method``."""
    return earlier_note(earlier_intervals(result, method), again)


def earlier_note(earlier: str | None, again: str) -> list[str]:
    """The line under a result that an earlier saelab computed otherwise (``earlier``: how, None: it did not), which
    ``again`` computes anew."""
    return [] if earlier is None else ["", f"{earlier[0].upper()}{earlier[1:]}; {again}."]


def _why_undefined(key: str, metrics: dict[str, Any]) -> str:
    """Why CE recovered has no value: its ablation does not raise CE above the clean model's beyond noise."""
    kind = key.removeprefix("ce_recovered_")
    ablated, clean = metrics.get(f"ce_{kind}_abl"), metrics.get("ce_clean")
    if kind == key or ablated is None or clean is None:
        return ""
    rise = ablated - clean
    return (f" ({kind}-ablation does not raise CE above the clean model's: {rise:+.4f})" if rise <= 0 else
            f" ({kind}-ablation raises CE by {rise:+.4f}, within the noise of the eval contexts)")


def markdown_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table; a "|" inside a cell (e.g. "KL(clean || spliced)") is escaped, not a column break."""
    def cell(text: str) -> str:
        return str(text).replace("\\|", "|").replace("|", "\\|")
    return "| | |\n|---|---|\n" + "".join(f"| {cell(a)} | {cell(b)} |\n" for a, b in rows)


def _status_row(status: dict[str, Any], log: list[dict[str, Any]], holder: str | None) -> tuple[str, str]:
    """status.json is written only at checkpoints: while a training (``holder``) holds the run, its step is
    the metrics log's last one (or at least the last checkpoint's, before the first line is logged)."""
    of = f"of {status.get('total_steps', '?')}"
    if holder is None:
        return "status", f"{status.get('state', '?')} at step {status.get('step', '?')} {of}"
    step = log[-1]["step"] if log and "step" in log[-1] else f">= {status.get('step', 0)}"
    return "status", f"training now ({holder}), at step {step} {of}"


def _training_tokens(train: dict[str, Any]) -> str:
    """Whole batches only: a budget that is not a multiple of the batch trains the whole batches it holds."""
    trained = train["total_tokens"] // train["batch_size"] * train["batch_size"]
    asked = "" if trained == train["total_tokens"] else f" ({train['total_tokens']:,} asked: whole batches only)"
    return f"{trained:,} in batches of {train['batch_size']:,}{asked}"


def sparsity(train: dict[str, Any]) -> str | None:
    """None for a top-k SAE (its k says it); a ReLU SAE has no k (its train_config.json records the unused
    default): its sparsity comes from the L1 penalty."""
    return f"ReLU, L1 coefficient {train['l1_coefficient']}" if train.get("architecture") == "relu" else None


def _sparsity_row(train: dict[str, Any]) -> tuple[str, str]:
    relu = sparsity(train)
    if relu:
        return "latents n / sparsity", f"{train['n_latents']:,} / {relu}"
    return "latents n / k", f"{train['n_latents']:,} / {train['k']}"


def _dead_latents_and_ema_row(train: dict[str, Any]) -> tuple[str, str]:
    """AuxK and Multi-TopK act on a top-k SAE only: a ReLU SAE's row names its EMA alone."""
    if train.get("architecture") == "relu":
        return "EMA", _ema_words(train)
    return "AuxK / Multi-TopK / EMA", f"{_auxk_words(train)} / {train['multi_topk']} / {_ema_words(train)}"


def _auxk_words(train: dict[str, Any]) -> str:
    """AuxK with the k_aux that acted: a k_aux above the latent count takes every dead latent, which the row
    says rather than show a number no step could use."""
    if not train["auxk"]:
        return "False"  # k_aux acts on nothing then
    cfg = TrainConfig.from_dict(train)
    if cfg.effective_k_aux == cfg.k_aux:
        return f"True (k_aux={cfg.k_aux})"
    return (f"True (k_aux={cfg.effective_k_aux}: the {cfg.k_aux} set exceeds the SAE's {cfg.n_latents:,} latents, "
            "so AuxK takes every dead latent)")


def _lr_words(train: dict[str, Any]) -> str:
    """The learning rate training used, and the scaled rate --lr-max cut it from, when it did."""
    cfg = TrainConfig.from_dict(train)
    if not cfg.lr_capped:
        return f"{cfg.effective_lr:.3g}"
    return (f"{cfg.effective_lr:.3g} (capped by lr_max; lr_base {cfg.lr_base:g} scaled to {cfg.n_latents:,} latents "
            f"gives {cfg.scaled_lr:.3g})")


def _ema_words(train: dict[str, Any]) -> str:
    """The weights' moving average as a reader names it (a decay of None or 0 is none)."""
    return f"decay {train['ema_decay']}" if train.get("ema_decay") else "off"


def _recipe(train: dict[str, Any]) -> str:
    cfg = TrainConfig.from_dict(train)
    changes = cfg.changes_from_recipe()
    return f"`{cfg.recipe}`" + (", changed: " + ", ".join(f"{k}={v}" for k, v in changes.items()) if changes else "")


def _paper_suite_of(run_dir: Path, sae_hash: str) -> bool:
    """Whether run_dir/evals holds a paper-suite report of this very SAE (its hash ``sae_hash``; not of one
    evaluated --out here)."""
    index = run_dir / EVALS_DIR / "suite.json"
    if not (run_dir / EVALS_DIR / REPORT).exists() or not index.exists():
        return False
    return read_json(index, "paper-suite index").get("sae", {}).get("sha256") == sae_hash


RESULTS_CALLS = "calls behind these results"
"""How the report's wall-time rows name ``stage_seconds`` beside this call's seconds."""


def _wall_time_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """This call's seconds per stage, and where they differ the seconds summed over the calls whose work the
    results come from (``stage_seconds``: a reused or resumed stage, checks and a load repeated by such calls)."""
    wall, stages = metrics["wall_seconds"], metrics.get("stage_seconds", {})
    rows = []
    order = [s for s in wall if s != "total"] + [s for s in stages if s not in wall] + ["total"]
    for stage in (s for s in order if s in wall or s in stages):
        now = f"{wall[stage]:,.1f}" if stage in wall else "reused"
        before = stages.get(stage)
        same = before is None or before == wall.get(stage)
        rows.append((stage, now if same else f"{now} ({RESULTS_CALLS}: {before:,.1f})"))
    return rows


def frequencies_mismatch(saved: LatentFrequencies, folder: Path, n_latents: int, sae_hash: str,
                         settings: dict[str, Any], *, weights: str, evaluation: str) -> str | None:
    """Why the latent frequencies saved in ``folder`` do not belong with an evaluation's results (None: they
    do): another latent count than ``n_latents``, other weights than those hashed ``sae_hash`` (``weights``
    names them), or another evaluation than the one whose settings (``eval_settings``) are ``settings``
    (``evaluation`` names its file: one cut off between its two files)."""
    path = Path(folder) / LATENT_FREQUENCIES
    if saved.frequencies_N.numel() != n_latents:
        return (f"{path} holds {saved.frequencies_N.numel():,} frequencies for an SAE of {n_latents:,} "
                f"{plural(n_latents, 'latent')}")
    if saved.sae_sha256 != sae_hash:
        return f"{path} measured other SAE weights than {weights}"
    # saved before eval_settings held sample_pool_tokens: an evaluation of the first contexts (0)
    if {"sample_pool_tokens": 0, **saved.evaluation} != settings:
        return f"{path} comes from another evaluation than {evaluation}"
    return None


def _redraw_density(run_dir: Path, sae, sae_hash: str, metrics: dict[str, Any],
                    drawn_by: dict[str, Any] | None) -> str | None:
    """Draw density.png again from the latent frequencies the evaluation saved, unless ``drawn_by`` (the
    metrics of the evaluation that has just drawn it) saved them; returns why it was not drawn (None:
    drawn, just drawn, or the run was never evaluated)."""
    if not (run_dir / EVAL_METRICS).exists():
        return None
    again = f"`saelab eval {run_dir} --overwrite` evaluates the SAE again and saves its latent frequencies"
    if not metrics:  # read_eval_metrics dropped them: they describe other weights
        return f"{EVAL_METRICS} describes other SAE weights than {SAE_DIR}/ (the SAE changed since); {again}"
    try:
        saved = read_latent_frequencies(run_dir)
    except CheckpointError as e:
        return str(e)
    if saved is None:
        return (f"{run_dir / LATENT_FREQUENCIES} is missing (the run was evaluated before saelab saved the "
                f"latents' firing frequencies); {again}")
    other = frequencies_mismatch(saved, run_dir, sae.n_latents, sae_hash, eval_settings(metrics),
                                 weights=f"{SAE_DIR}/", evaluation=EVAL_METRICS)
    if other:
        return f"{other}; {again}"
    if drawn_by is not None and drawn_by.get("sae_sha256") == saved.sae_sha256 \
            and eval_settings(drawn_by) == saved.evaluation:
        return None  # the evaluation that saved these frequencies drew them a moment ago
    density_histogram(saved.frequencies_N, run_dir / DENSITY_PLOT, saved.evaluation["n_tokens"])
    return None


def write_run_report(run_dir: str | Path, *, density_drawn_by: dict[str, Any] | None = None,
                     sae_hash: str | None = None, sae=None) -> Path:
    """report.md of a run folder; evaluation metrics appear only when they describe its current SAE.
    training_curves.png is drawn again from the training log, density.png from the latent frequencies
    the evaluation saved (when they describe this SAE and metrics.json's evaluation; else one line says why not).
    ``density_drawn_by``: the metrics an evaluation of the run returned after drawing density.png, so the
    report does not draw the same plot again. ``sae_hash``: :func:`sae_sha256` of the run's SAE when the
    caller has it already (an evaluation of the run has just hashed it); ``sae``: the run's SAE when the
    caller has loaded it (not loaded again)."""
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / TRAIN_CONFIG, "training config")
    sae_cfg, train = cfg["sae"], cfg["train"]
    metrics: dict[str, Any] = {}
    if sae is None and (run_dir / SAE_DIR).is_dir():
        sae = load_sae(run_dir / SAE_DIR)
    sae_hash = (sae_hash or sae_sha256(sae)) if sae is not None else ""  # once: it reads every weight
    if sae is not None:
        metrics = read_eval_metrics(run_dir, sae, sae_hash=sae_hash)
        not_redrawn = _redraw_density(run_dir, sae, sae_hash, metrics, density_drawn_by)
        if not_redrawn:
            print(f"saelab: note: {DENSITY_PLOT} not redrawn: {not_redrawn}", file=sys.stderr)
    log = read_metrics(run_dir)
    status = read_status(run_dir)
    finished = status.get("state") == "finished"
    # a training in progress: its checkpoint's status lags (a finished run's lock is an evaluation's)
    holder = None if finished else held_by(run_dir)

    lines = [f"# SAE run `{run_dir.name}`", ""]
    lines += ["## Setup", "", markdown_table([
        ("model", f"`{sae_cfg['model_name']}`"), ("hook", f"`{sae_cfg['hook_name']}`"),
        _sparsity_row(train),
        ("training tokens", _training_tokens(train)),
        ("context", f"{sae_cfg['context_size']} tokens, BOS first: {sae_cfg['prepend_bos']}, "
                    f"position 0 excluded: {sae_cfg['exclude_first']}"),
        ("corpus", f"`{sae_cfg['dataset']}`"),
        ("recipe", _recipe(train)),
        ("learning rate", _lr_words(train)),
        _dead_latents_and_ema_row(train),
        ("seed", f"{train['seed']}"),
        _status_row(status, log, holder),
    ]), ""]
    if metrics:
        lines += [f"## Evaluation on {metrics.get('eval_text', 'held-out text')}", "",
                  f"Eval corpus `{metrics.get('eval_corpus')}`: {measured_on(metrics)} (context "
                  f"{metrics.get('context_size')}, position 0 {metrics.get('position_0')}).", ""]
        lines += [markdown_table(metric_rows(metrics)), *intervals_note(metrics),
                  *earlier_intervals_note(metrics, CORE_INTERVALS, "`saelab eval RUN` evaluates it anew"), ""]
    if log:
        training_curves(log, run_dir / TRAINING_CURVES)
        last = log[-1]
        # Every latent counts as fired at the start, so a run shorter than the window has none inactive yet.
        inactive = (f"{last['inactive_frac']:.2%}" if last.get("tokens", 0) >= INACTIVE_WINDOW
                    else f"not measured (the run saw {last.get('tokens', 0):,} tokens)")
        lines += ["## Training", "", f"{'Final' if finished else 'Latest'} batch nMSE {last['nmse']:.4f}, L0 {last['l0']:.1f}, "
                  f"latents dead in the training window (AuxK) {last.get('dead_frac', 0):.2%}, not fired in the last "
                  f"{INACTIVE_WINDOW:,} training tokens: {inactive}, throughput {last['tokens_per_s']:,.0f} tokens/s.", "",
                  "![training curves](training_curves.png)", ""]
    if metrics and (run_dir / DENSITY_PLOT).exists():
        lines += ["![latent density](density.png)", ""]
    if sae is not None and _paper_suite_of(run_dir, sae_hash):
        lines += ["## Paper metrics", "", "Compute-equivalent, ablation sparsity, probe loss and N2G: "
                  "[evals/report.md](evals/report.md) (`saelab eval RUN --suite paper`).", ""]
    if metrics.get("wall_seconds"):
        rows = _wall_time_rows(metrics)
        lines += ["## Wall time (s)", "", markdown_table(rows), ""]
        if metrics.get("reused"):
            lines += [f"Reused from an earlier run of the same settings: {', '.join(metrics['reused'])}.", ""]
        if any(RESULTS_CALLS in text for _, text in rows):
            lines += [f"\"{RESULTS_CALLS}\": the seconds a stage took summed over the calls whose work these results "
                      "come from (a resumed training counts each call; an overwrite starts the count again for what "
                      "it replaces; a call that found every stage done, none).", ""]
    path = run_dir / REPORT
    write_text(path, "\n".join(lines))
    return path
