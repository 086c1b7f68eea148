"""The paper's comparisons (Gao et al. 2024) reproduced on the offline default model; writes
docs/reproduction.md with its plots.

    python benchmarks/reproduce_paper.py --out runs/repro                 # ~1.5 h on 2 CPU cores (docs/reproduction.md: 87 min)
    python benchmarks/reproduce_paper.py --out /tmp/repro-smoke --smoke   # to try the script: 20 min or more on 2 CPU cores

One harvest of SmolLM2-135M-Instruct ``blocks.9.hook_resid_post`` (context 64; ``--activations``
reuses a cache, e.g. the quickstart's), then three sweeps on it, every SAE on the same tokens in the
same order, each seen once:

- ``frontier-topk``: TopK at n = 2,048, k = 8 .. 64 (short-run recipe, random decoder init);
- ``frontier-relu``: ReLU + L1 at n = 2,048 (``relu-l1`` recipe), one L1 coefficient per L0;
- ``scale``: TopK k = 32 at n = 1,024 .. 32,768, each with and without AuxK.

Every SAE gets the core evaluation (held-out text, nMSE on 32,768 tokens, delta CE on 8,192
predictions), and the n = 8,192 SAE with AuxK the paper suite's ablation sparsity and probe loss,
with their baselines and bootstrap intervals. From these come (a) the sparsity-nMSE frontier,
(b) dead latents against n with and without AuxK, with the AuxK loss and revivals, (c) nMSE(n) with
its power-law fit, (d) delta loss against nMSE and (e) latents against baselines; and for each of
the paper's findings a verdict: holds, does not hold, or cannot tell, and why.

Every stage resumes: run the same command again after an interruption (the page's wall-time table gives each
stage's time as its results record it, every call counted, beside the call's own). Results: OUT/reproduction.json;
the page and plots: ``--doc`` (default docs/reproduction.md, with --smoke OUT/reproduction.md; plots
beside it in images/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, machine_info  # noqa: E402

from saelab.evals.ablation_sparsity import INTERVAL_METHOD as ABLATION_INTERVALS  # noqa: E402
from saelab.evals.bootstrap import earlier_intervals  # noqa: E402
from saelab.evals.probe import INTERVAL_METHOD as PROBE_INTERVALS  # noqa: E402
from saelab.evals.suite import PaperSuiteConfig  # noqa: E402
from saelab.pipeline import (EvalConfig, HarvestConfig, cache_seconds, evaluate_sweep, harvest,  # noqa: E402
                             paper_suite, sweep_from_cache)
from saelab.report.scaling import collect_runs, fit_scaling  # noqa: E402
from saelab.run_folder import EVAL_METRICS, EVALS_DIR, read_json, sweep_runs  # noqa: E402
from saelab.train import TrainConfig  # noqa: E402
from saelab.train.checkpoint import read_metrics, read_status, recorded_train_seconds  # noqa: E402
from saelab.utils.atomic import write_json, write_text  # noqa: E402
from saelab.utils.figures import figure, save_figure  # noqa: E402

FULL = {"tokens": 1_048_576, "frontier_n": 2048, "k": [8, 16, 32, 64], "l1": [3.0, 10.0, 30.0, 100.0],
        "n": [1024, 2048, 4096, 8192, 16384, 32768], "suite_n": 8192, "coef_n": 8192}
SMOKE = {"tokens": 131_072, "frontier_n": 4096, "k": [16, 32], "l1": [2.0, 8.0], "n": [1024, 2048, 4096],
         "suite_n": 2048, "coef_n": 2048}
EVAL = EvalConfig(recon_tokens=32_768, downstream_tokens=8_192, ablations=())
SUITE = ("ablation_sparsity", "probe")
SUITE_STAGE = "paper suite (ablation sparsity, probe)"


def sweeps(plan: dict[str, Any]) -> dict[str, tuple[TrainConfig, dict[str, list]]]:
    """name -> (base config, grid). One decoder init (random) for every TopK SAE, so that no size or k
    switches method; the checkpoint cadence only sets how much is redone after an interruption."""
    common = {"total_tokens": plan["tokens"], "checkpoint_every": 64}
    topk = TrainConfig.from_recipe("short-run", decoder_init="random", **common)
    return {
        "frontier-topk": (replace(topk, n_latents=plan["frontier_n"]), {"k": plan["k"]}),
        "frontier-relu": (TrainConfig.from_recipe("relu-l1", n_latents=plan["frontier_n"], **common),
                          {"l1_coefficient": plan["l1"]}),
        "scale": (replace(topk, k=32), {"n_latents": plan["n"], "auxk": [True, False]}),
        # The scale sweep's AuxK run at one n with a 32x larger AuxK coefficient: does a larger AuxK
        # gradient revive more latents (adam_memory says why it might)?
        "auxk-coef": (replace(topk, k=32, n_latents=plan["coef_n"]), {"auxk_coef": [1.0]}),
    }


def activations_of(args, out: Path) -> Path:
    return Path(args.activations) if args.activations else out / "activations"


def run_stages(args, plan: dict[str, Any], out: Path) -> dict[str, float]:
    """Harvest (unless given), train and evaluate every sweep, the paper suite on one SAE; seconds per stage."""
    times: dict[str, float] = {}
    acts = activations_of(args, out)
    if not args.activations:
        t0 = time.perf_counter()
        harvest(HarvestConfig(n_tokens=plan["tokens"]), acts, device=args.device)
        times["harvest"] = time.perf_counter() - t0
    for name, (base, grid) in sweeps(plan).items():
        t0 = time.perf_counter()
        sweep_from_cache(acts, out / name, base, grid, device=args.device)
        times[f"train {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_sweep(out / name, EVAL, device=args.device)
        times[f"eval {name}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    paper_suite(suite_run(out, plan), eval_cfg=EVAL, device=args.device, cfg=PaperSuiteConfig(metrics=SUITE))
    times[SUITE_STAGE] = time.perf_counter() - t0
    return times


def suite_run(out: Path, plan: dict[str, Any]) -> Path:
    return out / "scale" / f"n{plan['suite_n']}_auxkTrue"


# ---- wall time: what each stage's results took, as recorded ---------------------------------------
def sweep_seconds(folder: Path) -> tuple[float | None, float | None]:
    """(training, evaluation) seconds of a sweep's runs as their records hold them, every call counted: a rerun
    finds them done in ~0 s, which says nothing of what they took. One pass trains every run at once, so each
    run's train_seconds is that pass's time (the longest stands for it); evaluation sums the core eval's parts
    (reconstruction, downstream), the model load left out."""
    runs = sweep_runs(folder)
    train = [recorded_train_seconds(read_status(run)) for run in runs]
    evals = [sum((read_json(run / EVAL_METRICS, "evaluation").get("seconds") or {}).values())
             for run in runs if (run / EVAL_METRICS).exists()]
    return (max(train) if any(train) else None), (sum(evals) if any(evals) else None)


def recorded_seconds(out: Path, plan: dict[str, Any], harvested: Path | None) -> dict[str, float | None]:
    """Seconds per stage as the results record them (``harvested``: the cache this study wrote, else None)."""
    times: dict[str, float | None] = {"harvest": cache_seconds(harvested)[0]} if harvested else {}
    for name in sweeps(plan):
        times[f"train {name}"], times[f"eval {name}"] = sweep_seconds(out / name)
    evals = suite_run(out, plan) / EVALS_DIR
    walls = [read_json(evals / f"{m}.json", f"{m} result").get("wall_s") for m in SUITE]
    times[SUITE_STAGE] = sum(walls) if all(isinstance(w, (int, float)) for w in walls) else None
    return times


def duration(seconds: float | None) -> str:
    """Seconds under a minute (a minute rounded to 0.1 hides them), minutes above."""
    if seconds is None:
        return "not recorded"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def wall_time_rows(now: dict[str, float], recorded: dict[str, float | None]) -> list[str]:
    """Markdown rows: each stage's recorded time (every call that worked on it) and this call's."""
    return [f"| {stage} | {duration(recorded.get(stage))} | {duration(now[stage]) if stage in now else '-'} |"
            for stage in {**recorded, **now}]


# ---- the measurements, read back from the run folders ------------------------------------------
def runs_of(folder: Path) -> list[dict[str, Any]]:
    """Evaluated runs of a sweep with their training config and log (collect_runs refuses mixed settings)."""
    rows, missing, stale = collect_runs(folder)
    if missing or stale:  # stale: evaluated before its sae/ was replaced, so its numbers are another SAE's
        raise SystemExit(f"{folder}: runs not evaluated (or evaluated for other weights): "
                         f"{', '.join(missing + stale)}; run the script again")
    for r in rows:
        train = read_json(folder / r["run"] / "train_config.json", "training config")["train"]
        r.update(auxk=bool(train["auxk"]), l1_coefficient=train.get("l1_coefficient"),
                 architecture=train["architecture"], log=read_metrics(folder / r["run"]))
        r["revivals"] = next((x["revivals"] for x in reversed(r["log"]) if "revivals" in x), None)
    return sorted(rows, key=lambda r: (r["n_latents"], r["k"], r.get("l1_coefficient") or 0))


def frontier(topk: list[dict], relu: list[dict]) -> dict[str, Any]:
    """(a) TopK nMSE against ReLU's at the same L0 (ReLU's frontier interpolated in log L0; an SAE that fires
    nothing, L0 0, has no place on that axis: left out, "cannot tell" where none is left)."""
    pts = sorted((math.log(r["l0"]), r["nmse"]) for r in relu if r["l0"] > 0)
    matched = []
    for r in topk:
        x = math.log(r["l0"]) if r["l0"] > 0 else -math.inf
        if pts and pts[0][0] <= x <= pts[-1][0]:
            relu_nmse = float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))
            matched.append({"k": r["k"], "l0": r["l0"], "topk_nmse": r["nmse"], "relu_nmse": relu_nmse})
    better = [m["topk_nmse"] < m["relu_nmse"] for m in matched]
    verdict = ("cannot tell" if not matched else "holds" if all(better)
               else "does not hold" if not any(better) else "partly")
    return {"matched": matched, "verdict": verdict}


def dead_latents(scale: list[dict]) -> dict[str, Any]:
    """(b) training-time dead fraction (and eval-time inactivity) against n, with and without AuxK."""
    by_n: dict[int, dict[str, dict]] = {}
    for r in scale:
        by_n.setdefault(r["n_latents"], {})["auxk" if r["auxk"] else "plain"] = r
    rows = [{"n": n, **{f"{tag}_{key}": v[tag][key] for tag in ("auxk", "plain") if tag in v
                        for key in ("train_dead_frac", "eval_inactive_frac", "revivals", "nmse")}}
            for n, v in sorted(by_n.items())]
    both = [r for r in rows if "auxk_train_dead_frac" in r and "plain_train_dead_frac" in r]
    fewer = [r["auxk_train_dead_frac"] <= r["plain_train_dead_frac"] for r in both]
    widest = both[-1] if both else None
    if not both or widest["plain_train_dead_frac"] == 0:
        verdict = "cannot tell"
    elif all(fewer) and widest["auxk_train_dead_frac"] < widest["plain_train_dead_frac"]:
        verdict = "holds"
    else:
        verdict = "does not hold"
    return {"rows": rows, "verdict": verdict, "window_tokens": scale[0]["train_dead_window"]}


def adam_memory(run_dir: Path, cache: Path) -> dict[str, Any]:
    """How far one Adam step moves dead vs live latents at the end of a run: per decoder row, the median
    over entries of |gradient| / sqrt(bias-corrected second moment), on one fresh batch. Adam's second
    moments (beta2 = 0.999, a memory of ~1,000 steps) still hold a dead latent's live-phase gradients,
    so AuxK's small gradient moves it little."""
    from saelab.data.cache import ActivationCache
    from saelab.sae import SAEConfig
    from saelab.sae.relu import sae_class
    from saelab.train.checkpoint import load_checkpoint
    from saelab.train.trainer import Trainer

    state = load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(read_json(run_dir / "train_config.json", "training config")["train"])
    sae = sae_class(cfg.architecture)(SAEConfig.from_dict(json.loads(state["sae_config"])), init=False)
    tr = Trainer(cfg, sae, float(state["normalizer"]), device="cpu")
    tr.load_state_dict(state)
    dead = tr.tokens_since_fired >= cfg.effective_dead_tokens
    x = next(iter(ActivationCache(cache).batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 1))).float()
    tr.gradients(x)
    ratio = (sae.W_dec.grad.abs() / tr.second_moment(sae.W_dec).sqrt().clamp_min(1e-30)).median(dim=1).values
    return {"run": run_dir.name, "step": tr.step, "n_dead": int(dead.sum()),
            "dead_step_ratio": float(ratio[dead].median()) if dead.any() else None,
            "live_step_ratio": float(ratio[~dead].median()), "beta2": cfg.adam_beta2}


