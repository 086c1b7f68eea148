"""Evaluation suites: ``saelab eval SAE --suite core|paper``, and ``saelab eval SWEEP_DIR``.

- ``core``: reconstruction (nMSE, L0, dead and dense latents) and the spliced LM loss (delta CE,
  KL, CE recovered), as ``saelab.pipeline.evaluate`` has always done: ``OUT/metrics.json``.
- ``paper``: core plus the paper's other metrics, each where it applies:
  ``compute_equivalent`` (§4.1; needs a checkpoint series of the model's family),
  ``ablation_sparsity`` (§4.5), ``probe`` (§4.2) and ``n2g`` (§4.3-4.4, with its splice). Each
  writes ``OUT/evals/<metric>.json``; then ``OUT/evals/report.md`` gathers them in tables and
  plots and ``OUT/evals/suite.json`` indexes the run. ``OUT`` is the run folder (or ``--out``).

The suite is resumable: a metric whose file holds an ``ok`` result computed from the same inputs
(the SAE's weights, model, hook, eval corpus, context size, contexts and the metric's config) is
not run again, unless ``overwrite``. An interrupted suite keeps every metric finished before the
interruption; compute-equivalent also keeps each checkpoint's loss (``evals/series_losses.json``).

All metrics read the same packed eval contexts (the eval corpus, the SAE's context size, BOS
first): compute-equivalent uses the core eval's downstream contexts and its spliced and clean
losses, so every loss it compares is measured on the same predictions.

Envelope of every ``OUT/evals/<metric>.json`` (``schema_version`` 1)::

    metric          "core" | "compute_equivalent" | "ablation_sparsity" | "probe" | "n2g"
    schema_version  1
    status          "ok" | "skipped" (the metric does not apply; reason says why) | "error" (reason: the error)
    reason          None or a sentence
    inputs          what the result depends on (see above); a re-run reuses an ok result with equal inputs
    sae             {source, n_latents, k, hook, model, input_norm, sha256}
    eval            {corpus, context_size, n_contexts, position_0}
    wall_s          seconds the metric took when it was computed
    created         UTC time it was computed (ISO 8601)
    result          the metric's own result (schema in its module's docstring), None unless ok

``suite.json``: ``{suite, schema_version, sae, model, hook, eval, metrics: {name: {status, reason,
reused, wall_s, file}}, wall_s (this invocation), metrics_wall_s (sum over metrics as computed)}``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.errors import SaelabError
from saelab.evals._common import config_dict
from saelab.evals.ablation_sparsity import AblationSparsityConfig, run_ablation_sparsity
from saelab.evals.compute_equivalent import (
    ComputeEquivalentConfig,
    known_series_names,
    resolve_series,
    run_compute_equivalent,
    series_for_model,
)
from saelab.evals.n2g import N2GConfig, _padding_id, run_n2g
from saelab.evals.probe import ProbeConfig, run_probe
from saelab.utils.atomic import write_json

PAPER_METRICS = ("core", "compute_equivalent", "ablation_sparsity", "probe", "n2g")
SCHEMA_VERSION = 1
EVALS_DIR = "evals"


@dataclass
class PaperSuiteConfig:
    """Which paper metrics to run and on how much text (sizes chosen so an n=16384 SAE on the
    default model takes minutes on 2 CPU cores)."""

    metrics: tuple[str, ...] = ()
    """Metrics to run, of core compute_equivalent ablation_sparsity probe n2g; () = all that apply.
    A metric named here that does not apply is an error."""
    ablation_contexts: int = 64
    """Eval contexts the ablation-sparsity sites are drawn from."""
    probe_contexts: int = 512
    """Eval contexts whose tokens are labelled for the probe tasks."""
    n2g_contexts: int = 256
    """Eval contexts for N2G: the first part builds the explanations, the rest (n2g heldout_frac) scores them."""
    compute_equivalent: ComputeEquivalentConfig = field(default_factory=ComputeEquivalentConfig)
    ablation_sparsity: AblationSparsityConfig = field(default_factory=AblationSparsityConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    n2g: N2GConfig = field(default_factory=N2GConfig)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in PAPER_METRICS]
        if unknown:
            raise SaelabError(f"unknown metric(s) {unknown}; the paper suite has {', '.join(PAPER_METRICS)}")
        for name in ("ablation_contexts", "probe_contexts"):
            if getattr(self, name) < 1:
                raise SaelabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n2g_contexts < 2:
            raise SaelabError(f"n2g_contexts must be >= 2 (build and held-out parts), got {self.n2g_contexts}")


NESTED = ("compute_equivalent", "ablation_sparsity", "probe", "n2g")


def sae_sha256(sae) -> str:
    """Hash of an SAE's weights and shape-defining config: evaluation results belong to exactly these."""
    h = hashlib.sha256()
    c = sae.cfg
    h.update(json.dumps([c.d_in, c.n_latents, c.k, c.input_norm, c.hook_name, c.exclude_first]).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _jsonable(obj: Any) -> Any:
    """A metric result for JSON: tuples become lists, NaN and inf (undefined values) become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _applies(name: str, lm, sae, cfg: PaperSuiteConfig, T: int, first: int) -> str | None:
    """None when metric ``name`` applies, else the reason it does not."""
    if name == "compute_equivalent":
        if cfg.compute_equivalent.series is None and series_for_model(lm.name) is None:
            return (f"no checkpoint series is known for model {lm.name!r} (built in: GPT-2 small -> crfm-gpt2-small, "
                    "EleutherAI/pythia-<size> -> pythia-<size>); pass --series NAME or a folder of checkpoints")
    if name == "ablation_sparsity":
        n_future = cfg.ablation_sparsity.n_future
        if T - n_future < first:
            return f"contexts of {T} tokens leave no position with n_future={n_future} tokens after it"
    if name == "probe" and not (cfg.probe.tasks or cfg.probe.hf_tasks):
        return "no probe tasks selected"
    if name == "n2g":
        try:
            _padding_id(lm.tokenizer, cfg.n2g.padding_token)
        except ValueError as e:
            return str(e)
    return None


def run_paper_suite(sae, out_dir: str | Path, *, lm=None, source: str = "", eval_cfg=None,
                    cfg: PaperSuiteConfig | None = None, run_dir: str | Path | None = None,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the paper suite on ``sae`` (a TopKSAE or anything ``load_sae`` reads); see the module docstring.

    ``lm``: a LanguageModel or model spec (default: the SAE's model). ``run_dir``: when the SAE is a
    run folder's, the core metrics also go to its metrics.json and its report.md is rewritten.
    Returns the suite index (suite.json). Raises SaelabError after writing everything when a
    metric failed.
    """
    from saelab.data import token_contexts
    from saelab.pipeline import EvalConfig, _load_lm, _resolve_corpus, evaluate
    from saelab.sae import TopKSAE, load_sae

    t_start = time.perf_counter()
    cfg = cfg or PaperSuiteConfig()
    eval_cfg = eval_cfg or EvalConfig()
    if not isinstance(sae, TopKSAE):
        source = source or str(sae)
        sae = load_sae(sae)
    if not sae.cfg.hook_name:
        raise SaelabError(f"SAE {source or '(given)'} records no hook; pass the hook it reads (--hook)")
    lm = _load_lm(lm or sae.cfg.model_name or "default")
    hook = lm.check_hook(sae.cfg.hook_name)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook} of {lm.name}")
    out_dir = Path(out_dir)
    evals = out_dir / EVALS_DIR
    corpus = _resolve_corpus(eval_cfg.corpus, "eval")
    T = eval_cfg.context_size or sae.cfg.context_size
    first = 1 if sae.cfg.exclude_first else 0
    per_ctx = T - first

    # What runs: everything that applies, or exactly what was asked for.
    wanted = list(cfg.metrics) or list(PAPER_METRICS)
    reasons = {m: _applies(m, lm, sae, cfg, T, first) for m in wanted}
    if cfg.metrics:
        bad = {m: r for m, r in reasons.items() if r}
        if bad:
            raise SaelabError("metric(s) asked for do not apply: " + "; ".join(f"{m}: {r}" for m, r in bad.items()))
    series = None
    if "compute_equivalent" in wanted and not reasons["compute_equivalent"]:
        ce = cfg.compute_equivalent
        series = resolve_series(ce.series or series_for_model(lm.name), ce.steps, device=lm.device)

    n_down = math.ceil(eval_cfg.downstream_tokens / per_ctx)
    sizes = {"core": n_down, "compute_equivalent": n_down, "ablation_sparsity": cfg.ablation_contexts,
             "probe": cfg.probe_contexts, "n2g": cfg.n2g_contexts}
    n_ctx = max(sizes[m] for m in wanted if not reasons[m]) if any(not r for r in reasons.values()) else 1
    tokens = token_contexts(corpus, lm.tokenize, T, n_contexts=n_ctx, bos_token_id=lm.bos_token_id,
                            prepend_bos=sae.cfg.prepend_bos)
    sha = sae_sha256(sae)
    sae_info = {"source": source, "n_latents": sae.n_latents, "k": sae.cfg.k, "hook": hook, "model": lm.name,
                "input_norm": sae.cfg.input_norm, "sha256": sha}
    base_inputs = {"sae_sha256": sha, "model": lm.name, "hook": hook, "corpus": str(corpus), "context_size": T,
                   "prepend_bos": sae.cfg.prepend_bos, "position_0": "excluded" if first else "included"}
    index: dict[str, Any] = {"suite": "paper", "schema_version": SCHEMA_VERSION, "sae": sae_info, "model": lm.name,
                             "hook": hook, "eval": {"corpus": str(corpus), "context_size": T,
                                                    "position_0": base_inputs["position_0"]}, "metrics": {}}
    core_result: dict | None = None
    errors = []

    def envelope(name: str, inputs: dict, status: str, reason: str | None, result: dict | None,
                 wall: float) -> dict:
        return {"metric": name, "schema_version": SCHEMA_VERSION, "status": status, "reason": reason,
                "inputs": inputs, "sae": sae_info,
                "eval": {"corpus": str(corpus), "context_size": T, "n_contexts": inputs.get("n_contexts"),
                         "position_0": base_inputs["position_0"]},
                "wall_s": round(wall, 3), "created": _now(), "result": result}

    def step(name: str, config: dict, fn: Callable[[], dict]) -> dict | None:
        path = evals / f"{name}.json"
        inputs = {**base_inputs, "n_contexts": sizes[name], "config": config}
        if reasons[name]:
            write_json(path, envelope(name, inputs, "skipped", reasons[name], None, 0.0))
            index["metrics"][name] = {"status": "skipped", "reason": reasons[name], "reused": False, "wall_s": 0.0,
                                      "file": f"{EVALS_DIR}/{name}.json"}
            return None
        old = None if overwrite else _read(path)
        if old and old.get("status") == "ok" and old.get("inputs") == json.loads(json.dumps(inputs)):
            index["metrics"][name] = {"status": "ok", "reason": None, "reused": True, "wall_s": old["wall_s"],
                                      "file": f"{EVALS_DIR}/{name}.json"}
            return old["result"]
        if progress:
            print(f"[paper suite] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result, status, reason = _jsonable(fn()), "ok", None
        except (SaelabError, ValueError, RuntimeError, OSError) as e:
            result, status, reason = None, "error", f"{type(e).__name__}: {e}"
            errors.append(name)
        wall = time.perf_counter() - t0
        write_json(path, envelope(name, inputs, status, reason, result, wall))
        index["metrics"][name] = {"status": status, "reason": reason, "reused": False, "wall_s": round(wall, 3),
                                  "file": f"{EVALS_DIR}/{name}.json"}
        return result

    if "core" in wanted:
        core_dir = Path(run_dir) if run_dir is not None else out_dir
        core_result = step("core", config_dict(eval_cfg),
                           lambda: evaluate(sae, lm=lm, cfg=eval_cfg, out_dir=core_dir, progress=progress))
    if "compute_equivalent" in wanted:
        ce_cfg = cfg.compute_equivalent
        ce_tokens = tokens[:n_down]
        ce_inputs = config_dict(ce_cfg) | {"series": series.info() if series else None}

        def ce_fn() -> dict:
            spliced = clean = None
            if core_result and core_result.get("n_predictions") == n_down * (T - 1 - first):
                spliced, clean = core_result["ce_spliced"], core_result["ce_clean"]  # same predictions
            return run_compute_equivalent(lm, sae, ce_tokens, ce_cfg, series=series, spliced_loss=spliced,
                                          clean_loss=clean, cache_path=evals / "series_losses.json",
                                          plot_path=evals / "compute_equivalent.png")
        step("compute_equivalent", ce_inputs, ce_fn)
    if "ablation_sparsity" in wanted:
        a_cfg = cfg.ablation_sparsity
        step("ablation_sparsity", config_dict(a_cfg),
             lambda: run_ablation_sparsity(lm, sae, tokens[:cfg.ablation_contexts], a_cfg))
    if "probe" in wanted:
        p_cfg = cfg.probe
        step("probe", config_dict(p_cfg), lambda: run_probe(lm, sae, tokens[:cfg.probe_contexts], p_cfg))
    if "n2g" in wanted:
        n_cfg = cfg.n2g
        step("n2g", config_dict(n_cfg), lambda: run_n2g(lm, sae, tokens[:cfg.n2g_contexts], n_cfg))

    index["wall_s"] = round(time.perf_counter() - t_start, 2)
    index["metrics_wall_s"] = round(sum(m["wall_s"] for m in index["metrics"].values()), 2)
    write_json(evals / "suite.json", index)
    from saelab.report.paper import write_paper_report

    write_paper_report(out_dir)
    if run_dir is not None and (Path(run_dir) / "train_config.json").exists():
        from saelab.report.markdown import write_run_report

        write_run_report(run_dir)  # with the core metrics and a link to evals/report.md
    if errors:
        detail = "; ".join(f"{m}: {index['metrics'][m]['reason']}" for m in errors)
        raise SaelabError(f"paper suite wrote {evals / 'report.md'} but failed in {len(errors)} metric(s): {detail}")
    return index


# ---- sweeps -------------------------------------------------------------------------------------
def sweep_runs(folder: str | Path) -> list[Path]:
    """Run folders (with a trained SAE) directly inside ``folder``, in natural name order (n4096 before n16384)."""
    import re

    from saelab.train.checkpoint import SAE_DIR, TRAIN_CONFIG

    folder = Path(folder)
    if not folder.is_dir():
        return []
    runs = [p for p in folder.iterdir()
            if p.is_dir() and (p / TRAIN_CONFIG).exists() and (p / SAE_DIR / "cfg.json").exists()]
    return sorted(runs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def is_sweep_folder(path: str | Path) -> bool:
    """A folder that is not a run or SAE folder itself but holds run folders."""
    from saelab.train.checkpoint import SAE_DIR

    path = Path(path)
    return (path.is_dir() and not (path / SAE_DIR).is_dir() and not (path / "cfg.json").exists()
            and bool(sweep_runs(path)))


def evaluate_sweep(folder: str | Path, cfg=None, *, model: str | None = None, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Core-evaluate every run of a sweep folder (one model load); runs with a metrics.json are skipped."""
    from saelab.pipeline import EvalConfig, _load_lm, evaluate
    from saelab.report.markdown import write_run_report
    from saelab.sae import load_sae
    from saelab.train.checkpoint import SAE_DIR

    cfg = cfg or EvalConfig()
    runs = sweep_runs(folder)
    if not runs:
        raise SaelabError(f"{folder}: no run folders with a trained SAE inside; expected the output folder of "
                          "`saelab sweep`")
    models: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for run in runs:
        if (run / "metrics.json").exists() and not overwrite:
            out[run.name] = "already evaluated"
            continue
        sae = load_sae(run / SAE_DIR)
        spec = model or sae.cfg.model_name or "default"
        if spec not in models:
            models[spec] = _load_lm(spec)
        if progress:
            print(f"[sweep eval] {run.name}", flush=True)
        m = evaluate(sae, lm=models[spec], cfg=cfg, out_dir=run, progress=progress)
        write_run_report(run)
        out[run.name] = {k: m[k] for k in ("nmse", "l0", "delta_ce") if k in m}
    return out


# ---- the CLI ------------------------------------------------------------------------------------
_SKIP = ("hook", "exclude_first", "progress")
_GROUPS = (("compute_equivalent", ComputeEquivalentConfig, "ce_", "compute-equivalent (paper suite)",
            _SKIP + ("series", "steps")),
           ("ablation_sparsity", AblationSparsityConfig, "abl_", "ablation sparsity (paper suite)", _SKIP),
           ("probe", ProbeConfig, "probe_", "probe loss (paper suite)", _SKIP),
           ("n2g", N2GConfig, "n2g_", "N2G explanations (paper suite)", _SKIP))


def add_suite_arguments(p) -> None:
    """The options of `saelab eval` that choose and size the suite."""
    from saelab.utils.dataclass_args import add_dataclass_args

    p.add_argument("--suite", choices=("core", "paper"), default="core",
                   help="core: reconstruction and spliced loss; paper: core plus compute-equivalent, ablation "
                        "sparsity, probe loss and N2G, each in OUT/evals/<metric>.json, with OUT/evals/report.md")
    p.add_argument("--series", default=None,
                   help="checkpoint series for compute-equivalent: " + ", ".join(known_series_names()[:2])
                        + ", pythia-<size>[-deduped] or a folder of checkpoints (default: the model's own, if known)")
    p.add_argument("--series-steps", type=int, nargs="*", default=None,
                   help="training steps of a hub series to measure (default: a log-spaced subset)")
    add_dataclass_args(p, PaperSuiteConfig, skip=NESTED, title="paper suite")
    for _, cls, prefix, title, skip in _GROUPS:
        add_dataclass_args(p, cls, prefix=prefix, title=title, skip=skip)


def suite_config_from_args(args) -> PaperSuiteConfig:
    from saelab.utils.dataclass_args import dataclass_from_args

    nested = {}
    for name, cls, prefix, _, _ in _GROUPS:
        extra = {"progress": args.progress} if name in ("ablation_sparsity", "compute_equivalent") else {}
        if name == "compute_equivalent":
            extra |= {"series": args.series, "steps": tuple(args.series_steps or ())}
        if name == "n2g" and "n2g_latents" in vars(args):
            extra["latents"] = tuple(int(v) for v in args.n2g_latents)
        nested[name] = dataclass_from_args(cls, args, prefix=prefix, **extra)
    return dataclass_from_args(PaperSuiteConfig, args, **nested)


def eval_command(args) -> dict:
    """`saelab eval` for a sweep folder or with --suite paper (the core suite of one SAE stays in the CLI)."""
    from saelab.pipeline import EvalConfig
    from saelab.sae import load_sae
    from saelab.train.checkpoint import SAE_DIR
    from saelab.utils.dataclass_args import dataclass_from_args

    eval_cfg = dataclass_from_args(EvalConfig, args)
    if is_sweep_folder(args.sae):
        if args.suite != "core":
            raise SaelabError(f"{args.sae} is a sweep folder; --suite paper evaluates one SAE: run it on each "
                              "run folder you want the paper metrics of")
        return evaluate_sweep(args.sae, eval_cfg, model=args.model, overwrite=args.overwrite, progress=args.progress)
    source = Path(args.sae)
    is_run = source.is_dir() and (source / SAE_DIR).is_dir()
    sae = load_sae(source / SAE_DIR if is_run else args.sae)
    if args.hook:
        sae.cfg.hook_name = args.hook
    out = args.out or (str(source) if is_run else None)
    if out is None:
        raise SaelabError(f"--suite paper writes its results to a folder: pass --out DIR for {args.sae}, which is "
                          "not a run folder")
    index = run_paper_suite(sae, out, lm=args.model, source=args.sae, eval_cfg=eval_cfg,
                            cfg=suite_config_from_args(args), run_dir=source if is_run and out == str(source) else None,
                            overwrite=args.overwrite, progress=args.progress)
    return {"report": str(Path(out) / EVALS_DIR / "report.md"),
            **{m: v["status"] + (" (reused)" if v["reused"] else "") for m, v in index["metrics"].items()}}


__all__ = ["PAPER_METRICS", "PaperSuiteConfig", "add_suite_arguments", "eval_command", "evaluate_sweep",
           "is_sweep_folder", "run_paper_suite", "sae_sha256", "suite_config_from_args", "sweep_runs"]
