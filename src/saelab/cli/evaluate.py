"""`saelab eval | report`: shells over saelab.pipeline's evaluation jobs and saelab.report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from saelab.cli.common import (add_io_options, add_model_option, add_sae_argument, add_verb, eval_settings_as_given,
                               given, typed_starting)
from saelab.errors import ConfigError, RunExistsError, SaelabError
from saelab.evals.config import (AblationSparsityConfig, ComputeEquivalentConfig, EvalConfig, N2GConfig,
                                 PaperSuiteConfig, ProbeConfig, known_series_names)
from saelab.run_folder import (ARTEFACTS, EVAL_METRICS, TRAIN_CONFIG, check_model_carried, check_sae_hook,
                               check_sweep_has_finished_runs, holds_artefact, is_sweep, open_sae, read_eval_metrics,
                               sae_sha256, sweep_runs, unfinished_runs_line)
from saelab.utils.words import plural

# Each paper metric's settings as an option group of its own: (dest, class, option prefix).
METRIC_GROUPS = (("compute_equivalent", ComputeEquivalentConfig, "ce-"),
                 ("ablation_sparsity", AblationSparsityConfig, "abl-"),
                 ("probe", ProbeConfig, "probe-"),
                 ("n2g", N2GConfig, "n2g-"))


# The options of each paper metric but core (whose settings every metric reads): its group's, and its
# share of the text.
METRIC_OPTIONS = {"compute_equivalent": ("--series", "--ce-"), "ablation_sparsity": ("--ablation-contexts", "--abl-"),
                  "probe": ("--probe-",), "n2g": ("--n2g-",)}

# The eval settings only some metrics read, by those metrics (saelab.evals.suite._contexts_read): the rest
# (corpus, context size, sample pool, ...) choose the eval contexts, which every metric reads.
EVAL_SETTING_READERS = {"eval.recon_tokens": ("core",), "eval.downstream_tokens": ("core", "compute_equivalent"),
                        "eval.ablations": ("core",), "eval.variants_per_forward": ("core",)}


def add_eval(sub) -> None:
    p = add_verb(sub, "eval")
    add_sae_argument(p, "the SAE to evaluate:", also=", or a sweep folder (each of its runs)")
    add_model_option(p)
    p.add_argument("--hook", default=None, help="override the SAE's hook name")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where to write metrics.json, and evals/ with --suite paper (default: the run folder, if "
                        "given one)")
    p.add_argument("--suite", choices=("core", "paper"), default="core",
                   help="core: reconstruction and spliced loss; paper: also compute-equivalent, ablation sparsity, "
                        "probe loss and N2G, each in OUT/evals/<metric>.json, with OUT/evals/report.md")
    p.add_argument("--series", default=None,
                   help="reference models for compute-equivalent: a model family (pythia-family[-deduped][:SIZES] "
                        "or a folder with family.json: the paper's compute-equivalent) or a checkpoint series ("
                        + ", ".join(known_series_names()[:1]) + ", pythia-<size>[-deduped] or a folder of checkpoints: "
                        "the training-progress equivalent); default: the model's own, if known (Pythia: its family)")
    p.add_argument("--series-steps", type=int, nargs="*", default=None,
                   help="training steps of a hub series to measure (default: a log-spaced subset)")
    p.add_arguments(EvalConfig, dest="eval")
    p.add_arguments(PaperSuiteConfig, dest="suite_cfg")
    for dest, cls, prefix in METRIC_GROUPS:
        group = p.add_arguments(cls, dest=dest, prefix=prefix)
        # simple_parsing builds the group's config with dataclass_fn: its __post_init__ refusals then read
        # "--n2g-max-len must be >= 1", the option typed, where they would read "max_len must be >= 1".
        group.dataclass_fn = _named_by_options(cls, {f.name: f"--{prefix}{f.name.replace('_', '-')}"
                                                     for f in dataclasses.fields(cls)})
    add_io_options(p)
    p.set_defaults(handler=run_eval)


def _with_option_name(err: ConfigError, options: dict[str, str]) -> ConfigError:
    """``err`` with the setting it opens with ("max_len must be >= 1", the config checks' wording) as its
    option; the CLI's own rewording finds options by setting name, which cannot tell the groups' fields of
    one name apart (lm_batch_size is --ce-, --probe- and --n2g-lm-batch-size)."""
    first, _, rest = str(err).partition(" ")
    return ConfigError(f"{options[first]} {rest}") if first in options else err


def _named_by_options(cls: type, options: dict[str, str]):
    """The constructor the parser calls for ``cls``, its refusals naming ``options`` (--n2g-max-len)."""
    def construct(**kwargs: Any):
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise _with_option_name(e, options) from None
    return construct


def suite_config(args: argparse.Namespace) -> PaperSuiteConfig:
    """The paper suite's config from the parsed option groups (runtime fields filled from the verb's flags)."""
    try:
        ce = dataclasses.replace(args.compute_equivalent, series=args.series, steps=tuple(args.series_steps or ()),
                                 progress=args.progress)
    except ConfigError as e:  # steps and series come from --series-steps and --series
        raise _with_option_name(e, {"steps": "--series-steps", "series": "--series"}) from None
    abl = dataclasses.replace(args.ablation_sparsity, progress=args.progress)
    return dataclasses.replace(args.suite_cfg, compute_equivalent=ce, ablation_sparsity=abl, probe=args.probe,
                               n2g=args.n2g)


def _check_eval_out(out: Path, overwrite: bool, changes: list[str] | None = None) -> None:
    """--out for another SAE's metrics: never a run folder (its metrics.json is its own SAE's) or another
    saelab folder, and an earlier evaluation there is kept unless ``overwrite``: --overwrite, or that evaluation
    is this one with intervals an earlier saelab made (:func:`saelab.pipeline.earlier_evaluation`), made again.
    ``changes``: where it is this SAE's, the settings it differs in (:func:`saelab.pipeline.evaluation_changes`),
    named as ``saelab eval RUN`` names them."""
    if (out / TRAIN_CONFIG).is_file():
        raise ConfigError(f"--out {out} is the run folder of another SAE; its metrics.json describes that SAE: "
                          "pick another folder")
    for kind, (marker, what) in ARTEFACTS.items():
        if holds_artefact(out, kind):
            raise ConfigError(f"--out {out} is {what} ({marker}); expected a folder for this evaluation (new, or "
                              "one that holds only evaluations)")
    if (out / EVAL_METRICS).exists() and not overwrite:
        which = f"of this SAE with other settings ({', '.join(changes)})" if changes else f"({EVAL_METRICS})"
        raise RunExistsError(f"--out {out} already holds an evaluation {which}; pass --overwrite to replace it, or "
                             "pick another folder")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    suite_only = typed_starting(args, "--series", "--metrics", "--ablation-contexts", "--probe-contexts",
                                "--n2g-contexts", *(f"--{prefix}" for _, _, prefix in METRIC_GROUPS))
    if suite_only and args.suite != "paper":
        raise ConfigError(f"{suite_only[0]} is an option of the paper suite; add --suite paper, or leave it out")
    _refuse_options_of_metrics_left_out(args)
    from saelab.pipeline import evaluate_sweep, paper_suite  # torch, once the options are checked

    if is_sweep(args.sae):
        check_sweep_has_finished_runs(args.sae)
        if args.out or args.hook:
            raise ConfigError(f"{args.sae} is a sweep folder: each run is evaluated into its own folder with its "
                              "own hook; --out and --hook apply to one SAE")
        if args.suite != "core":
            raise ConfigError(f"{args.sae} is a sweep folder; --suite paper evaluates one SAE: run it on each run "
                              "folder you want the paper metrics of")
        _note_unfinished("eval", args.sae, "evaluates the finished runs")
        with eval_settings_as_given(args, "--"):
            return evaluate_sweep(args.sae, args.eval, model=args.model, device=args.device,
                                  model_dtype=args.model_dtype, overwrite=args.overwrite, progress=args.progress,
                                  before_load=lambda saes: _note_runs_on_another_model(args, saes))
    if args.suite == "paper":
        with eval_settings_as_given(args, "--"):
            index = paper_suite(args.sae, out_dir=args.out, lm=args.model, hook=args.hook, eval_cfg=args.eval,
                                cfg=suite_config(args), device=args.device, model_dtype=args.model_dtype,
                                allow_http=args.allow_http, overwrite=args.overwrite, progress=args.progress,
                                before_load=lambda sae, trained_at: _note_another_hook_or_model(args, sae, trained_at))
        return {"report": index["report"],
                **{m: v["status"] + (" (reused)" if v["reused"] else "") for m, v in index["metrics"].items()}}
    with eval_settings_as_given(args, "--"):
        return _eval_core(args)


def _refuse_options_of_metrics_left_out(args: argparse.Namespace) -> None:
    """An option of a paper metric that --metrics leaves out would be accepted and never used."""
    chosen = args.suite_cfg.metrics
    entry = given(args, "suite_cfg.metrics") or "--metrics"  # named as given: as typed, or the file's entry
    if entry.startswith("--config "):
        where, it = f"{entry} [{', '.join(chosen or ())}]", "that entry"
    else:
        where, it = f"{entry} {' '.join(chosen or ())}", entry
    for metric, prefixes in METRIC_OPTIONS.items():
        unused = typed_starting(args, *prefixes) if chosen and metric not in chosen else []
        if unused:
            raise ConfigError(f"{unused[0]} is an option of the {metric} metric, which {where} leaves out; add "
                              f"{metric} to {it}, or leave {unused[0]} out")
    for dest, readers in EVAL_SETTING_READERS.items():
        # typed only: a --config file's eval section may serve every verb and suite (its unused entries are left)
        option = given(args, dest)
        typed = option and not option.startswith("--config ")
        if typed and args.suite == "paper" and chosen and not set(readers) & set(chosen):
            raise ConfigError(f"{option} is an option of the {' and '.join(readers)} "
                              f"{plural(len(readers), 'metric')}, which {where} leaves out; add "
                              f"{' or '.join(readers)} to {it}, or leave {option} out")


def _eval_core(args: argparse.Namespace) -> dict[str, Any]:
    """`saelab eval SAE`: the core metrics into the run folder, into --out, or printed only."""
    from saelab.pipeline import earlier_evaluation, evaluate, evaluate_run, evaluation_changes, notes_before_load

    sae, run = open_sae(args.sae, allow_http=args.allow_http)
    trained_at = sae.cfg.hook_name
    if args.hook:
        sae.cfg.hook_name = args.hook
    check_sae_hook(sae, args.sae)
    if args.model is None:  # named here, before its weights are hashed
        check_model_carried(sae, args.sae)
    into_run = run is not None and (args.out is None or Path(args.out).resolve() == run.resolve())
    if into_run and args.hook:
        raise ConfigError(f"--hook changes what {args.sae}'s SAE reads: its metrics would not describe the run; "
                          "pass --out DIR for them")

    def notes(sae) -> None:  # once every check has passed, before the model loads (as --suite paper says them)
        _note_another_hook_or_model(args, sae, trained_at)

    if into_run:
        return evaluate_run(run, args.eval, lm=args.model, device=args.device, model_dtype=args.model_dtype,
                            overwrite=args.overwrite, progress=args.progress, sae=sae, before_load=notes)
    sae_hash = sae_sha256(sae)  # once, for the check and the evaluation: it reads every weight
    if args.out is not None:
        changes = None if args.overwrite else evaluation_changes(args.out, sae, args.eval, model=args.model,
                                                                 model_dtype=args.model_dtype, sae_hash=sae_hash)
        if changes == []:  # the same command again
            print(f"{Path(args.out) / EVAL_METRICS} already holds this evaluation (--overwrite runs it again)",
                  file=sys.stderr)
            notes_before_load(sae, args.eval, notes)
            return read_eval_metrics(args.out, sae, sae_hash=sae_hash)
        again = earlier_evaluation(args.out, sae, args.eval, model=args.model, model_dtype=args.model_dtype,
                                   sae_hash=sae_hash)
        _check_eval_out(Path(args.out), args.overwrite or again is not None, changes)
    metrics = evaluate(sae, lm=args.model, cfg=args.eval, out_dir=args.out, device=args.device,
                       model_dtype=args.model_dtype, progress=args.progress, sae_hash=sae_hash, before_load=notes)
    if args.out is None:  # an SAE outside a run folder has no place of its own for them
        print(f"saelab eval: note: {args.sae} is not a run folder, so these metrics were not saved; --out DIR keeps "
              "them", file=sys.stderr)
    return metrics


def _note_another_hook_or_model(args: argparse.Namespace, sae, trained_at: str | None,
                                source: str | None = None) -> None:
    """Say, once every check has passed and before the model loads (minutes of model work may follow), that --hook
    read the SAE at another hook than it was trained at, or --model on another model than it records: a
    near miss gives metrics that read as a poor SAE, as top, steer and browse say. ``source``: the SAE as named
    there (default: as given)."""
    from saelab.explore.browser.build import another_hook_words, another_model_words

    source = source or args.sae
    if trained_at and sae.cfg.hook_name != trained_at:
        print(f"saelab eval: note: {another_hook_words(sae.cfg.hook_name, source, trained_at)}", file=sys.stderr)
    words = another_model_words(args.model, source, sae)
    if words:
        print(f"saelab eval: note: {words}", file=sys.stderr)


def _note_runs_on_another_model(args: argparse.Namespace, saes: dict) -> None:
    """The note of a --model other than the runs of a sweep record, before any model loads (a sweep takes no
    --hook): one line naming the sweep where its runs record one model, else one for each run read on another.
    ``saes``: each run's SAE or its settings (``cfg``), which is all the note reads."""
    from saelab.run_folder import sae_model

    if len({sae_model(sae) for sae in saes.values()}) == 1:
        saes = {args.sae: next(iter(saes.values()))}
    for source, sae in saes.items():
        _note_another_hook_or_model(args, sae, sae.cfg.hook_name, source=str(source))


