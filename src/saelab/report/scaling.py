"""Scaling study of a sweep folder (``saelab report SWEEP_DIR``): nMSE against latents, per k.

Every run folder in the sweep (``saelab sweep --out SWEEP_DIR``) that has been evaluated
(``metrics.json``, from ``saelab eval SWEEP_DIR`` or ``saelab sweep --eval``) is one point. Runs
are grouped by k and training tokens (points trained on different budgets are not mixed in one
curve); each group with at least 3 sizes is fitted with

    nMSE(n) = a * n^(-alpha) + c

(``saelab.evals.power_law``: log-space residuals, profile over the irreducible term c, then
Levenberg-Marquardt; alpha's standard error from the fit's residuals). Beside it, ``alpha_pure``
is the slope of a floor-free power law ``a n^-alpha`` (log-log least squares), which stays
meaningful with few sizes. A group whose nMSE does not fall with n (larger SAEs undertrained at
the budget) is flagged ``monotone: false``; its alpha says nothing. The paper's Figure 1
plots the same (their "normalized MSE" at convergence; here at the sweep's token budget, so large
n trained on few tokens per latent bend the curve up, a lower bound on what alpha would be at
convergence). The spliced LM loss is shown beside it; its log-log slope in n is reported (a pure
power law, for the shape only).

Outputs, in the sweep folder::

    scaling.json         {sweep, runs: [{run, n_latents, k, total_tokens, nmse, delta_ce, l0,
                          dead_frac, ce_clean, ce_spliced}], unevaluated: [run names],
                          fits: {label: {k, total_tokens, n, nmse, fitted, alpha, a, c, alpha_se, c_se,
                          rmse_log, dof, residuals: [{n, nmse, fitted, residual_log}], alpha_pure,
                          monotone, delta_ce_slope, note}}}   (a group not fitted has fitted: false and a note)
    scaling_nmse.png     nMSE vs n, log-log, one line per k with its fitted curve
    scaling_delta_loss.png   delta CE vs n, one line per k
    scaling.md           the same as tables
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import SaelabError
from saelab.evals.power_law import fit_power_law
from saelab.utils.atomic import write_json, write_text


def collect_runs(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(evaluated runs as rows, names of runs without metrics.json) of a sweep folder."""
    from saelab.evals.suite import sweep_runs
    from saelab.train.checkpoint import TRAIN_CONFIG

    rows, missing = [], []
    for run in sweep_runs(sweep_dir):
        train = json.loads((run / TRAIN_CONFIG).read_text())["train"]
        path = run / "metrics.json"
        if not path.exists():
            missing.append(run.name)
            continue
        m = json.loads(path.read_text())
        rows.append({"run": run.name, "n_latents": int(train["n_latents"]), "k": int(train["k"]),
                     "total_tokens": int(train["total_tokens"]),
                     **{key: m.get(key) for key in ("nmse", "delta_ce", "l0", "dead_frac", "ce_clean", "ce_spliced")}})
    return rows, missing


def _label(k: int, tokens: int, several_budgets: bool) -> str:
    return f"k={k}" + (f", {tokens / 1e6:.3g}M tokens" if several_budgets else "")


