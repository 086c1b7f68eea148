"""``OUT/evals/report.md``: the paper suite's results (``saelab.evals.suite``) as tables and plots.

Rebuilt from the ``OUT/evals/<metric>.json`` files alone (and the latent frequencies the core metric
saved beside them, for ``density.png``), so it can be rewritten at any time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from saelab.errors import CheckpointError
from saelab.evals.compute_equivalent import KIND_FAMILY, format_fraction_interval, upgrade_result
from saelab.evals.core import TRAINING_TEXT, eval_settings
from saelab.evals.suite import RECOMPUTE_ERROR, earlier_computation
from saelab.models import model_provenance
from saelab.report.markdown import (earlier_note, frequencies_mismatch, intervals_note, markdown_table, measured_on,
                                    metric_rows)
from saelab.run_folder import DENSITY_PLOT, EVALS_DIR, LATENT_FREQUENCIES, read_latent_frequencies
from saelab.utils.atomic import write_text

METRIC_TITLES = {"core": "Core (reconstruction and spliced loss)", "compute_equivalent": "Compute-equivalent (§4.1)",
                 "ablation_sparsity": "Sparsity of ablation effects (§4.5)", "probe": "Held-out 1-D probe loss (after §4.2)",
                 "n2g": "N2G explanations (§4.3-4.4)"}


def _recovered_text(sp: dict, ci: dict) -> str:
    """The partial CE recovered, or why it has no value: its scale runs from zeroing the explained latents (0) to
    their real values (1), and needs zeroing to raise CE above the SAE's by more than the sampling noise."""
    from saelab.evals.bootstrap import format_interval

    gap, interval = sp["ce_zeroed"] - sp["ce_sae"], ci.get("zeroed_minus_sae") or {}
    shown = f"{gap:+.4f}{format_interval(interval)}"
    if gap <= 0:
        return f"none: zeroing the explained latents does not raise CE above the SAE's ({shown})"
    if interval.get("low") is not None and interval["low"] <= 0:
        return f"none: zeroing the explained latents raises CE above the SAE's only within noise ({shown})"
    return _f(sp["ce_recovered_partial"], "{:.3f}") + format_interval(ci.get("ce_recovered_partial"), "{:.3f}")


def _f(x: Any, fmt: str = "{:.4f}") -> str:
    return "—" if x is None else fmt.format(x)


def _headline(name: str, r: dict) -> str:
    if name == "core":
        return (f"nMSE {_f(r.get('nmse'))} (SAE input space {_f(r.get('nmse_sae_input'))}), L0 "
                f"{_f(r.get('l0'), '{:.1f}')}, delta CE {_f(r.get('delta_ce'))} nats, KL {_f(r.get('kl'))}")
    if name == "compute_equivalent":
        return _headline_ce(upgrade_result(r))
    if name == "ablation_sparsity":
        rnd, ch = r.get("random") or {}, r.get("channel") or {}
        return (f"latents {_f(r['latent']['mean'])} vs random directions of the same norm {_f(rnd.get('mean'))} "
                f"(ratio {_f(r.get('ratio_latent_to_random'), '{:.3f}')}), residual channels {_f(ch.get('mean'))}; "
                f"{_f(r.get('latents_per_s'), '{:,.1f}')} latents/s")
    if name == "probe":
        return (f"mean loss {_f(r.get('mean_loss'))} vs channels {_f(r.get('mean_baseline_loss'))} "
                f"(entropy {_f(r.get('mean_entropy'))}) over {len(r['tasks'])} tasks")
    if name == "n2g":
        sp = r.get("splice") or {}
        return (f"F1 {_f(r.get('f1'), '{:.3f}')} (precision {_f(r.get('precision'), '{:.3f}')}, recall "
                f"{_f(r.get('recall'), '{:.3f}')}) over {r['n_explained']} latents attempted; spliced delta CE N2G "
                f"{_f(sp.get('delta_ce_n2g_all'))} ({_simulated_text(r, sp)}) vs SAE {_f(sp.get('delta_ce_sae'))}")
    return ""