def power_law(scale: list[dict]) -> dict[str, Any]:
    """(c) nMSE(n) at k = 32 with AuxK: the scaling report's fit (profile-likelihood interval on alpha)."""
    fits = fit_scaling([r for r in scale if r["auxk"]])
    fit = next(iter(fits.values()))
    interval = fit.get("alpha_interval")
    if not fit.get("fitted") or not fit["monotone"]:
        verdict = "cannot tell"  # a flat or rising step may be noise or undertraining, not a broken law
    elif interval and interval[0] is not None and interval[0] > 0:
        verdict = "holds"
    else:
        verdict = "cannot tell"
    return {**{k: v for k, v in fit.items() if k != "residuals"}, "verdict": verdict}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def delta_loss(all_rows: list[dict]) -> dict[str, Any]:
    """(d) delta CE against nMSE over every evaluated SAE: rank correlation, per architecture too."""
    pts = [(r["nmse"], r["delta_ce"]) for r in all_rows if r["delta_ce"] is not None]
    rho = spearman([p[0] for p in pts], [p[1] for p in pts])
    return {"spearman": rho, "n_points": len(pts), "verdict": "holds" if rho >= 0.8 else
            "does not hold" if rho <= 0 else "partly"}


def interval(result: dict, key: str) -> dict[str, Any] | None:
    return (result.get("intervals") or {}).get(key)