def fit_scaling(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One nMSE(n) power law per (k, training tokens) group of runs (see the module docstring)."""
    groups: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r["nmse"] is not None:
            groups[(r["k"], r["total_tokens"])].append(r)
    several = len({t for _, t in groups}) > 1
    fits = {}
    for (k, tokens), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["n_latents"])
        n = [r["n_latents"] for r in rs]
        y = [r["nmse"] for r in rs]
        out: dict[str, Any] = {"k": k, "total_tokens": tokens, "n": n, "nmse": y, "runs": [r["run"] for r in rs]}
        if len(set(n)) < 3:
            out.update(fitted=False, note=f"needs 3 sizes to fit a + c, has {len(set(n))}")
        else:
            law = fit_power_law(n, y, what=f"nMSE of the {_label(k, tokens, several)} runs")
            fitted = [float(v) for v in law(np.asarray(n, dtype=np.float64))]
            monotone = all(b < a for a, b in zip(y, y[1:]))
            notes = [] if monotone else ["nMSE does not fall with n at this budget (larger SAEs undertrained?): "
                                         "alpha is not meaningful"]
            if len(n) == 3:
                notes.append("3 sizes for 3 parameters: the curve passes through them")
            out.update(fitted=True, alpha=law.alpha, a=law.a, c=law.c, alpha_se=law.alpha_se, c_se=law.c_se,
                       rmse_log=law.rmse_log, dof=len(n) - 3, fitted_nmse=fitted,
                       residuals=[{"n": a, "nmse": b, "fitted": f, "residual_log": e}
                                  for a, b, f, e in zip(n, y, fitted, law.residuals_log)],
                       alpha_pure=fit_power_law(n, y, irreducible=False).alpha, monotone=monotone,
                       note="; ".join(notes) or None)
        d = [(r["n_latents"], r["delta_ce"]) for r in rs if r["delta_ce"] is not None]
        if len(d) >= 2 and all(v > 0 for _, v in d) and len({a for a, _ in d}) >= 2:
            out["delta_ce_slope"] = -fit_power_law([a for a, _ in d], [v for _, v in d], irreducible=False).alpha
        else:
            out["delta_ce_slope"] = None
        fits[_label(k, tokens, several)] = out
    return fits


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FormatStrFormatter

    for axis in (ax.yaxis,):
        axis.set_major_formatter(FormatStrFormatter("%.3g"))
        axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _plots(fits: dict[str, dict], rows: list[dict], folder: Path) -> None:
    from saelab.report.plots import _save, plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ys = [v for f in fits.values() for v in f["nmse"]]
    for i, (label, f) in enumerate(fits.items()):
        col = colors[i % len(colors)]
        ax.scatter(f["n"], f["nmse"], color=col, zorder=3)
        if f["fitted"]:
            grid = np.logspace(math.log10(min(f["n"])) - 0.08, math.log10(max(f["n"])) + 0.08, 100)
            tag = "" if f["monotone"] else " (not monotone: fit meaningless)"
            ax.plot(grid, f["a"] * grid ** -f["alpha"] + f["c"], color=col, ls="--" if f["monotone"] else ":",
                    label=f"{label}: alpha {f['alpha']:.3g}, c {f['c']:.3f}{tag}")
        else:
            ax.plot(f["n"], f["nmse"], color=col, label=f"{label} (not fitted: {f['note']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(min(ys) / 1.25, max(ys) * 1.25)
    _plain_log_ticks(ax)
    ax.set_xlabel("latents n")
    ax.set_ylabel("normalized MSE (held-out)")
    ax.set_title("nMSE against SAE size, one line per k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, folder / "scaling_nmse.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    _save(fig, folder / "scaling_delta_loss.png")


def write_scaling_report(sweep_dir: str | Path) -> dict[str, Any]:
    """Read every run of ``sweep_dir``, fit, and write scaling.json, the two plots and scaling.md."""
    folder = Path(sweep_dir)
    rows, missing = collect_runs(folder)
    if not rows:
        what = f"its runs ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}) have no metrics.json" \
            if missing else "it holds no run folders"
        raise SaelabError(f"sweep folder {folder} has no evaluated runs: {what}; run `saelab eval {folder}` first")
    fits = fit_scaling(rows)
    result = {"sweep": str(folder), "runs": rows, "unevaluated": missing, "fits": fits}
    write_json(folder / "scaling.json", result)
    _plots(fits, rows, folder)
    lines = [f"# Scaling study `{folder.name}`", "",
             "nMSE(n) = a n^-alpha + c fitted per k (log-space residuals); held-out nMSE from each run's metrics.json.",
             "", "| group | sizes n | alpha | a | c | rms log residual | alpha without c | delta CE slope | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, f in fits.items():
        sizes = ", ".join(f"2^{int(round(math.log2(v)))}" if v & (v - 1) == 0 else str(v) for v in f["n"])
        if f["fitted"]:
            se = f" ± {f['alpha_se']:.3f}" if f["alpha_se"] is not None else ""
            slope = "—" if f["delta_ce_slope"] is None else f"{f['delta_ce_slope']:.4f}"
            lines.append(f"| {label} | {sizes} | {f['alpha']:.4f}{se} | {f['a']:.4g} | {f['c']:.4f} | "
                         f"{f['rmse_log']:.4f} | {f['alpha_pure']:.4f} | {slope} | {f['note'] or ''} |")
        else:
            lines.append(f"| {label} | {sizes} | — | — | — | — | — | — | {f['note']} |")
    lines += ["", "| run | n | k | tokens | nMSE | delta CE | L0 | dead |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["k"], r["n_latents"])):
        fmt = lambda v, f="{:.4f}": "—" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['run']} | {r['n_latents']:,} | {r['k']} | {r['total_tokens']:,} | {fmt(r['nmse'])} | "
                     f"{fmt(r['delta_ce'])} | {fmt(r['l0'], '{:.1f}')} | {fmt(r['dead_frac'], '{:.2%}')} |")
    if missing:
        lines += ["", f"Not evaluated (no metrics.json): {', '.join(missing)}."]
    lines += ["", "![nMSE vs n](scaling_nmse.png)", "", "![delta CE vs n](scaling_delta_loss.png)", ""]
    write_text(folder / "scaling.md", "\n".join(lines))
    return result


__all__ = ["collect_runs", "fit_scaling", "write_scaling_report"]