def _simulated_text(r: dict, sp: dict) -> str:
    """What the all-latents splice measures: with a sample of latents explained, every other one is 0."""
    cfg = r.get("config") or {}
    if cfg.get("n_latents") == 0 and not cfg.get("latents"):
        return "all latents simulated, every latent that fires explained"
    return (f"all latents simulated: only {sp.get('n_simulated', '?')} explained ({_f(sp.get('simulated_frac'), '{:.1%}')}"
            "), every other latent 0, so mostly the cost of dropping them")


def _headline_ce(r: dict) -> str:
    frac, name = r.get("fraction"), r["series"]["name"]
    ci = (r.get("intervals") or {}).get("fraction")
    shown = None if frac is None else f"{frac:.3g}{format_fraction_interval(ci, '{:.3g}')}"
    if r["kind"] == KIND_FAMILY:
        own = r["reference"].get("label") or "its clean loss on the fit"
        s = (f"compute-equivalent {shown} of the compute of `{own}` (6 N D, family `{name}`)" if frac is not None
             else f"compute-equivalent: spliced loss not reached by the fit of family `{name}`")
    else:
        s = (f"training-progress equivalent {shown} of the training tokens of `{name}` (one run's checkpoints, "
             "not the paper's family of sizes)" if frac is not None
             else f"training-progress equivalent: spliced loss not reached by the fit of `{name}`")
    s += f" (extrapolated: {r['extrapolation']})" if r.get("extrapolated") else ""
    return s + (f"; {_below_fit_error(r)}" if r.get("below_fit_error") else "")


def _below_fit_error(r: dict) -> str:
    """Why a fraction >= 1 for a spliced loss worse than the clean one measures no SAE cost."""
    return (f"the spliced loss is worse than the clean loss, so this fraction >= 1 is the fit's error at the "
            f"evaluated model (it lies below the curve), not a compute-equivalent; relative to the clean model: "
            f"{_f(r.get('fraction_relative'), '{:.4g}')}")


def _section_core(r: dict, density: bool) -> list[str]:
    lines = [f"{measured_on(r)}.", "",
             markdown_table(metric_rows(r)), *intervals_note(r)]
    if r.get("nmse_sae_input") is not None:
        lines += ["", f"nMSE in the SAE's own input space (after its input normalization, as the paper reports it): "
                      f"**{r['nmse_sae_input']:.4f}**; the table's nMSE is in the raw activation space (the same "
                      "number for an SAE without input normalization)."]
    if density:
        lines += ["", "![latent density](density.png)"]
    return lines


def _core_density(evals: Path, rec: dict) -> bool:
    """Draw evals/density.png from the latent frequencies the suite's core metric saved (as `saelab eval`
    saves them beside metrics.json); True when drawn. Frequencies that are missing (a core metric computed
    before saelab saved them), damaged, or of other weights or another evaluation than core.json's are not
    drawn, and one line says why."""
    from saelab.report.plots import density_histogram

    core = evals / "core.json"
    again = "the suite's core metric run again (`--suite paper --metrics core --overwrite`) saves them"
    try:
        saved = read_latent_frequencies(evals)
    except CheckpointError as e:
        why = str(e)
    else:
        if saved is None:
            why = (f"{evals / LATENT_FREQUENCIES} is missing (the suite's core metric ran before saelab saved the "
                   f"latents' firing frequencies); {again}")
        else:
            why = frequencies_mismatch(saved, evals, rec.get("sae", {}).get("n_latents"),
                                       rec.get("inputs", {}).get("sae_sha256"), eval_settings(rec["result"]),
                                       weights=f"those {core} describes", evaluation=str(core))
            why = why and f"{why}; {again}"
    if why:
        print(f"saelab: note: {EVALS_DIR}/{DENSITY_PLOT} not drawn: {why}", file=sys.stderr)
        return False
    density_histogram(saved.frequencies_N, evals / DENSITY_PLOT, saved.evaluation["n_tokens"])
    return True


