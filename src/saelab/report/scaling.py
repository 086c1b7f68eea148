"""Scaling study of a sweep folder (``saelab report SWEEP_DIR``): nMSE against latents, per k.

Every run folder in the sweep (``saelab sweep --out SWEEP_DIR``) that has been evaluated
(``metrics.json``, from ``saelab eval SWEEP_DIR`` or ``saelab sweep --eval``) is one point. All
points must come from evaluations with the same settings (model, hook, eval corpus, context size,
position 0, number of reconstruction tokens and of next-token predictions): a run evaluated
otherwise (e.g. by ``--suite paper`` with other sizes) is refused by name, since its nMSE and
delta CE are not the same measurement. Runs are grouped by k (a ReLU SAE has none: by its L1
coefficient), training tokens and any other training setting that varies across the sweep, such as lr
(points trained on different budgets or recipes are not mixed in one curve). A run with the same
weights and training config as another (one SAE trained twice under two names) is that run's copy
(``copy_of``), counted once. A run whose metrics.json describes other weights than its sae/ is left
out (``other_weights``), as its report.md leaves that evaluation out. Each group with at least 3 sizes
is fitted with

    nMSE(n) = a * n^(-alpha) + c

(``saelab.evals.power_law``: log-space residuals, scipy least squares). alpha comes with its
standard error and a 95 % profile-likelihood interval (a and c refitted for each alpha; undefined
with 3 sizes, possibly unbounded with 4 or 5, where c can absorb the decline). Beside it,
``alpha_pure`` is the slope of a floor-free power law ``a n^-alpha`` (log-log least squares), which
stays meaningful with few sizes. A group whose nMSE stops falling with n (larger SAEs undertrained
at the budget) is flagged ``monotone: false``; its alpha says nothing. The nMSE fitted is
``nmse_sae_input``, in the SAE's input space (after its input normalization: LayerNorm in the paper
recipe), the quantity of the paper's Figure 1 (there at convergence; here at the sweep's token
budget, so large n trained on few tokens per latent bend the curve up). A group with a run whose
metrics.json predates ``nmse_sae_input`` is fitted on the raw-space ``nmse`` instead (``nmse_space:
"raw"``, and its note names those runs): for an SAE with input normalization that is another
quantity, in which tokens of large norm weigh more. The spliced LM loss is shown beside it; its
log-log slope in n is reported (a pure power law, for the shape only).

Two different "dead" numbers are kept apart: ``eval_inactive_frac`` (latents that never fired on
the ``eval_tokens`` evaluation tokens) and ``train_dead_frac`` (latents that had not fired within
the trainer's dead window, ``train_dead_window`` tokens, at the last logged step: the latents AuxK
was training).

Outputs, in the sweep folder::

    scaling.json         {sweep, eval_settings, runs: [{run, n_latents, k (null: ReLU), sparsity (ReLU: its L1
                          coefficient; null: top-k), total_tokens, nmse, nmse_sae_input (null: an earlier
                          saelab's metrics.json), delta_ce, l0,
                          eval_inactive_frac, eval_tokens, train_dead_frac, train_dead_window, ce_clean,
                          ce_spliced, sae_sha256, copy_of: run | null, settings: {varying training setting:
                          value}}], unevaluated: [run names], other_weights: [the unevaluated runs whose
                          metrics.json describes other weights than sae/], unfinished: [runs whose
                          training has not finished (no sae/ yet)],
                          fits: {label: {k, sparsity, total_tokens, settings, n, nmse (the values fitted),
                          nmse_space ("sae_input", the paper's; "raw" where a run lacks it), runs,
                          copies: {run: the run it copies}, fitted, alpha, alpha_se,
                          alpha_interval: [low|null, high|null] | null, alpha_interval_note, interval_level,
                          a, c, c_se, rmse_log, dof, residuals: [{n, nmse, fitted, residual_log}],
                          alpha_pure, monotone, delta_ce_slope, note}}}
                         (a group not fitted has fitted: false and a note; a null interval end is unbounded)
    scaling_nmse.png     nMSE vs n, log-log, one line per k with its fitted curve
    scaling_delta_loss.png   delta CE vs n, one line per k
    scaling.md           the same as tables
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import ConfigError, SaelabError
from saelab.evals.core import eval_settings
from saelab.evals.power_law import fit_power_law
from saelab.report.markdown import sparsity
from saelab.run_folder import (EVAL_METRICS, SAE_DIR, TRAIN_CONFIG, SaeHashes, check_sweep_has_finished_runs,
                               read_eval_metrics, read_json, sweep_runs, unfinished_sweep_runs)
from saelab.train.checkpoint import read_metrics, training_changes
from saelab.train.config import TrainConfig
from saelab.utils.atomic import replacing_entries, write_json, write_text
from saelab.utils.figures import figure, save_figure

METRIC_KEYS = ("nmse", "nmse_sae_input", "delta_ce", "l0", "ce_clean", "ce_spliced")

FITTED_SPACES = {"sae_input": "nMSE in the SAE's input space (the paper's)",
                 "raw": "raw-space nMSE (metrics.json without nmse_sae_input)"}
"""What a fit's nMSE is: the paper's quantity, or the raw-space one where an earlier saelab's metrics.json lacks it."""