def baselines(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """(e) ablation sparsity against random directions of the latents' sizes, probe loss against
    residual channels; verdicts from the intervals of the paired differences and ratios."""
    evals = suite_run(out, plan) / EVALS_DIR
    abl = read_json(evals / "ablation_sparsity.json", "ablation sparsity result")["result"]
    probe = read_json(evals / "probe.json", "probe result")["result"]
    ratio = interval(abl, "ratio_latent_to_random")
    diff = interval(probe, "mean_loss_minus_baseline")

    def verdict(iv: dict | None, below: float) -> str:
        if not iv or iv.get("low") is None:
            return "cannot tell"
        return "holds" if iv["high"] < below else "does not hold" if iv["low"] > below else "cannot tell"

    return {"ablation": {"latent": abl["latent"]["mean"], "random": abl["random"]["mean"], "ratio": ratio,
                         "latent_iv": interval(abl, "latent_mean"), "random_iv": interval(abl, "random_mean"),
                         "n_sites": abl["n_sites"], "verdict": verdict(ratio, 1.0),
                         "intervals_made": interval_words(abl, ABLATION_INTERVALS, "the sites' {n} {groups}")},
            "probe": {"latent": probe["mean_loss"], "baseline": probe["mean_baseline_loss"],
                      "latent_iv": interval(probe, "mean_loss"), "baseline_iv": interval(probe, "mean_baseline_loss"),
                      "entropy": probe["mean_entropy"], "difference": diff, "tasks": len(probe["tasks"]),
                      "split_unit": probe["config"]["split_unit"], "verdict": verdict(diff, 0.0),
                      "intervals_made": interval_words(probe, PROBE_INTERVALS, PROBE_RESAMPLED)}}


PROBE_RESAMPLED = ("each task's held-out {groups} ({n} over the tasks), each task resampled on its own, averaged "
                   "over tasks")
UNDER_COVERAGE = ("docs/evals.md: in a simulation with a per-document effect, 95 % intervals over contexts covered "
                  "the true mean 49 % of the time, over documents 91 %")


def interval_words(result: dict, method: str, over: str) -> str:
    """How a metric's intervals were made, worded from what its result records (interval_method, interval_groups,
    n_groups, n_boot), so the page never names a method its numbers were not made by: one an earlier saelab made
    (another interval_method, or none) is said to be so, and likely too narrow, as intervals over documents'
    contexts or paragraphs are. ``over``: what was resampled, with ``{n}`` and ``{groups}`` to fill in."""
    some = next((iv for iv in (result.get("intervals") or {}).values() if iv.get("n_boot")), None)
    if some is None:
        return "no interval"
    earlier = earlier_intervals(result, method)
    if earlier:
        return (f"paired bootstrap ({some['n_groups']:,} groups, {some['n_boot']:,} draws), but {earlier}: saelab's "
                f"now resample documents, and this one is likely too narrow ({UNDER_COVERAGE}); the paper suite "
                "computes such a result again")
    groups = result.get("interval_groups") or "groups"
    resampled = over.format(n=f"{some['n_groups']:,}", groups=groups)
    text = f"paired bootstrap over {resampled} ({some['n_boot']:,} draws)"
    if groups != "documents":  # no document bounds to resample: contexts or paragraphs stand in for them
        text += (f"; not documents (the corpus marks none, or the contexts lie in one), so likely too narrow "
                 f"({UNDER_COVERAGE})")
    return text


def baseline_notes(e: dict[str, Any]) -> tuple[str, str]:
    """The 'why' of the ablation and probe findings: their baselines and how their intervals were made."""
    abl, probe = e["ablation"], e["probe"]
    return (f"{abl['n_sites']} sites; the baseline removes a random direction of the same size as each latent's "
            f"contribution, so only the direction differs; {abl['intervals_made']}.",
            f"{probe['tasks']} tasks, split by {probe['split_unit']}; the baseline is the best single residual "
            f"channel; {probe['intervals_made']}.")


# ---- plots -----------------------------------------------------------------------------------------
def plain_ticks(ax, x: bool = True) -> None:
    """Log axes labelled 0.3, 20, ... instead of 3 x 10^-1."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    if x:
        lo, hi = ax.get_xlim()
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g") if hi / lo < 10 else NullFormatter())


def plot_frontier(topk: list[dict], relu: list[dict], n: int, path: Path) -> Path:
    fig, ax = figure(figsize=(6.5, 4))
    for rows, label, key, tag in ((topk, "TopK", "k", "k"), (relu, "ReLU + L1", "l1_coefficient", "λ")):
        rows = sorted(rows, key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rows], [r["nmse"] for r in rows], marker="o", label=f"{label} (n = {n:,})")
        for r in rows:
            ax.annotate(f"{tag} {r[key]:g}", (r["l0"], r["nmse"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set(xscale="log", yscale="log", xlabel="L0 (held-out)", ylabel="normalized MSE (held-out)",
           title="(a) Sparsity against reconstruction")
    plain_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_dead(dead: dict[str, Any], scale: list[dict], path: Path) -> Path:
    fig, (ax, ax2) = figure(1, 2, figsize=(11, 4))
    rows = dead["rows"]
    for tag, label in (("auxk", "with AuxK"), ("plain", "without AuxK")):
        pts = [(r["n"], r[f"{tag}_train_dead_frac"]) for r in rows if f"{tag}_train_dead_frac" in r]
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
    ax.set(xscale="log", xlabel="latents n", ylabel="% dead at the end (training window)",
           title="(b) Dead latents against n")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    widest = max((r for r in scale if r["auxk"]), key=lambda r: r["n_latents"])
    log = [x for x in widest["log"] if "auxk" in x]
    ax2.plot([x["step"] for x in log], [x["auxk"] for x in log], label="AuxK loss (nMSE of the residual)")
    ax2.plot([x["step"] for x in log], [100 * x["dead_frac"] for x in log], label="% dead now")
    ax2.set(xlabel="step", title=f"AuxK at n = {widest['n_latents']:,}")
    twin = ax2.twinx()
    twin.plot([x["step"] for x in log], [x.get("revivals", 0) for x in log], color="C3", label="revivals (cumulative)")
    twin.set_ylabel("revivals", color="C3")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def plot_power_law(fit: dict[str, Any], path: Path) -> Path:
    fig, ax = figure(figsize=(6.5, 4))
    ax.scatter(fit["n"], fit["nmse"], zorder=3, label="k = 32, with AuxK")
    if fit.get("fitted"):
        grid = np.logspace(math.log10(min(fit["n"])), math.log10(max(fit["n"])), 100)
        ax.plot(grid, fit["a"] * grid ** -fit["alpha"] + fit["c"], ls="--",
                label=f"a n^-alpha + c: alpha {fit['alpha']:.3g}, c {fit['c']:.3f}")
    ax.set(yscale="log", xlabel="latents n", ylabel="normalized MSE (held-out)", title="(c) nMSE against n")
    ax.set_xscale("log", base=2)
    plain_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_delta_loss(groups: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = figure(figsize=(6.5, 4))
    for label, rows in groups.items():
        rows = [r for r in rows if r["delta_ce"] is not None]
        ax.scatter([r["nmse"] for r in rows], [r["delta_ce"] for r in rows], label=label)
    ax.set(xscale="log", yscale="log", xlabel="normalized MSE (held-out)",
           ylabel="delta CE, spliced - clean (nats)", title="(d) Downstream loss against reconstruction")
    plain_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_baselines(base: dict[str, Any], path: Path) -> Path:
    fig, (ax, ax2) = figure(1, 2, figsize=(10, 3.6))
    for axis, part, names, title in ((ax, base["ablation"], ("latent", "random"), "ablation sparsity (lower: sparser)"),
                                     (ax2, base["probe"], ("latent", "baseline"), "probe loss (nats, lower: better)")):
        values = [part[names[0]], part[names[1]]]
        ivs = [part[f"{names[0]}_iv"], part[f"{names[1]}_iv"]]
        err = [[v - (iv or {}).get("low", v) for v, iv in zip(values, ivs)],
               [(iv or {}).get("high", v) - v for v, iv in zip(values, ivs)]]
        axis.bar(["SAE latents", "random direction" if names[1] == "random" else "residual channel"],
                 values, yerr=err, capsize=6, color=["C0", "C7"])
        axis.set_title(f"(e) {title}", fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# ---- the page --------------------------------------------------------------------------------------
def _iv(iv: dict | None, fmt: str = "{:.3f}") -> str:
    if not iv or iv.get("low") is None:
        return "no interval"
    return f"{int(round(100 * iv['level']))} % interval [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def findings(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(the paper's statement, our figure, verdict) per finding."""
    a, b, c, d, e = r["frontier"], r["dead"], r["power_law"], r["delta_loss"], r["baselines"]
    widest = b["rows"][-1]
    gaps = ", ".join(f"k {m['k']}: {m['topk_nmse']:.3f} vs {m['relu_nmse']:.3f}" for m in a["matched"]) or "no L0 in common"
    alpha_iv = c.get("alpha_interval") or [None, None]
    return [
        ("TopK reaches a lower nMSE than ReLU + L1 at the same L0 (the paper's comparison of activation functions)",
         f"TopK vs ReLU nMSE at TopK's L0, n = {r['plan']['frontier_n']:,} ({gaps})", a["verdict"]),
        ("Without mitigations the share of dead latents grows with n; with AuxK (and tied init) almost none die",
         f"dead at n = {widest['n']:,}: {100 * widest.get('auxk_train_dead_frac', float('nan')):.1f} % with AuxK, "
         f"{100 * widest.get('plain_train_dead_frac', float('nan')):.1f} % without; "
         f"revivals {widest.get('auxk_revivals')} with AuxK, {widest.get('plain_revivals')} without", b["verdict"]),
        ("At fixed k, nMSE falls as a power law in n (with an irreducible term)",
         f"alpha {c.get('alpha', float('nan')):.3g}, 95 % profile interval "
         f"[{_num(alpha_iv[0])}, {_num(alpha_iv[1])}], c {c.get('c', float('nan')):.3f}, "
         f"{len(c['n'])} sizes", c["verdict"]),
        ("Lower nMSE goes with a lower downstream loss (delta loss against nMSE)",
         f"Spearman rank correlation {d['spearman']:.2f} over {d['n_points']} SAEs", d["verdict"]),
        ("Ablating a latent has sparse effects on the logits (sparsity of ablation effects)",
         f"latent / random-direction ratio {_f(e['ablation']['ratio'])}, {_iv(e['ablation']['ratio'])}",
         e["ablation"]["verdict"]),
        ("Single latents are good probes for known binary features (probe loss)",
         f"latent minus residual-channel loss {_f(e['probe']['difference'])} nats, {_iv(e['probe']['difference'])}",
         e["probe"]["verdict"]),
    ]


def _num(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:.3g}"


def _f(iv: dict | None) -> str:
    return "n/a" if not iv else f"{iv['estimate']:.3f}"


def why(r: dict[str, Any]) -> list[str]:
    """One sentence per finding: what decides the verdict at this scale."""
    a, b, c, e = r["frontier"], r["dead"], r["power_law"], r["baselines"]
    widest, tokens = b["rows"][-1], r["plan"]["tokens"]
    per_latent = tokens * 32 / widest["n"]
    return [
        f"{sum(m['topk_nmse'] < m['relu_nmse'] for m in a['matched'])} of {len(a['matched'])} TopK points lie below "
        "the ReLU frontier; ReLU's L0 is set by lambda, so only TopK points inside ReLU's L0 range are compared.",
        f"Dead = no fire in the last {b['window_tokens']:,} training tokens (1/8 of the run). At {tokens:,} tokens "
        f"each latent of the widest SAE expects {per_latent:,.0f} activations. " + auxk_why(r["auxk_strength"]),
        "Held-out nMSE after one pass over the same tokens; " + (c.get("note") or "the nMSE falls with every n")
        + ". The interval is the profile likelihood of alpha (a and c refitted for each alpha).",
        "Every SAE evaluated here (TopK at all n and k, ReLU + L1) on the same 8,192 predictions; the rank "
        "correlation asks only whether the order agrees (>= 0.8: holds).",
        *baseline_notes(e),
    ]


def auxk_why(rows: list[dict[str, Any]]) -> str:
    """What the AuxK-strength runs say about why AuxK does or does not revive latents here."""
    base, strong = rows[0], rows[-1]
    slow = base["dead_step_ratio"] is not None and base["dead_step_ratio"] < 0.25 * base["live_step_ratio"]
    text = (f"At n = {base['n']:,} with the recipe's coefficient {base['auxk_coef']:g}, one Adam step moves a dead "
            f"latent's decoder row {_num(base['dead_step_ratio'])} of its gradient's scale against "
            f"{_num(base['live_step_ratio'])} for a live one")
    if slow:
        text += (": Adam divides by its memory of the larger gradients the latent had while alive (beta2 "
                 f"{base['beta2']}, ~1,000 steps, longer than this run), so AuxK's small gradient barely moves it")
    text += (f". With coefficient {strong['auxk_coef']:g}: {_pct(strong['train_dead_frac'])} dead and "
             f"{strong['revivals']} revivals, against {_pct(base['train_dead_frac'])} and {base['revivals']}.")
    return text


REVIVALS = ("Dead is the trainer's window at the last step; inactive is never fired on the eval tokens; a revival is "
            "a latent dead at a step's start that fires in that step (each such latent at each step counts one, summed "
            "over the run, with or without AuxK).")
"""What the dead-latent table's words mean, as the trainer counts them (docs/training.md)."""


def markdown(r: dict[str, Any], images: dict[str, str]) -> str:
    rows = [f"| {i + 1} | {s} | {fig} | **{v}** | {w} |"
            for i, ((s, fig, v), w) in enumerate(zip(findings(r), why(r)))]
    dead_rows = [f"| {x['n']:,} | {_pct(x.get('auxk_train_dead_frac'))} | {_pct(x.get('plain_train_dead_frac'))} | "
                 f"{_pct(x.get('auxk_eval_inactive_frac'))} | {_pct(x.get('plain_eval_inactive_frac'))} | "
                 f"{x.get('auxk_revivals')} | {x.get('plain_revivals')} | {x.get('auxk_nmse', float('nan')):.4f} | "
                 f"{x.get('plain_nmse', float('nan')):.4f} |"
                 for x in r["dead"]["rows"]]
    strength_rows = [f"| {x['n']:,} | {x['auxk_coef']:g} | {_pct(x['train_dead_frac'])} | {_pct(x['eval_inactive_frac'])} "
                     f"| {x['revivals']} | {x['nmse']:.4f} | {x['delta_ce']:.4f} | {_num(x['dead_step_ratio'])} "
                     f"| {_num(x['live_step_ratio'])} |" for x in r["auxk_strength"]]
    times = wall_time_rows(r["seconds"], r["recorded_seconds"])
    return "\n".join([
        "# The paper's comparisons, reproduced on the default model", "",
        f"Command: `{r['command']}` ({r['wall_min']:.0f} min for the stages run by that call; machine: {r['machine']}).",
        f"SmolLM2-135M-Instruct `blocks.9.hook_resid_post`, context 64, {r['plan']['tokens']:,} training tokens seen "
        "once by every SAE (the same tokens in the same order), batch 4,096; held-out Wikipedia for every metric "
        f"(nMSE on {EVAL.recon_tokens:,} tokens, delta CE on {EVAL.downstream_tokens:,} predictions). "
        "The paper trains far longer on GPT-2 and GPT-4: these are its comparisons at a CPU scale.", "",
        "## Findings", "",
        "| # | the paper | measured here | verdict | why |", "|---|---|---|---|---|", *rows, "",
        "## (a) Sparsity against reconstruction", "", f"![frontier]({images['frontier']})", "",
        "## (b) Dead latents with and without AuxK", "", f"![dead]({images['dead']})", "",
        "| n | dead, AuxK | dead, none | inactive on eval, AuxK | inactive on eval, none | revivals, AuxK "
        "| revivals, none | nMSE, AuxK | nMSE, none |", "|---|---|---|---|---|---|---|---|---|", *dead_rows, "",
        REVIVALS, "",
        "AuxK's strength, and how far one Adam step moves a latent at the end of the run (the median over "
        "decoder rows of the median |gradient| / sqrt(second moment), on a fresh batch; dead vs live rows):", "",
        "| n | AuxK coefficient | dead | inactive on eval | revivals | nMSE | delta CE | step ratio, dead rows "
        "| step ratio, live rows |", "|---|---|---|---|---|---|---|---|---|", *strength_rows, "",
        "## (c) nMSE against n", "", f"![power law]({images['power_law']})", "",
        "## (d) Downstream loss against reconstruction", "", f"![delta loss]({images['delta_loss']})", "",
        "## (e) Latents against baselines", "", f"![baselines]({images['baselines']})", "",
        "## Wall time", "",
        "Recorded: what each stage's results took, every call that worked on them counted (training: the pass "
        "that trains a sweep's SAEs together; evaluation: the core eval's reconstruction and downstream parts, "
        "the model load left out; the paper suite: its metrics' wall time). This call: the stages as this call "
        "ran them, ~0 where it found them done.", "",
        "| stage | recorded | this call |", "|---|---|---|", *times, "",
    ])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def auxk_strength(scale: list[dict], coef: list[dict], out: Path, acts: Path) -> list[dict[str, Any]]:
    """The AuxK run at coef_n with the recipe's coefficient and with 1, each with Adam's step ratios."""
    n = coef[0]["n_latents"]
    runs = [(next(r for r in scale if r["auxk"] and r["n_latents"] == n), out / "scale"), *((r, out / "auxk-coef") for r in coef)]
    rows = []
    for r, folder in runs:
        coefficient = read_json(folder / r["run"] / "train_config.json", "training config")["train"]["auxk_coef"]
        rows.append({"n": n, "auxk_coef": coefficient, **{key: r[key] for key in
                     ("train_dead_frac", "eval_inactive_frac", "revivals", "nmse", "delta_ce")},
                     **adam_memory(folder / r["run"], acts)})
    return rows


def analyse(out: Path, plan: dict[str, Any], acts: Path) -> dict[str, Any]:
    topk, relu, scale, coef = (runs_of(out / name) for name in ("frontier-topk", "frontier-relu", "scale", "auxk-coef"))
    return {"plan": plan, "frontier": frontier(topk, relu), "dead": dead_latents(scale),
            "auxk_strength": auxk_strength(scale, coef, out, acts),
            "power_law": power_law(scale), "delta_loss": delta_loss(topk + relu + scale),
            "baselines": baselines(out, plan), "_runs": {"topk": topk, "relu": relu, "scale": scale}}


def write_page(r: dict[str, Any], doc: Path) -> None:
    runs = r.pop("_runs")
    img_dir = doc.parent / "images"
    images = {name: f"images/reproduction_{name}.png" for name in
              ("frontier", "dead", "power_law", "delta_loss", "baselines")}
    plot_frontier(runs["topk"], runs["relu"], r["plan"]["frontier_n"], img_dir / "reproduction_frontier.png")
    plot_dead(r["dead"], runs["scale"], img_dir / "reproduction_dead.png")
    plot_power_law(r["power_law"], img_dir / "reproduction_power_law.png")
    fn = f"n = {r['plan']['frontier_n']:,}"
    plot_delta_loss({f"TopK, {fn}": runs["topk"], f"ReLU + L1, {fn}": runs["relu"],
                     "TopK k = 32, AuxK": [x for x in runs["scale"] if x["auxk"]],
                     "TopK k = 32, no AuxK": [x for x in runs["scale"] if not x["auxk"]]},
                    img_dir / "reproduction_delta_loss.png")
    plot_baselines(r["baselines"], img_dir / "reproduction_baselines.png")
    write_text(doc, markdown(r, images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="study folder (activations/ and one folder per sweep)")
    ap.add_argument("--activations", help="an activation cache to reuse (SmolLM2 blocks.9.hook_resid_post, context 64)")
    ap.add_argument("--smoke", action="store_true", help="3 sizes, 2 k, 2 lambdas on 131,072 tokens")
    ap.add_argument("--doc", default=None,
                    help="the page to write (default: docs/reproduction.md; with --smoke OUT/reproduction.md, so a "
                         "trial run leaves the published page alone)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    args = ap.parse_args()
    plan = SMOKE if args.smoke else FULL
    out = Path(args.out)
    if args.doc is None:
        args.doc = str(out / "reproduction.md" if args.smoke else ROOT / "docs" / "reproduction.md")
    t0 = time.perf_counter()
    seconds = run_stages(args, plan, out)
    r = {**analyse(out, plan, activations_of(args, out)), "seconds": seconds, "command": command_line(),
         "recorded_seconds": recorded_seconds(out, plan, None if args.activations else activations_of(args, out)),
         "machine": machine_info(), "wall_min": (time.perf_counter() - t0) / 60}
    write_page(r, Path(args.doc))
    write_json(out / "reproduction.json", json.loads(json.dumps(r, default=str)))
    print(f"wrote {args.doc} and {out / 'reproduction.json'} in {r['wall_min']:.1f} min")


if __name__ == "__main__":
    main()