def _ce_reference_rows(r: dict) -> list[tuple[str, str]]:
    """The rows that say what the curve is made of: a family's members or a run's checkpoints."""
    s, fit, unit = r["series"], r["fit"], r["compute_unit"]
    if r["kind"] == KIND_FAMILY:
        ref = r["reference"]
        own = (f"`{ref['label']}`, a member" if ref["how"] == "member" else
               "not a member: the compute the fit needs for its clean loss")
        return [("kind", "**compute-equivalent** (paper §4.1): final models of increasing size, compute C = 6 N D "
                         "FLOPs, N = non-embedding parameters"),
                ("model family", f"`{s['name']}` ({s['description']}), {len(r['checkpoints'])} members measured"),
                ("evaluated model's compute", f"{_f(r['reference_compute'], '{:.4g}')} FLOPs ({own})"),
                ("fit", f"L(C) = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f} on {fit['n_points']} members "
                        f"(b ± {_f(fit['b_se'], '{:.3g}')}, rms log residual {fit['rmse_log']:.4f})")]
    return [("kind", "**training-progress equivalent**: checkpoints of one training run, compute counted in tokens "
                     "(not the paper's family of model sizes)"),
            ("series", f"`{s['name']}` ({s['description']}), {len(r['checkpoints'])} checkpoints measured"),
            ("full training run", f"{_f(r['reference_compute'], '{:,.0f}')} {unit}"),
            ("fit", f"L(C) = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f} on {fit['n_points']} checkpoints "
                    f"with >= {fit['min_compute']:,} {unit} (b ± {_f(fit['b_se'], '{:.3g}')}, rms log residual "
                    f"{fit['rmse_log']:.4f})")]


def _section_ce(r: dict, evals: Path) -> list[str]:
    r = upgrade_result(r)
    fit, unit, family = r["fit"], r["compute_unit"], r["kind"] == KIND_FAMILY
    whose = "the evaluated model's compute" if family else "the full run's tokens"
    num = "{:.4g}" if family else "{:,.0f}"
    ci = r.get("intervals") or {}
    rows = _ce_reference_rows(r) + [
        ("clean / spliced loss", f"{_f(r['clean_loss'])} / {_f(r['spliced_loss'])} nats on "
                                 f"{r['n_predictions']:,} predictions"),
        (f"{unit} to reach the spliced loss (power law)", _f(r["compute_equivalent"], num)),
        (f"**fraction of {whose}**",
         f"**{_f(r['fraction'], '{:.4g}')}**{format_fraction_interval(ci.get('fraction'))} ({fit['method']})"),
        ("fraction: power law / interpolation", f"{_f(r['fraction_power'], '{:.4g}')} / "
                                                f"{_f(r['fraction_interp'], '{:.4g}')}"),
        ("clean model's own position on the curve",
         _f(r["clean_fraction"], "{:.4g}") + format_fraction_interval(ci.get("clean_fraction"))),
        ("fraction relative to the clean model",
         _f(r["fraction_relative"], "{:.4g}") + format_fraction_interval(ci.get("fraction_relative"))),
        ("extrapolated", str(r["extrapolation"]) if r["extrapolated"] else "no (inside the measured range)")]
    if r.get("below_fit_error"):
        rows.append(("below the fit's error", _below_fit_error(r)))
    head = "| member | N (non-embedding) | tokens D | 6 N D (FLOPs) |" if family else "| checkpoint | tokens |"
    lines = [markdown_table(rows), *_ce_intervals_note(r), "", head + " loss | fitted | in fit |",
             "|---|" + ("---|---|---|" if family else "---|") + "---|---|---|"]
    for c in r["checkpoints"]:
        size = f"{c['params']:,} | {c['tokens']:,} | {c['compute']:.4g}" if family else f"{c['tokens']:,}"
        lines.append(f"| {c['label']} | {size} | {c['loss']:.4f} | {_f(c['fitted_loss'])} | "
                     f"{'yes' if c['used_in_fit'] else 'no'} |")
    if (evals / "compute_equivalent.png").exists():
        lines += ["", "![compute-equivalent](compute_equivalent.png)"]
    return lines