def _note_unfinished(verb: str, sweep: str, what: str) -> None:
    """One line naming the runs of ``sweep`` left out for not having finished training, if any."""
    line = unfinished_runs_line(sweep)
    if line:
        print(f"saelab {verb}: note: this {what} of {sweep}; its {line}", file=sys.stderr)


def add_report(sub) -> None:
    p = add_verb(sub, "report",
                 description="Rewrite a run folder's report.md from its saved results, with training_curves.png "
                             "(from metrics.jsonl) and density.png (from latent_frequencies.safetensors, which "
                             "`saelab eval` saves with the hash of the SAE it measured). A run evaluated before "
                             "that file was saved, or whose SAE changed since its evaluation, keeps its "
                             "density.png, and one line says why. For a sweep folder: the scaling study "
                             "(scaling.md, scaling.json, scaling_nmse.png, scaling_delta_loss.png); for a "
                             "folder of runs trained on other activations (model, hook, context or corpus), "
                             "each run's report.md.")
    p.add_argument("run", metavar="RUN", help="run folder or sweep folder")
    add_io_options(p, device=False, overwrite=False)
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    from saelab.report import (check_study_has_finished_runs, remove_scaling_study, sweep_difference, write_run_report,
                               write_scaling_report)

    if is_sweep(args.run):
        check_study_has_finished_runs(args.run)
        _note_unfinished("report", args.run, "reports the finished runs")
    unlike = sweep_difference(args.run) if is_sweep(args.run) else None
    if unlike:  # runs gathered in one folder: each its own report, no scaling curve across them
        reports = [str(write_run_report(run)) for run in sweep_runs(args.run)]
        removed = remove_scaling_study(args.run)  # an earlier study of runs that no longer make one sweep
        print(f"saelab report: note: the runs in {args.run} are not one sweep ({unlike}; a sweep's runs share "
              "their activations' model, hook, context and corpus): wrote each run's report.md, no scaling study"
              + (f"; removed the earlier one ({', '.join(removed)})" if removed else ""), file=sys.stderr)
        return {"reports": reports}
    if is_sweep(args.run):
        fits = write_scaling_report(args.run)["fits"]
        return {"report": str(Path(args.run) / "scaling.md"),
                **{label: {"alpha": f.get("alpha"), "alpha_interval": f.get("alpha_interval"), "c": f.get("c"),
                           "monotone": f.get("monotone")}
                   for label, f in fits.items()}}
    if not Path(args.run).exists():
        raise SaelabError(f"{args.run}: no such folder; expected a run folder or a sweep folder (saelab train, "
                          "saelab sweep)")
    if not (Path(args.run) / TRAIN_CONFIG).exists():
        what = next((name for kind, (_, name) in ARTEFACTS.items() if holds_artefact(Path(args.run), kind)),
                    "a file" if Path(args.run).is_file() else None)
        raise SaelabError(f"{args.run} is {what + ', not ' if what else 'neither '}a run folder (with {TRAIN_CONFIG}) "
                          f"{'or' if what else 'nor'} a sweep folder of runs")
    return {"report": str(write_run_report(args.run))}