def _training_dead(run: Path, train: dict[str, Any]) -> tuple[float | None, int | None]:
    """(fraction of latents dead in the trainer's window at the last logged step, that window in tokens)."""
    log = [r for r in read_metrics(run) if "dead_frac" in r]
    try:
        window = TrainConfig.from_dict(train).effective_dead_tokens
    except ConfigError:  # written by another saelab version: the window cannot be recomputed
        window = train.get("dead_tokens")
    return (float(log[-1]["dead_frac"]) if log else None), window


def collect_runs(sweep_dir: str | Path, sae_hashes: SaeHashes | None = None
                 ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(evaluated runs as rows, names of runs without metrics.json, names of runs whose metrics.json
    describes other weights than their sae/) of a sweep folder. ``sae_hashes``: the runs' SAEs as an
    evaluation of the sweep just hashed them (a run's sae/ written since is hashed again).

    Each row carries ``eval_settings``: what its evaluation must share with the others'."""
    rows, missing, stale = [], [], []
    sae_hashes = sae_hashes or SaeHashes()
    for run in sweep_runs(sweep_dir):
        train = read_json(run / TRAIN_CONFIG, "training config")["train"]
        if not (run / EVAL_METRICS).exists():
            missing.append(run.name)
            continue
        sae_hash = sae_hashes.of(run)
        m = read_eval_metrics(run, sae_hash=sae_hash)  # {} for other weights, as the run's report.md reads it
        if not m:
            stale.append(run.name)
            continue
        dead, window = _training_dead(run, train)
        rows.append({"run": run.name, "sae_sha256": sae_hash, "n_latents": int(train["n_latents"]),
                     "k": None if sparsity(train) else int(train["k"]), "sparsity": sparsity(train),
                     "total_tokens": int(train["total_tokens"]), **{key: m.get(key) for key in METRIC_KEYS},
                     "eval_inactive_frac": m.get("dead_frac"), "eval_tokens": m.get("n_tokens"),
                     "train_dead_frac": dead, "train_dead_window": window, "eval_settings": eval_settings(m),
                     "settings": train})
    # Each row keeps the training settings that vary across the sweep (beyond n, k and the budget):
    # runs that differ in one (an lr grid, say) are separate curves.
    varying = sorted({key for r in rows for key in r["settings"]
                      if key not in _NOT_A_GROUP and len({json.dumps(q["settings"].get(key)) for q in rows}) > 1})
    _mark_copies(rows)
    for r in rows:
        r["settings"] = {key: r["settings"].get(key) for key in varying}
    return rows, missing, stale


def _mark_copies(rows: list[dict[str, Any]]) -> None:
    """Give each row that repeats an earlier one (same weights, same training config: one SAE trained
    twice under two names) ``copy_of``, that row's run, so that a fit counts the SAE once."""
    for i, r in enumerate(rows):
        r["copy_of"] = next((q["run"] for q in rows[:i] if q.get("copy_of") is None
                             and q["sae_sha256"] == r["sae_sha256"]
                             and not training_changes({"train": q["settings"]}, {"train": r["settings"]})), None)


_NOT_A_GROUP = ("n_latents", "k", "architecture", "l1_coefficient", "total_tokens", "checkpoint_every", "log_every")
"""Training settings that do not split runs into groups: the curve's variable, the group keys of their
own (k, or a ReLU SAE's L1 coefficient, and the budget), and bookkeeping."""


def _show(value: Any) -> str:
    if value is None:
        return "not recorded"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _difference(key: str, values: dict[str, Any]) -> str | None:
    """'KEY differs (VALUE: run, run; VALUE: run)' when the runs' ``values`` (by run name) are not all one."""
    by_value: dict[str, list[str]] = defaultdict(list)
    for run, value in values.items():
        by_value[_show(value)].append(run)
    if len(by_value) < 2:
        return None
    parts = "; ".join(f"{v}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                      for v, names in by_value.items())
    return f"{key} differs ({parts})"


SWEEP_ACTIVATIONS = ("model_name", "hook_name", "context_size", "prepend_bos", "exclude_first", "dataset")
"""What the runs of one sweep share: the settings of the activation cache they were all trained on. A
sweep writes no file of its own beside its runs, so these (each run's train_config.json) tell a sweep
from a folder that gathers unrelated runs, whose nMSE do not lie on one curve."""


def sweep_difference(folder: str | Path) -> str | None:
    """None when the runs of ``folder`` were trained on activations of one kind (a sweep); else the first
    setting that differs, with the runs of each value."""
    configs = {run.name: read_json(run / TRAIN_CONFIG, "training config").get("sae", {}) for run in sweep_runs(folder)}
    differences = (_difference(key, {run: sae.get(key) for run, sae in configs.items()}) for key in SWEEP_ACTIVATIONS)
    return next((d for d in differences if d), None)


def check_eval_settings(rows: list[dict[str, Any]], folder: str | Path) -> dict[str, Any]:
    """The eval settings all rows share; SaelabError naming the runs and the setting when they differ."""
    keys = list(dict.fromkeys(key for r in rows for key in r["eval_settings"]))
    for key in keys:
        differs = _difference(key, {r["run"]: r["eval_settings"].get(key) for r in rows})
        if differs:
            raise SaelabError(f"sweep folder {folder} mixes evaluations: {differs}; their nMSE and "
                              f"delta CE cannot share one fit: re-evaluate every run with one setting, "
                              f"`saelab eval {folder} --overwrite` (with the eval options you want)")
    return {key: rows[0]["eval_settings"].get(key) for key in keys}


def _sparsity_of(r: dict[str, Any]) -> str:
    """A row's k as its run's report.md gives it: 'k=32', or a ReLU SAE's L1 coefficient (it has no k)."""
    return r.get("sparsity") or f"k={r['k']}"


def _label(sparse: str, tokens: int, several_budgets: bool, settings: dict[str, Any]) -> str:
    return (sparse + (f", {tokens / 1e6:.3g}M tokens" if several_budgets else "")
            + "".join(f", {key}={value}" for key, value in settings.items()))


def _fit_group(n: list[int], y: list[float], what: str) -> dict[str, Any]:
    """The power-law fit of one group's nMSE(n), with its interval, floor-free slope and notes."""
    law = fit_power_law(n, y, what=what)
    fitted = [float(v) for v in law(np.asarray(n, dtype=np.float64))]
    stops = next((i for i in range(len(y) - 1) if y[i + 1] >= y[i]), None)
    monotone = stops is None
    notes = [] if monotone else [
        f"nMSE stops falling from n = {n[stops]:,} to {n[stops + 1]:,} ({y[stops]:.4f} -> {y[stops + 1]:.4f}; "
        "larger SAEs undertrained at this budget?), so alpha is not meaningful"]
    if len(n) == 3:  # three parameters fit three points exactly, unless the floor c >= 0 holds the fit back
        # a curve of this form falls, or rises, all along: one that changes direction cannot pass through them all
        misses = "no curve of this form changes direction" if not monotone else "the floor c cannot go below 0"
        notes.append("3 sizes for 3 parameters: the curve passes through them" if law.rmse_log < 1e-6 else
                     f"3 sizes for 3 parameters, yet the curve misses them: {misses} "
                     f"(rms log residual {law.rmse_log:.2g})")
    return dict(fitted=True, alpha=law.alpha, alpha_se=law.alpha_se, alpha_interval=law.alpha_interval,
                alpha_interval_note=law.alpha_interval_note, interval_level=law.interval_level,
                a=law.a, c=law.c, c_se=law.c_se, rmse_log=law.rmse_log, dof=len(n) - 3, fitted_nmse=fitted,
                residuals=[{"n": a, "nmse": b, "fitted": f, "residual_log": e}
                           for a, b, f, e in zip(n, y, fitted, law.residuals_log)],
                alpha_pure=fit_power_law(n, y, irreducible=False, interval_level=None).alpha,
                monotone=monotone, note="; ".join(notes) or None)


def fit_scaling(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One nMSE(n) power law per (k, training tokens, other varying settings) group of runs (see the
    module docstring)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["nmse"] is not None and r.get("copy_of") is None:  # a copy would be a second point of one SAE
            # top-k curves by k first, then ReLU ones by their L1 coefficient
            order = (r["k"] is None, r["k"] or 0, _sparsity_of(r))
            groups[(order, r["total_tokens"], json.dumps(r.get("settings", {}), sort_keys=True))].append(r)
    several = len({t for _, t, _ in groups}) > 1
    fits = {}
    for ((_, _, sparse), tokens, _), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["n_latents"])
        space, older = _fitted_space(rs)
        n, y = [r["n_latents"] for r in rs], [r["nmse_sae_input" if space == "sae_input" else "nmse"] for r in rs]
        settings = rs[0].get("settings", {})
        label = _label(sparse, tokens, several, settings)
        runs = [r["run"] for r in rs]
        out: dict[str, Any] = {"k": rs[0]["k"], "sparsity": rs[0].get("sparsity"), "total_tokens": tokens,
                               "settings": settings, "n": n, "nmse": y, "nmse_space": space, "runs": runs,
                               "copies": {r["run"]: r["copy_of"] for r in rows if r.get("copy_of") in runs}}
        if len(set(n)) < 3:
            out.update(fitted=False, note=f"needs 3 sizes to fit a + c, has {len(set(n))}")
        else:
            out.update(_fit_group(n, y, f"nMSE of the {label} runs"))
        if older:
            out["note"] = "; ".join(s for s in (out["note"], f"{FITTED_SPACES['raw']}: {', '.join(older)}; `saelab "
                                                "eval SWEEP_DIR --overwrite` records the SAE-input-space one") if s)
        d = [(r["n_latents"], r["delta_ce"]) for r in rs if r["delta_ce"] is not None]
        out["delta_ce_slope"] = None
        if len(d) >= 2 and all(v > 0 for _, v in d) and len({a for a, _ in d}) >= 2:
            out["delta_ce_slope"] = -fit_power_law([a for a, _ in d], [v for _, v in d], irreducible=False,
                                                   interval_level=None).alpha
        fits[label] = out
    return fits


def _fitted_space(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """("sae_input", []) where every run recorded the paper's nMSE; else ("raw", the runs that did not): one
    curve is fitted on one quantity."""
    older = [r["run"] for r in rows if r.get("nmse_sae_input") is None]
    return ("raw", older) if older else ("sae_input", [])


# ---- plots ------------------------------------------------------------------------------------------
def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _colors() -> list[str]:
    from matplotlib import rcParams  # read only: the default colour cycle

    return rcParams["axes.prop_cycle"].by_key()["color"]


def _nmse_plot(fits: dict[str, dict], path: Path) -> Path:
    colors = _colors()
    fig, ax = figure(figsize=(7, 4.5))
    ys = [v for f in fits.values() for v in f["nmse"]]
    for i, (label, f) in enumerate(fits.items()):
        col = colors[i % len(colors)]
        ax.scatter(f["n"], f["nmse"], color=col, zorder=3)
        if f["fitted"]:
            grid = np.logspace(math.log10(min(f["n"])) - 0.08, math.log10(max(f["n"])) + 0.08, 100)
            tag = ("" if f["monotone"] else " (not monotone: fit meaningless)") + _space_tag(f)
            ax.plot(grid, f["a"] * grid ** -f["alpha"] + f["c"], color=col, ls="--" if f["monotone"] else ":",
                    label=f"{label}: alpha {f['alpha']:.3g}, c {f['c']:.3f}{tag}")
        else:
            ax.plot(f["n"], f["nmse"], color=col, label=f"{label} (not fitted: {f['note']})")
    raw = all(f.get("nmse_space") == "raw" for f in fits.values())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(min(ys) / 1.25, max(ys) * 1.25)
    _plain_log_ticks(ax)
    ax.set_xlabel("latents n")
    ax.set_ylabel("normalized MSE (held-out)" + (", raw space" if raw else ", SAE input space"))
    ax.set_title("nMSE against SAE size, one line per k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _space_tag(f: dict[str, Any]) -> str:
    """A legend's mark of a curve fitted on the raw-space nMSE (not the paper's quantity)."""
    return " [raw-space nMSE]" if f.get("nmse_space") == "raw" else ""


def _delta_loss_plot(fits: dict[str, dict], rows: list[dict], path: Path) -> Path:
    colors = _colors()
    fig, ax = figure(figsize=(7, 4.5))
    positive = True
    for i, (label, f) in enumerate(fits.items()):
        pts = sorted((r["n_latents"], r["delta_ce"]) for r in rows
                     if r["run"] in f["runs"] and r["delta_ce"] is not None)
        if pts:
            positive &= all(v > 0 for _, v in pts)
            slope = f.get("delta_ce_slope")
            ax.plot([a for a, _ in pts], [v for _, v in pts], marker="o", color=colors[i % len(colors)],
                    label=label + (f" (slope {slope:.3f})" if slope is not None else ""))
    ax.set_xscale("log", base=2)
    if positive:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.set_xlabel("latents n")
    ax.set_ylabel("delta CE, SAE spliced - clean (nats)")
    ax.set_title("Spliced LM loss increase against SAE size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---- the report -------------------------------------------------------------------------------------
def _interval_text(f: dict[str, Any]) -> str:
    if f["alpha_interval"] is None:
        return "undefined" + (" (3 sizes)" if f["dof"] == 0 else "")
    low, high = f["alpha_interval"]
    return (f"{'(-inf' if low is None else f'[{low:.3f}'}, {'inf)' if high is None else f'{high:.3f}]'}")


def _fits_table(fits: dict[str, dict]) -> list[str]:
    lines = ["| group | sizes n | alpha ± SE | alpha 95 % interval (profile) | alpha without c (log-log slope) "
             "| a | c | rms log residual | delta CE slope | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, f in fits.items():
        sizes = ", ".join(f"2^{int(round(math.log2(v)))}" if v & (v - 1) == 0 else str(v) for v in f["n"])
        if not f["fitted"]:
            lines.append(f"| {label} | {sizes} | — | — | — | — | — | — | — | {f['note']} |")
            continue
        se = f" ± {f['alpha_se']:.3f}" if f["alpha_se"] is not None else ""
        slope = "—" if f["delta_ce_slope"] is None else f"{f['delta_ce_slope']:.4f}"
        note = "; ".join(s for s in (f["note"], f["alpha_interval_note"] if f["dof"] > 0 else None) if s)
        meaningless = "" if f["monotone"] else " (not meaningful: see the note)"
        lines.append(f"| {label} | {sizes} | {f['alpha']:.4f}{se}{meaningless} | {_interval_text(f)} | "
                     f"{f['alpha_pure']:.4f} | "
                     f"{f['a']:.4g} | {f['c']:.4f} | {f['rmse_log']:.4f} | {slope} | {note} |")
    return lines


def _runs_table(rows: list[dict[str, Any]], eval_tokens: int | None) -> list[str]:
    fmt = lambda v, f="{:.4f}": "—" if v is None else f.format(v)  # noqa: E731
    eval_head = f"inactive on the {eval_tokens:,} eval tokens" if eval_tokens else "inactive on the eval tokens"
    lines = [f"| run | n | k | tokens | nMSE, SAE input space | nMSE, raw | delta CE | L0 | {eval_head} "
             "| dead at end of training | training dead window (tokens) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["k"] is None, r["k"] or 0, _sparsity_of(r), r["n_latents"])):
        run = r["run"] + (f" (copy of {r['copy_of']})" if r.get("copy_of") else "")
        lines.append(f"| {run} | {r['n_latents']:,} | {r.get('sparsity') or r['k']} | {r['total_tokens']:,} | "
                     f"{fmt(r.get('nmse_sae_input'))} | {fmt(r['nmse'])} | {fmt(r['delta_ce'])} | {fmt(r['l0'], '{:.1f}')} | "
                     f"{fmt(r['eval_inactive_frac'], '{:.2%}')} | "
                     f"{fmt(r['train_dead_frac'], '{:.2%}')} | {fmt(r['train_dead_window'], '{:,}')} |")
    return lines


def _markdown(folder: Path, fits: dict, rows: list[dict], missing: list[str], stale: list[str],
              settings: dict, unfinished: list[str]) -> str:
    shown = ", ".join(f"{k} {_show(v)}" for k, v in settings.items())
    lines = [f"# Scaling study `{folder.name}`", "",
             "nMSE(n) = a n^-alpha + c fitted per k (log-space residuals); held-out nMSE from each run's metrics.json, "
             f"every run evaluated alike ({shown}). The nMSE fitted is the paper's, in the SAE's input space (after "
             "its input normalization; `nmse_sae_input`); a group whose metrics.json lack it is fitted on the raw-space "
             "nMSE and its note says so.", "",
             "alpha's interval is the profile-likelihood one (a and c refitted for each alpha; F threshold with the "
             "fit's residual variance): undefined with 3 sizes, open-ended where the floor c can absorb the decline.",
             "", *_fits_table(fits), "",
             "Two kinds of dead latents: *inactive on the eval tokens* never fired on the evaluation text; "
             "*dead at end of training* had not fired within the trainer's dead window (the latents AuxK trains) "
             "at its last logged step.", "", *_runs_table(rows, settings.get("n_tokens"))]
    copies = [f"{r['run']} = {r['copy_of']}" for r in rows if r.get("copy_of")]
    if copies:
        lines += ["", "Copies, counted once (same training config and weights, trained under two names): "
                  f"{', '.join(copies)}."]
    if missing:
        lines += ["", f"Not evaluated (no metrics.json): {', '.join(missing)}."]
    if stale:
        lines += ["", f"Not evaluated ({EVAL_METRICS} describes other weights than {SAE_DIR}/; run `saelab eval "
                  f"{folder}`): {', '.join(stale)}."]
    if unfinished:
        lines += ["", f"Not finished training (no {SAE_DIR}/ yet; run the same `saelab sweep` or `saelab train` command "
                  f"again, then `saelab eval {folder}`): {', '.join(unfinished)}."]
    lines += ["", "![nMSE vs n](scaling_nmse.png)", "", "![delta CE vs n](scaling_delta_loss.png)", ""]
    return "\n".join(lines)


SCALING_FILES = ("scaling.md", "scaling.json", "scaling_nmse.png", "scaling_delta_loss.png")
"""What a scaling study writes in the sweep folder."""


def remove_scaling_study(folder: str | Path) -> list[str]:
    """Remove the scaling study an earlier report wrote in ``folder`` (all its files, or on an interruption
    none: they go through the set-aside a replacement uses), so that no study is left that the runs no
    longer make; returns the names removed."""
    present = [name for name in SCALING_FILES if (Path(folder) / name).exists()]
    if present:
        with replacing_entries(folder, present):
            pass  # nothing replaces them: the block's end removes the set-aside
    return present


def _names(runs: list[str]) -> str:
    return f"{', '.join(runs[:6])}{', ...' if len(runs) > 6 else ''}"


def _refuse_keeping_study(folder: Path, error: SaelabError) -> None:
    """Raise ``error``, refusing a study of ``folder``; a refusal destroys nothing: an earlier study there
    stays, and is said to be of earlier evaluations (of runs an overwrite may since have replaced)."""
    present = [name for name in SCALING_FILES if (folder / name).exists()]
    if not present:
        raise error
    raise SaelabError(f"{error}; the scaling study there ({', '.join(present)}) is of earlier evaluations, and "
                      "stays until a report replaces it") from None


def check_study_has_finished_runs(folder: str | Path) -> None:
    """Refuse a study of a sweep cut off before any run finished (an interrupted --overwrite too), naming its
    unfinished runs, and saying that an earlier study there (of the runs replaced) stays."""
    if not sweep_runs(folder) and unfinished_sweep_runs(folder):
        try:
            check_sweep_has_finished_runs(folder)
        except SaelabError as e:
            _refuse_keeping_study(Path(folder), e)


def write_scaling_report(sweep_dir: str | Path, *, sae_hashes: SaeHashes | None = None) -> dict[str, Any]:
    """Read every run of ``sweep_dir``, check they were evaluated alike, fit, and write scaling.json,
    the two plots and scaling.md. ``sae_hashes``: as :func:`collect_runs` takes it."""
    folder = Path(sweep_dir)
    check_study_has_finished_runs(folder)
    rows, missing, stale = collect_runs(folder, sae_hashes)
    if stale:
        print(f"saelab: note: {EVAL_METRICS} of {_names(stale)} describes other weights than {SAE_DIR}/ (the SAE "
              f"changed since): left out of the scaling study; run `saelab eval {folder}`", file=sys.stderr)
    if not rows:
        what = "; ".join([f"its runs ({_names(missing)}) have no metrics.json"] * bool(missing)
                         + [f"the {EVAL_METRICS} of {_names(stale)} describes other weights"] * bool(stale))
        what = what or "it holds no run folders"
        _refuse_keeping_study(folder, SaelabError(f"sweep folder {folder} has no evaluated runs: {what}; run "
                                                  f"`saelab eval {folder}` first"))
    try:
        settings = check_eval_settings(rows, folder)
    except SaelabError as e:
        _refuse_keeping_study(folder, e)
    rows = [{k: v for k, v in r.items() if k != "eval_settings"} for r in rows]
    fits = fit_scaling(rows)
    unfinished = [run.name for run in unfinished_sweep_runs(folder)]
    result = {"sweep": str(folder), "eval_settings": settings, "runs": rows, "unevaluated": missing + stale,
              "other_weights": stale, "unfinished": unfinished, "fits": fits}
    with replacing_entries(folder, SCALING_FILES):  # one study, whole: an interruption puts the earlier one back
        write_json(folder / "scaling.json", result)
        _nmse_plot(fits, folder / "scaling_nmse.png")
        _delta_loss_plot(fits, rows, folder / "scaling_delta_loss.png")
        write_text(folder / "scaling.md", _markdown(folder, fits, rows, missing, stale, settings, unfinished))
    return result


__all__ = ["SCALING_FILES", "check_eval_settings", "check_study_has_finished_runs", "collect_runs", "fit_scaling", "remove_scaling_study",
           "sweep_difference", "write_scaling_report"]