def _ce_intervals_note(r: dict) -> list[str]:
    """What the fractions' [low, high] are, and how the draws whose compute lies outside the models' were
    counted; why there are none (losses cached before they were kept; a result from before them:
    :func:`earlier_computation`)."""
    if r.get("interval_note"):
        return ["", r["interval_note"] + "."]
    if "intervals" not in r:  # an earlier saelab's result: earlier_computation says so
        return []
    some = next((i for i in (r.get("intervals") or {}).values() if i.get("n_boot")), None)
    if some is None:
        return []
    places = r.get("interval_draws") or {}
    beyond, before = places.get("beyond_last", 0), places.get("before_first", 0)
    how = ("extrapolated by the power law, counted where it places them" if r["fit"]["method"] == "power" else
           "outside the interpolation, counted as infinite compute and as 0")
    counted = [f"{beyond:,} beyond the last model's compute and {before:,} before the first ({how})"] \
        if beyond or before else []
    if places.get("unreachable"):
        counted.append(f"{places['unreachable']:,} at or below the fitted floor c (never reached: infinite compute, "
                       "so an upper bound among them is ∞)")
    if places.get("failed"):
        counted.append(f"{places['failed']:,} whose refit failed (left out)")
    return ["", f"[low, high]: {some['level']:.0%} paired bootstrap intervals over the {some['n_groups']:,} "
                f"{r.get('interval_groups', 'groups')} of the eval contexts, {some['n_boot']:,} draws: each draw "
                "recomputes the spliced, clean and every reference model's loss from the drawn ones, refits the "
                "curve and places the losses on it" + (f"; of the draws, {'; '.join(counted)}" if counted else "")
                + "."]


def _section_ablation(r: dict) -> list[str]:
    lines = [f"{r['n_sites']} sites, effects over the next {r['n_future']} positions x {r['vocab_size']:,} logits; "
             f"score (L1/L2)^2 / (V*T): 1 = every logit moves alike, ~{r['gaussian_reference']:.3f} for Gaussian "
             "noise, smaller = sparser.", "",
             "| ablated | mean | median | std | effect L2 | ablations | no effect |", "|---|---|---|---|---|---|---|"]
    from saelab.evals.bootstrap import format_interval

    ci = r.get("intervals") or {}
    labels = {"latent": "latents", "random": "random directions, each of its latent's size",
              "channel": "residual channels zeroed (sizes unmatched)"}
    for part, label in labels.items():
        p = r.get(part)
        if p:
            lines.append(f"| {label} | {_f(p['mean'])}{format_interval(ci.get(part + '_mean'))} | {_f(p['median'])} | "
                         f"{_f(p['std'])} | {_f(p['effect_l2_mean'], '{:.4g}')} | {p['n_ablations']:,} | {p['n_null']} |")
    rows = [("latents / random directions (matched sizes)", "ratio_latent_to_random", "ratio_latent_to_random"),
            ("latents - random directions", None, "latent_minus_random"),
            ("latents / residual channels", "ratio_latent_to_channel", "ratio_latent_to_channel")]
    for label, key, ci_key in rows:
        value = r.get(key) if key else (ci.get(ci_key) or {}).get("estimate")
        if value is not None:
            lines.append(f"| **{label}** | {value:.4f}{format_interval(ci.get(ci_key))} | | | | | |")
    if ci:
        some = next(iter(ci.values()))
        lines += ["", f"[low, high]: {some['level']:.0%} paired bootstrap intervals over the sites' "
                      f"{some['n_groups']} {r.get('interval_groups', 'contexts')} ({some['n_boot']} replicates)."]
    lines += ["", f"Throughput: **{_f(r.get('latents_per_s'), '{:,.1f}')} latents/s** (latent ablations scored per "
                  f"second), {_f(r.get('ablations_per_s'), '{:,.1f}')} ablations/s with the baselines."]
    return lines


def _section_probe(r: dict, evals: Path) -> list[str]:
    from saelab.evals.bootstrap import format_interval

    unit = (r.get("config") or {}).get("split_unit", "paragraph")
    lines = [f"Features: encoder {'pre-activations' if r['features'] == 'pre' else 'latents'}; held-out "
             f"cross-entropy of the single best latent (chosen on train data) per task; train and test split by "
             f"{unit} (context tasks: by text). [low, high]: paired bootstrap intervals over the held-out "
             f"{r.get('interval_groups', 'groups')} (context tasks: texts). "
             "Not the paper's minimum over latents of the 1-D probe's loss: one latent chosen on train data, "
             "scored on held-out text, with a ridge-penalized fit, on saelab's own tasks (docs/evals.md).", "",
             f"| task | SAE loss | latent | channel loss | entropy | train / test examples ({unit}s) |",
             "|---|---|---|---|---|---|"]
    for name, t in r["tasks"].items():
        ci = t.get("intervals") or {}
        groups = f" ({t['n_train_groups']} / {t['n_test_groups']})" if "n_train_groups" in t else ""
        lines.append(f"| {name} | {_f(t['loss'])}{format_interval(ci.get('loss'))} | {t['latent']} | "
                     f"{_f(t['baseline_loss'])}{format_interval(ci.get('baseline_loss'))} | {_f(t['entropy'])} | "
                     f"{t['n_train']} / {t['n_test']}{groups} |")
    ci = r.get("intervals") or {}
    lines.append(f"| **mean** | **{_f(r['mean_loss'])}**{format_interval(ci.get('mean_loss'))} | | "
                 f"{_f(r['mean_baseline_loss'])}{format_interval(ci.get('mean_baseline_loss'))} | "
                 f"{_f(r['mean_entropy'])} | |")
    diff = ci.get("mean_loss_minus_baseline")
    if diff:
        lines += ["", f"Mean SAE loss - channel loss: {diff['estimate']:.4f}{format_interval(diff)} "
                      "(paired: both scored on the same resampled text)."]
    if r.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in r["skipped"].items())]
    if (evals / "probe.png").exists():
        lines += ["", "![probe loss](probe.png)"]
    return lines


N2G_TABLE_ROWS = 8
"""Explained latents the report's N2G table lists."""


def _section_n2g(r: dict, evals: Path) -> list[str]:
    mi, sp = r["micro"], r.get("splice")
    with_patterns = [x for x in r["per_latent"] if x.get("n_patterns", len(x["patterns"])) > 0]
    none = r["n_explained"] - len(with_patterns)  # n_explained counts the latents attempted
    lines = [f"{r['n_explained']} latents attempted from {r['n_build_contexts']} contexts, scored on "
             f"{r['n_eval_contexts']} held-out contexts: {len(with_patterns)} explained (at least one pattern)"
             + (f", {none} kept none (every example dropped: they predict nothing, recall 0 where they fire)"
                if none else "") + f"; {_f(r['mean_patterns'], '{:.1f}')} patterns per latent attempted.", "",
             markdown_table([("precision / recall / F1 (means over the latents attempted, each where defined)",
                      f"{_f(r['precision'], '{:.3f}')} / {_f(r['recall'], '{:.3f}')} / {_f(r['f1'], '{:.3f}')}"),
                     ("pooled precision / recall / F1", f"{_f(mi['precision'], '{:.3f}')} / "
                                                        f"{_f(mi['recall'], '{:.3f}')} / {_f(mi['f1'], '{:.3f}')}"),
                     ("correlation with the real activation", _f(r["corr"], "{:.3f}"))])]
    from saelab.evals.bootstrap import format_interval

    ci = r.get("intervals") or {}
    if ci.get("f1"):
        parts = [f"{k} {format_interval(ci.get(k), '{:.3f}').strip() or '—'}" for k in ("precision", "recall", "f1")]
        lines += ["", f"{ci['f1']['level']:.0%} bootstrap intervals over the {ci['f1']['n_groups']} held-out "
                      f"{r.get('interval_groups', 'contexts')} "
                      f"(means over latents): {'; '.join(parts)}."]
    if sp and "ce_n2g_all" in sp:
        lines += ["", f"Splice (§4.4). **All latents simulated** (the paper's definition): the {sp['n_simulated']} "
                      f"latents with an explanation ({sp['simulated_frac']:.1%} of the SAE) take their N2G predictions, every other "
                      "latent is 0. **Explained only** (partial): the explained latents replaced, the others keep "
                      "their SAE values.", "",
                  markdown_table([("CE clean / SAE", f"{sp['ce_clean']:.4f} / {sp['ce_sae']:.4f}"),
                          ("delta CE SAE", f"{sp['delta_ce_sae']:.4f}{format_interval(ci.get('delta_ce_sae'))}"),
                          ("**delta CE N2G, all latents simulated**",
                           f"**{sp['delta_ce_n2g_all']:.4f}**{format_interval(ci.get('delta_ce_n2g_all'))}"),
                          ("delta CE N2G, explained latents only (partial)",
                           f"{sp['delta_ce_n2g_partial']:.4f}{format_interval(ci.get('delta_ce_n2g_partial'))}"),
                          ("delta CE, explained latents zeroed",
                           f"{sp['delta_ce_zeroed']:.4f}{format_interval(ci.get('delta_ce_zeroed'))}"),
                          ("CE recovered by N2G, partial (1 = as the real values, 0 = as zeroing)",
                           _recovered_text(sp, ci))])]
    elif sp:  # a result written before the full splice existed
        lines += ["", "Splice (explained latents only): " + ", ".join(f"{k} {v:.4f}" for k, v in sp.items()
                                                                       if isinstance(v, float))]
    # The explained latents, best F1 first; one whose F1 is undefined (neither fires nor is predicted on the
    # held-out contexts) after them, not left out
    best = sorted(with_patterns, key=lambda x: (x["f1"] is None, -(x["f1"] or 0)))[:N2G_TABLE_ROWS]
    if best:
        lines += ["", f"The {len(best)} best-scored of the {len(with_patterns)} explained latents (F1 — : it neither "
                      "fires nor is predicted on the held-out contexts):", "",
                  "| latent | F1 | precision | recall | top pattern |", "|---|---|---|---|---|"]
        for x in best:
            pat = x["patterns"][0] if x["patterns"] else None  # none listed with max_patterns_reported 0
            text = (("^" if pat["anchored"] else "") + "".join(pat["tokens"]) if pat else "").replace(
                "|", "\\|").replace("\n", "\\n")
            lines.append(f"| {x['latent']} | {_f(x['f1'], '{:.3f}')} | {_f(x['precision'], '{:.3f}')} | "
                         f"{_f(x['recall'], '{:.3f}')} | `{text}` |")
    if (evals / "n2g.png").exists():
        lines += ["", "![N2G](n2g.png)"]
    return lines


def _training_text_warning(measured_on: dict[str, str | None]) -> list[str]:
    """One line naming the metrics whose results were measured on the SAE's training text (none: no line)."""
    names = [f"`{m}`" for m, text in measured_on.items() if text == TRAINING_TEXT]
    if not names:
        return []
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return [f"**Warning:** {listed} read the text the SAE was trained on: {'its' if len(names) == 1 else 'their'} "
            "numbers are not held-out.", ""]


def _recompute_error(index: dict, metric: str, rec: dict) -> str | None:
    """The error of the suite run that computed ``rec``, an earlier saelab's ok result, again and kept it (suite.json
    says so); None where it did not."""
    entry = index.get("metrics", {}).get(metric, {})
    return entry.get(RECOMPUTE_ERROR) if rec["status"] == "ok" and entry.get("status") == "error" else None


def write_paper_report(out_dir: str | Path) -> Path:
    """Write ``out_dir/evals/report.md`` (and the density, compute-equivalent, probe and N2G plots) from the
    metric files."""
    from saelab.evals.config import PAPER_METRICS
    from saelab.report.plots import compute_equivalent_plot, n2g_plot, probe_plot

    evals = Path(out_dir) / EVALS_DIR
    recs = {m: json.loads((evals / f"{m}.json").read_text()) for m in PAPER_METRICS if (evals / f"{m}.json").exists()}
    index = json.loads((evals / "suite.json").read_text()) if (evals / "suite.json").exists() else {}
    if recs.get("compute_equivalent", {}).get("status") == "ok":
        compute_equivalent_plot(recs["compute_equivalent"]["result"], evals / "compute_equivalent.png")
    if recs.get("probe", {}).get("status") == "ok" and recs["probe"]["result"]["tasks"]:
        probe_plot(recs["probe"]["result"], evals / "probe.png")
    if recs.get("n2g", {}).get("status") == "ok" and recs["n2g"]["result"]["per_latent"]:
        n2g_plot(recs["n2g"]["result"], evals / "n2g.png")
    density = recs.get("core", {}).get("status") == "ok" and _core_density(evals, recs["core"])
    any_rec = next(iter(recs.values()), {})
    sae, ev = any_rec.get("sae", {}), any_rec.get("eval", {})
    # what each metric was measured on (None: none of the eval text, or a record of an earlier saelab)
    measured_on = {m: (rec.get("eval") or {}).get("eval_text") for m, rec in recs.items()}
    shown_text = next((text for text in measured_on.values() if text), None)
    lines = [f"# Paper metrics of SAE `{sae.get('source') or '?'}`", ""]
    lines += [markdown_table([("SAE", f"n = {sae.get('n_latents', 0):,}, k = {sae.get('k')}, input norm "
                              f"{sae.get('input_norm')}, weights sha256 {sae.get('sha256')}"),
                      ("model / hook", f"`{model_provenance(sae.get('model'))['model_name']}` / `{sae.get('hook')}`"),
                      ("eval text", f"`{ev.get('corpus')}`{f', {shown_text}' if shown_text else ''}, contexts of "
                                    f"{ev.get('context_size')} tokens, position 0 {ev.get('position_0')}")]), ""]
    lines += _training_text_warning({m: text for m, text in measured_on.items() if recs[m]["status"] == "ok"})
    lines += ["## Summary", "", "| metric | result | status | wall (s) |", "|---|---|---|---|"]
    kept = {m: _recompute_error(index, m, rec) for m, rec in recs.items()}
    for m, rec in recs.items():
        status = rec["status"] + (" (reused)" if index.get("metrics", {}).get(m, {}).get("reused") else "")
        status = f"ok (earlier result; recompute failed: {kept[m]})".replace("|", "\\|") if kept[m] else status
        text = _headline(m, rec["result"]) if rec["status"] == "ok" else (rec["reason"] or "").replace("|", "\\|")
        lines.append(f"| {METRIC_TITLES[m]} | {text} | {status} | {rec['wall_s']:,.1f} |")
    total = sum(r["wall_s"] for r in recs.values())
    lines += [f"| **total** | | | **{total:,.1f}** |", ""]
    for m, rec in recs.items():
        lines += [f"## {METRIC_TITLES[m]}", ""]
        if rec["status"] != "ok":
            lines += [f"{rec['status'].capitalize()}: {rec['reason']}", ""]
            continue
        r = rec["result"]
        body = {"core": lambda: _section_core(r, density), "compute_equivalent": lambda: _section_ce(r, evals),
                "ablation_sparsity": lambda: _section_ablation(r), "probe": lambda: _section_probe(r, evals),
                "n2g": lambda: _section_n2g(r, evals)}[m]()
        where = "`saelab.evals.reconstruction` and `.downstream`" if m == "core" else f"`saelab.evals.{m}`"
        again = (f"the suite run again (`--metrics {m}` for it alone) computes it anew, as this saelab does"
                 if not kept[m] else "it is kept as it was, as computing it again failed (below)")
        body += earlier_note(earlier_computation(rec, m), again)
        body += ["", f"Computing it again failed: {kept[m]}"] if kept[m] else []
        on = f" on {measured_on[m]}" if measured_on[m] else ""
        lines += body + ["", f"Computed {rec['created']} in {rec['wall_s']:,.1f} s{on}; definitions and schema: "
                                f"{where} (see docs/evals.md).", ""]
    path = evals / "report.md"
    write_text(path, "\n".join(lines))
    return path


__all__ = ["write_paper_report"]
