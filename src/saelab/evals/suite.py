"""Evaluation suites: ``saelab eval SAE --suite core|paper``, and ``saelab eval SWEEP_DIR``.

- ``core``: reconstruction (nMSE, L0, dead and dense latents) and the spliced LM loss (delta CE,
  KL, CE recovered), as :func:`saelab.evals.core.evaluate_core` computes them.
- ``paper``: core plus the paper's other metrics, each where it applies:
  ``compute_equivalent`` (§4.1; needs a model family, or a checkpoint series for its training-progress twin),
  ``ablation_sparsity`` (§4.5), ``probe`` (§4.2) and ``n2g`` (§4.3-4.4, with its splice). Each
  writes ``OUT/evals/<metric>.json`` and ``OUT/evals/suite.json`` indexes the run; the caller
  (``saelab.pipeline.paper_suite``) writes ``OUT/evals/report.md``. ``core`` also saves each latent's
  firing frequency in ``OUT/evals/latent_frequencies.safetensors``, as ``saelab eval`` does beside
  ``metrics.json`` (the report draws ``evals/density.png`` from it). A run's own ``metrics.json``
  (the core evaluation of ``saelab eval RUN``) is left as it is.

The suite is resumable: a metric whose file holds an ``ok`` result computed from the same inputs (the SAE's weights,
model and the dtype it is in, hook, eval corpus by its path and its text's fingerprint, whatever words named it, context
size, contexts, the contexts its draw picked among (:func:`_draw_pool`) and the metric's config; the eval corpus, its
draw and its contexts only where the metric reads them: :data:`EVAL_TEXT_INPUTS`) is not run again, unless
``overwrite``; a result of other inputs is replaced only with ``overwrite``. A result of the same inputs that an
earlier saelab computed otherwise (its ``method``, where the metric's computation changed since, or its
``interval_method`` is another, or none; or it records no model dtype or draw's pool: :func:`earlier_computation`) is
computed again, with a note naming its file and why; the file stays as it was until the new one replaces it, and where
computing it again fails it is kept, its entry in suite.json the error and that it was kept (its numbers are not handed
to the metrics after it). A recompute that measures nothing (:attr:`SuiteMetric.measured_nothing`) replaces it, its
reason saying so: this saelab's verdict on those settings, not a failure to compute. An interrupted suite keeps every
metric finished before the interruption; compute-equivalent also keeps each checkpoint's loss
(``evals/series_losses.json``). core not reused from core.json takes the evaluation ``saelab eval`` or quickstart saved
of the SAE with its settings (``metrics.json`` of the run or OUT, and the latent frequencies beside it:
:class:`EvaluationFound`), with a note, where it would read the same contexts (:func:`_draws_as_evaluated`), rather than
measure it again; unless ``overwrite``.

All metrics read the same eval contexts (the eval corpus, the SAE's context size, BOS first), drawn at random across the
corpus's first ``eval.sample_pool_tokens`` tokens (:func:`saelab.data.draw_contexts`); each metric reads the first ones
it needs, a draw of its own across the corpus (where the pool holds fewer contexts than the suite draws, the draw's size
chooses them: each result records it, :func:`_draw_pool`). compute-equivalent uses the core eval's downstream contexts
and its spliced and clean losses, so every loss it compares is measured on the same predictions (and their per-context
sums, which its interval resamples; a core result reused from an earlier invocation holds none, and compute-equivalent
measures the losses and their sums again, so that its headline and its interval come from one measurement). The metrics
with intervals resample whole documents (a context's document is known from the draw), or their contexts where those
that a metric's intervals read lie in one document.

Envelope of every ``OUT/evals/<metric>.json`` (``schema_version`` 1)::

    metric          "core" | "compute_equivalent" | "ablation_sparsity" | "probe" | "n2g"
    schema_version  1
    status          "ok" | "skipped" (the metric does not apply; reason says why) | "error" (reason: the error)
    reason          None or a sentence
    inputs          what the result depends on (see above); a re-run reuses an ok result with equal inputs
    sae             {source, n_latents, k, hook, model, input_norm, sha256}
    eval            {corpus, context_size, n_contexts, position_0, eval_text}: eval_text "held-out text", or
                    "training text (not held out)" when the eval corpus is the SAE's training text
                    (saelab.evals.core.held_out_label); None for a metric that reads none of its text
    wall_s          seconds the metric took when it was computed
    created         UTC time it was computed (ISO 8601)
    result          the metric's own result (schema in its module's docstring), None unless ok

``suite.json``: ``{suite, schema_version, sae, model, hook, eval, metrics: {name: {status, reason,
reused, wall_s, file}}, wall_s (this invocation), metrics_wall_s (sum over metrics as computed)}``: each metric as this
invocation left it ("error" where computing an earlier saelab's result again failed and its file was kept; its entry
then also holds the error alone, ``recompute_error``, for the report; core taken from a saved evaluation: reused, and
``from``, its metrics.json).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.data import DrawnContexts, draw_contexts, pooled_contexts, resolve_corpus
from saelab.data.text import corpus_fingerprint, fingerprint_as_recorded
from saelab.errors import ConfigError, CorpusError, RunExistsError, SaelabError
from saelab.evals._common import config_dict, first_position, jsonable, position_0_words
from saelab.evals.ablation_sparsity import INTERVAL_METHOD as ABLATION_INTERVALS, run_ablation_sparsity
from saelab.evals.bootstrap import earlier_intervals
from saelab.evals.compute_equivalent import (
    INTERVAL_METHOD as CE_INTERVALS,
    check_checkpoints_before_load,
    checkpoints_to_load,
    resolve_series,
    run_compute_equivalent,
    series_for_model,
)
from saelab.evals.config import PAPER_METRICS, EvalConfig, N2GConfig, PaperSuiteConfig
from saelab.evals.core import (INTERVAL_METHOD as CORE_INTERVALS, core_contexts, eval_settings, evaluate_core,
                               held_out_label, worded_corpus_error)
from saelab.evals.n2g import INTERVAL_METHOD as N2G_INTERVALS, check_latents, padding_id, run_n2g
from saelab.evals.probe import INTERVAL_METHOD as PROBE_INTERVALS, SPLIT_METHOD as PROBE_SPLIT_METHOD, run_probe
from saelab.models.loading import (MODEL_FINGERPRINT, RECORDED_CONTEXT, dtype_name, loaded_dtype, model_fingerprint,
                                   model_provenance)
from saelab.models.lm import CONTEXT_SETTING, context_named
from saelab.run_folder import EVALS_DIR, LatentFrequencies, check_sae_hook, sae_sha256, write_latent_frequencies
from saelab.train.checkpoint import changed_fields
from saelab.utils.atomic import write_json
from saelab.utils.words import plural

SCHEMA_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class EvaluationFound:
    """The core evaluation ``saelab eval`` (or quickstart) saved of the suite's SAE with core's settings: model by
    name, weights and dtype, eval corpus by path and text, eval settings, interval method (as
    :func:`saelab.pipeline.evaluation_is_current` judges metrics.json), for core to take rather than measure again."""

    path: Path
    """Its metrics.json."""
    result: dict
    """Its metrics as core's result holds them: less what metrics.json records beside them."""
    frequencies: LatentFrequencies
    """The latent frequencies saved beside it, of the same SAE and evaluation."""


@dataclass
class SuiteRun:
    """What every metric of one suite run reads: the model, the SAE, the eval contexts, earlier results."""

    lm: Any
    sae: Any
    cfg: PaperSuiteConfig
    eval_cfg: EvalConfig
    contexts: DrawnContexts
    T: int
    first: int
    n_down: int
    evals: Path
    sae_hash: str = ""
    """:func:`sae_sha256` of ``sae``: what every result records, hashed once."""
    series: Any = None
    results: dict[str, dict | None] = field(default_factory=dict)
    model: str = ""
    """The model's name (``lm.name``; known before the load, as ``saelab.models.model_name`` gives it)."""
    model_dtype: str = "float32"
    """The dtype the model is in, by name (known before the load, as ``saelab.models.loading.loaded_dtype`` gives
    it): its numbers differ from another's."""
    n_drawn: int = 1
    """How many contexts the suite draws (known before the load): the most any metric that applies reads."""
    refused: dict[str, str] = field(default_factory=dict)
    """Metrics found to fail before the model loaded (:func:`check_series_before_load`), with their error."""
    core_sums: dict[str, torch.Tensor] | None = None
    """core's per-context downstream sums when it ran in this invocation (a reused core.json holds none)."""
    evaluated: EvaluationFound | None = None
    """The evaluation of core's settings saved beside the SAE, for core to take (None: none is)."""


def _core(run: SuiteRun) -> dict:
    core = evaluate_core(run.sae, run.lm, run.eval_cfg, progress=False, contexts=run.contexts)  # its first ones
    run.core_sums = core.context_sums
    # Saved as `saelab eval` saves them, and before core.json, which marks the metric done: a suite cut off in
    # between runs core again and rewrites them; they record the SAE and the settings, so a report never pairs
    # them with a core.json of another evaluation.
    write_latent_frequencies(run.evals, LatentFrequencies(core.frequencies_N, run.sae_hash,
                                                          eval_settings(core.metrics)))
    return core.metrics


def _compute_equivalent(run: SuiteRun) -> dict:
    core = run.results.get("core")
    spliced = clean = sums = None
    # core's losses on the same predictions, with the per-context sums they are the means of; a core.json reused
    # from an earlier invocation holds no sums: both are measured again, so the headline and its interval's draws
    # read one measurement (its means beside sums measured again differ by numerical noise)
    if core and core.get("n_predictions") == run.n_down * (run.T - 1 - run.first) and run.core_sums is not None:
        spliced, clean, sums = core["ce_spliced"], core["ce_clean"], run.core_sums
    head = run.contexts.head(run.n_down)
    return run_compute_equivalent(run.lm, run.sae, head.tokens, run.cfg.compute_equivalent,
                                  series=run.series, spliced_loss=spliced, clean_loss=clean,
                                  cache_path=_series_losses(run), documents=head.documents, context_sums=sums)


def _series_losses(run: SuiteRun) -> Path:
    """Where compute_equivalent keeps each checkpoint's loss, for a resumed suite."""
    return run.evals / "series_losses.json"


def _ce_applies(run: SuiteRun) -> str | None:
    if run.cfg.compute_equivalent.series is None and series_for_model(run.model) is None:
        model = model_provenance(run.model)["model_name"]  # the offline default by its hub id
        return (f"no checkpoint series is known for model {model!r} (built in: EleutherAI/pythia-<size> -> "
                "the model family pythia-family, GPT-2 small -> the checkpoint series crfm-gpt2-small); pass "
                "--series NAME, a folder with family.json or a folder of checkpoints")
    return None


def longest_n_future(T: int, first: int) -> int:
    """The largest ablation_sparsity.n_future contexts of ``T`` tokens take: the effect is read from the
    first position the SAE edits (``first``) on, which needs n_future tokens from there."""
    return T - first


def _ablation_applies(run: SuiteRun) -> str | None:
    n_future = run.cfg.ablation_sparsity.n_future
    if n_future > longest_n_future(run.T, run.first):
        return (f"contexts of {run.T} tokens are too short for ablation_sparsity.n_future {n_future}: no position has "
                "that many tokens after it")
    return None


def _check_n2g_settings(cfg: N2GConfig, sae, lm, asked_for: bool) -> None:
    """N2G's settings that only the SAE and the tokenizer can check: refused before any metric runs, not
    recorded as a failed n2g after the others ran. The default padding token too: on a tokenizer that
    splits it, n2g would fail only at the end of the suite, after every other metric's forwards; the
    message says how to run the others without it."""
    check_latents(cfg.latents, sae.n_latents, name="n2g.latents")
    try:
        padding_id(lm.tokenizer, cfg.padding_token, "n2g.padding_token")  # the command line: its option
    except ValueError as e:
        raise ConfigError(str(e) + ("" if asked_for else ", or leave n2g out with --metrics")) from None


@dataclass(frozen=True)
class SuiteMetric:
    """One row of the suite: its settings, how many contexts it reads, when it applies, how it runs."""

    name: str
    settings: Callable[[SuiteRun], dict]
    n_contexts: Callable[[SuiteRun], int]
    applies: Callable[[SuiteRun], str | None]
    compute: Callable[[SuiteRun], dict]
    interval_method: str
    """How its intervals are made now (its module's ``INTERVAL_METHOD``): a result that records another is not
    reused."""
    measured_nothing: Callable[[dict], str | None] = lambda result: None
    """Why a computed result holds no measurement (None: it holds one); such a result is not ok."""
    method: str | None = None
    """What changed in how the result is computed that its settings do not show (recorded in its inputs: a
    result of the same settings that records another method, or none, as an earlier saelab wrote it, is computed
    again, as one of another interval method is: :func:`earlier_computation`); None: nothing so far."""
    reads_eval_text: Callable[[SuiteRun], bool] = lambda run: True
    """Whether its result is measured on the eval corpus's text (its ``eval.eval_text`` says whether that is held
    out): the probe's Hugging Face tasks bring their own texts."""


def _probe_measured_nothing(result: dict) -> str | None:
    if result["tasks"]:
        return None
    reasons = "; ".join(f"{task}: {why}" for task, why in result["skipped"].items())
    return f"every task was skipped (more --probe-contexts give more examples): {reasons}"


def _on_drawn(metric: Callable[..., dict], run: SuiteRun, n: int, cfg: Any, corpus_order: bool = False) -> dict:
    """``metric`` (one with intervals) on the first ``n`` contexts drawn, given the document of each;
    ``corpus_order``: in the corpus's order (the probe follows paragraphs across cuts)."""
    head = run.contexts.head(n)
    head = head.in_corpus_order() if corpus_order else head
    return metric(run.lm, run.sae, head.tokens, cfg, documents=head.documents)


SHOWN_ONLY = ("progress",)
"""Settings that change only what is shown while a metric runs: left out of its results' settings, so a rerun
with or without --no-progress reuses them."""


def _settings(cfg: Any) -> dict[str, Any]:
    """A metric's settings as its results record them (:func:`config_dict`, less :data:`SHOWN_ONLY`)."""
    return {k: v for k, v in config_dict(cfg).items() if k not in SHOWN_ONLY}


SUITE: tuple[SuiteMetric, ...] = (
    SuiteMetric("core", lambda r: _settings(r.eval_cfg), lambda r: r.n_down, lambda r: None, _core,
                CORE_INTERVALS),
    SuiteMetric("compute_equivalent",
                lambda r: _settings(r.cfg.compute_equivalent) | {"series": _references(r)},
                lambda r: r.n_down, _ce_applies, _compute_equivalent, CE_INTERVALS),
    SuiteMetric("ablation_sparsity", lambda r: _settings(r.cfg.ablation_sparsity), lambda r: r.cfg.ablation_contexts,
                _ablation_applies,
                lambda r: _on_drawn(run_ablation_sparsity, r, r.cfg.ablation_contexts, r.cfg.ablation_sparsity),
                ABLATION_INTERVALS),
    SuiteMetric("probe", lambda r: _settings(r.cfg.probe), lambda r: r.cfg.probe_contexts,
                lambda r: None if (r.cfg.probe.tasks or r.cfg.probe.hf_tasks) else "no probe tasks selected",
                lambda r: _on_drawn(run_probe, r, r.cfg.probe_contexts, r.cfg.probe, corpus_order=True),
                PROBE_INTERVALS, _probe_measured_nothing, method=f"splits: {PROBE_SPLIT_METHOD}",
                reads_eval_text=lambda r: bool(r.cfg.probe.tasks)),
    SuiteMetric("n2g", lambda r: _settings(r.cfg.n2g), lambda r: r.cfg.n2g_contexts, lambda r: None,
                lambda r: _on_drawn(run_n2g, r, r.cfg.n2g_contexts, r.cfg.n2g), N2G_INTERVALS),
)
INTERVAL_METHODS = {m.name: m.interval_method for m in SUITE}
"""Each metric's interval method now, by name: what a result must record to be reused (:func:`earlier_computation`),
and reports to show its intervals as this saelab's."""


def _references(run: SuiteRun) -> dict | None:
    """compute_equivalent's reference models as its inputs record them: without the dtype they are loaded in, which
    is the model's (MODEL_DTYPE records it; recorded twice, a change of dtype was named twice)."""
    return None if run.series is None else {k: v for k, v in run.series.info().items() if k != "dtype"}


def _envelope(metric: str, inputs: dict, sae_info: dict, eval_info: dict, status: str, reason: str | None,
              result: dict | None, wall: float) -> dict:
    return {"metric": metric, "schema_version": SCHEMA_VERSION, "status": status, "reason": reason, "inputs": inputs,
            "sae": sae_info, "eval": {**eval_info, "n_contexts": inputs.get("n_contexts")},
            "wall_s": round(wall, 3), "created": _now(), "result": result}


def _base_inputs(run: SuiteRun) -> dict:
    """What every metric's result depends on, besides its own settings and contexts (``_inputs``)."""
    return {"sae_sha256": run.sae_hash, "model": run.model, MODEL_FINGERPRINT: model_fingerprint(run.model),
            MODEL_DTYPE: run.model_dtype, "hook": run.sae.cfg.hook_name,
            "corpus": _corpus_path(run.eval_cfg.corpus),
            CORPUS_TEXT: corpus_fingerprint(resolve_corpus(run.eval_cfg.corpus, "eval")), "context_size": run.T,
            "prepend_bos": run.sae.cfg.prepend_bos, "position_0": position_0_words(run.first),
            "sample_pool_tokens": run.eval_cfg.sample_pool_tokens, DRAW_POOL: _draw_pool(run)}


def _corpus_path(corpus: str | None) -> str:
    """The eval corpus as results record it: a local file or folder by its absolute path (``ev.jsonl`` typed in
    two folders names two files), a dataset by its name. What its text is, they record beside it (CORPUS_TEXT)."""
    found = resolve_corpus(corpus, "eval")
    path = Path(found).expanduser()
    return str(path.resolve()) if path.exists() else found


def _inputs(run: SuiteRun, m: SuiteMetric, base_inputs: dict) -> dict:
    """What ``m``'s result depends on, as its file records it (equal inputs: the result is reused); the eval text's
    inputs only where it reads that text (:data:`EVAL_TEXT_INPUTS`)."""
    method = {"method": m.method} if m.method else {}
    read = {**base_inputs, "n_contexts": m.n_contexts(run)}
    if not m.reads_eval_text(run):
        read = {k: v for k, v in read.items() if k not in EVAL_TEXT_INPUTS}
    return json.loads(json.dumps({**read, "config": m.settings(run), **method}))


MODEL_DTYPE = "model_dtype"
"""Where the inputs record the dtype the model is in, by name. A result an earlier saelab wrote records none, and
``--model-dtype`` ran the suite in another dtype than float32 then too: it is computed again
(:func:`earlier_computation`), neither reused nor refused."""
DRAW_POOL = "draw_pool"
"""Where the inputs record how many contexts the suite's draw picked among (:func:`_draw_pool`): with the corpus, the
pool's settings and the metric's own count, which contexts it read. A result an earlier saelab wrote records none: it
is computed again (:func:`earlier_computation`), neither reused nor refused."""
CORPUS_TEXT = "corpus_fingerprint"
"""Where the inputs record :func:`corpus_fingerprint` of the eval corpus (None: a dataset name): a file edited in place
keeps its path. A result an earlier saelab wrote records none, and is judged by its other inputs (_as_recorded)."""
EVAL_TEXT_INPUTS = ("corpus", CORPUS_TEXT, "sample_pool_tokens", DRAW_POOL, "n_contexts")
"""The inputs that say which of the eval corpus's contexts a result read, recorded where its metric reads that text
(:attr:`SuiteMetric.reads_eval_text`): a probe of Hugging Face tasks alone reads none, and recorded, another --corpus,
--sample-pool-tokens or --probe-contexts refused (or computed again) its result. An earlier saelab recorded them for
it too: judged by its other inputs (_as_recorded)."""


def text_change(old: dict, new: dict, old_text: object, new_text: object) -> list[str]:
    """The change a corpus of the same name (``old``/``new``: records with its "corpus") whose text's fingerprint
    differs makes, as settings' changes are named; none where the text is the same or the name differs (named
    already)."""
    if old_text != new_text and old.get("corpus") == new.get("corpus"):
        return [f"eval.corpus {new.get('corpus')} (its text changed since)"]
    return []


def weights_change(old: dict, new: dict) -> list[str]:
    """The change a local model of the same name (``old``/``new``: records with its "model" and MODEL_FINGERPRINT)
    whose weights' fingerprint differs makes; none where ``old`` records no fingerprint (an earlier saelab's: judged
    by the model's name) or the name differs (named already)."""
    if MODEL_FINGERPRINT in old and old.get(MODEL_FINGERPRINT) != new.get(MODEL_FINGERPRINT) \
            and old.get("model") == new.get("model"):
        return [f"--model {new.get('model')} (its weights changed since)"]
    return []


def _as_recorded(old: dict, new: dict) -> dict:
    """``new`` inputs as ``old`` records them, to compare the settings: with ``old``'s progress flag where it
    records one (an earlier saelab's: :data:`SHOWN_ONLY`); the corpus's fingerprint taken as ``old``'s
    was (:func:`fingerprint_as_recorded`), or none where it records none (an earlier saelab's: judged by the corpus's
    path and the words that named it); the eval corpus in core's config in ``old``'s words (``eval.jsonl`` or
    ``./eval.jsonl``) where the fingerprint beside them says what the text is, or the path differs (named as such);
    ``old``'s method (a result of an earlier method is computed again, not refused: :func:`earlier_computation`);
    no model fingerprint where it records none (an earlier saelab's: judged by the model's name); no model dtype where
    it records none, nor the draw's pool where it records none (an earlier saelab's: computed again, not refused, as
    one of an earlier method is); compute_equivalent's references with their dtype where ``old`` records it
    (:func:`_references_as_recorded`)."""
    recorded_since = (CORPUS_TEXT, MODEL_FINGERPRINT, MODEL_DTYPE, DRAW_POOL)
    out = {k: v for k, v in new.items() if k != "method" and (k not in recorded_since or k in old)}
    if CORPUS_TEXT in old:
        out[CORPUS_TEXT] = fingerprint_as_recorded(new.get("corpus"), new.get(CORPUS_TEXT), old[CORPUS_TEXT])
    old_cfg, new_cfg = old.get("config"), new.get("config")
    if isinstance(old_cfg, dict) and isinstance(new_cfg, dict):  # an earlier saelab's record of a progress bar
        out["config"] = new_cfg = {**new_cfg, **{k: old_cfg[k] for k in SHOWN_ONLY if k in old_cfg},
                                   **_references_as_recorded(old, new)}
    if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) and "corpus" in old_cfg and "corpus" in new_cfg and \
            (CORPUS_TEXT in old or old.get("corpus") != new.get("corpus")):
        out["config"] = {**new_cfg, "corpus": old_cfg["corpus"]}
    return _eval_text_as_recorded(old, new, out) | ({"method": old["method"]} if "method" in old else {})


def _eval_text_as_recorded(old: dict, new: dict, out: dict) -> dict:
    """``out`` with the eval text's inputs (EVAL_TEXT_INPUTS) compared only where both records hold them: a metric
    records them where it reads that text, which its config decides (named where it changed); an earlier saelab
    recorded them for a probe of Hugging Face tasks alone too, which read none: taken as it recorded them."""
    if not _records_eval_text(old):
        return {k: v for k, v in out.items() if k not in EVAL_TEXT_INPUTS}
    return out if _records_eval_text(new) else out | {k: old[k] for k in EVAL_TEXT_INPUTS if k in old}


def _records_eval_text(inputs: dict) -> bool:
    """Whether a record of inputs says which eval contexts its result read (none: its metric read none of them)."""
    return any(k in inputs for k in EVAL_TEXT_INPUTS)


def _read_no_eval_text(metric: str, inputs: dict) -> bool:
    """Whether the result ``inputs`` record read none of the eval text, by its settings: a probe of Hugging Face
    tasks alone (:attr:`SuiteMetric.reads_eval_text`), which an earlier saelab recorded with the eval text's inputs
    all the same."""
    return metric == "probe" and not (inputs.get("config") or {}).get("tasks")


def _references_as_recorded(old: dict, new: dict) -> dict:
    """compute_equivalent's references in ``new`` inputs as ``old`` records them ({"series": ...}; {} where either
    records none): an earlier saelab recorded their dtype among them where it was not float32. Beside the model's
    dtype (MODEL_DTYPE), which is theirs, that record is taken as it is: MODEL_DTYPE compares it, and names a change
    once. Without it (an earlier saelab's), it is the only record of the dtype: compared as it was written."""
    old_refs, refs = old["config"].get("series"), new["config"].get("series")
    if not isinstance(old_refs, dict) or not isinstance(refs, dict):
        return {}
    dtype = old_refs.get("dtype") if MODEL_DTYPE in old else \
        (new[MODEL_DTYPE] if new.get(MODEL_DTYPE, "float32") != "float32" else None)
    return {"series": refs | ({"dtype": dtype} if dtype else {})}


EVAL_INPUTS = ("sample_pool_tokens",)
"""Eval options every metric's inputs record (how its contexts were drawn), named as the eval options they are."""
# The option group each metric's settings come from (core's: the eval options); its contexts' setting, one of
# the suite's own (named by its path, "suite_cfg.probe_contexts", as the options and a --config file name it).
SETTINGS_GROUP = {"core": "eval"}
CONTEXTS_SETTING = {"ablation_sparsity": "ablation_contexts", "probe": "probe_contexts", "n2g": "n2g_contexts"}


def _contexts_path(metric: str) -> str:
    return f"suite_cfg.{CONTEXTS_SETTING[metric]}"


def _input_changes(name: str, old: dict, new: dict) -> list[str]:
    """changed_fields of two records of metric ``name``'s inputs, each setting named as its option group
    does ("n2g.max_len 24 -> 16", "suite_cfg.probe_contexts 512 -> 64"). core's and compute_equivalent's contexts
    follow from eval.downstream_tokens, named there."""
    new = _as_recorded(old, new)

    def by_setting(inputs: dict) -> dict:
        named = {("eval.corpus" if k == "corpus" else k): v for k, v in inputs.items()  # as its text's change is
                 if k not in ("config", "n_contexts", CORPUS_TEXT, MODEL_FINGERPRINT, DRAW_POOL, *EVAL_INPUTS)}
        if name in CONTEXTS_SETTING:
            named[_contexts_path(name)] = inputs.get("n_contexts")
        if SETTINGS_GROUP.get(name) != "eval":  # core's config holds them: named once, as eval options
            named["eval"] = {k: inputs[k] for k in EVAL_INPUTS if k in inputs}
        return {**named, SETTINGS_GROUP.get(name, name): inputs.get("config")}
    changes = changed_fields(by_setting(old), by_setting(new))
    changes += text_change(old, new, old.get(CORPUS_TEXT), new.get(CORPUS_TEXT))
    changes += weights_change(old, new) + _draw_change(old, new)
    if not changes and old != new:  # a difference no setting of this metric names: still a difference
        contexts = (old.get("n_contexts"), new.get("n_contexts"))
        changes = [f"contexts {contexts[0]} -> {contexts[1]}" if contexts[0] != contexts[1] else "other inputs"]
    return changes


def _draw_change(old: dict, new: dict) -> list[str]:
    """The change of how many contexts the draw picked among (DRAW_POOL) where the pool's settings are the same (else
    named as they are): the suite drew more than eval.sample_pool_tokens holds, as many as its metrics read, so
    another metric's contexts changed which ones each read."""
    pools = old.get(DRAW_POOL), new.get(DRAW_POOL)
    if pools[0] == pools[1] or any(old.get(k) != new.get(k) for k in ("sample_pool_tokens", "context_size")):
        return []
    tokens, T = new["sample_pool_tokens"], new["context_size"]
    return [f"contexts drawn among {pools[0]} -> {pools[1]} (more than eval.sample_pool_tokens {tokens} holds: "
            f"{tokens // T} of {T} tokens)"]


def _refuse_replacing(run: SuiteRun, wanted: list[SuiteMetric], reasons: dict, base_inputs: dict) -> None:
    """Results already in evals/ of another SAE, or of this SAE with other settings, are kept unless
    overwrite: named before any metric runs."""
    other_sae, other_settings = [], []
    for m in wanted:
        old = _read(run.evals / f"{m.name}.json")
        if reasons[m.name] or not isinstance(old, dict) or old.get("status") != "ok":
            continue
        if old.get("inputs", {}).get("sae_sha256") != base_inputs["sae_sha256"]:
            other_sae.append(m.name)
        elif changes := _input_changes(m.name, old.get("inputs") or {}, _inputs(run, m, base_inputs)):
            other_settings.append(f"{m.name} ({', '.join(changes)})")
    if other_sae:
        raise RunExistsError(f"{run.evals} holds results of another SAE ({', '.join(other_sae)}); pick another "
                             "--out, or pass --overwrite to replace them")
    if other_settings:
        raise RunExistsError(f"{run.evals} holds results of this SAE with other settings: {'; '.join(other_settings)}; "
                             "pass --overwrite to replace them (with --metrics to rerun only those), or pick another "
                             "--out")


def check_results_before_load(sae, model: str, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, T: int,
                              out_dir: str | Path, dtype: torch.dtype | str = torch.float32) -> str:
    """:func:`run_paper_suite`'s refusal of results in ``out_dir``'s evals/ that it would replace (without
    overwrite), from the settings, the SAE and those files alone: before the model loads (in ``dtype``, which
    compute_equivalent's references take). Returns :func:`sae_sha256` of ``sae``, for the suite to take
    (hashing reads every weight)."""
    run, wanted, reasons = _suite_run(None, sae, model, Path(out_dir), cfg, eval_cfg, T)
    run.model_dtype = dtype_name(dtype)
    _resolve_series(run, reasons, dtype=dtype)
    run.sae_hash = sae_sha256(sae)
    _refuse_replacing(run, wanted, reasons, _base_inputs(run))
    return run.sae_hash


def _reusable(old: dict | None, inputs: dict) -> bool:
    """Whether a metric's earlier record ``old`` is an ok result of these ``inputs`` (reused unless an earlier saelab
    computed it otherwise: :func:`earlier_computation`)."""
    return (bool(old) and old.get("status") == "ok" and isinstance(old.get("inputs"), dict)
            and old["inputs"] == json.loads(json.dumps(_as_recorded(old["inputs"], inputs))))


UNRECORDED = {MODEL_DTYPE: "the dtype its model was loaded in (--model-dtype may have made it another than float32)",
              DRAW_POOL: "how many contexts its draw picked among (with a small --sample-pool-tokens, the other "
                         "metrics' contexts chose its own)"}
"""Inputs an earlier saelab's results do not record, which may have been other than now: such a result is computed
again (:func:`earlier_computation`)."""


def earlier_computation(record: dict, metric: str) -> str | None:
    """Why ``record``, an ok result of ``metric`` with this saelab's settings, is not what this saelab computes of
    them, or None where it is: it records another ``method`` than the metric's, or none (an earlier saelab's), or
    no model dtype or draw's pool (an earlier saelab's: :data:`UNRECORDED`), or its intervals are made otherwise
    (:func:`earlier_intervals`). Such a result is computed again rather than reused, with a note, and reports say so
    of it while it stands."""
    m = next(m for m in SUITE if m.name == metric)
    inputs = record.get("inputs") or {}
    recorded = inputs.get("method")
    if recorded != m.method:
        return (f"an earlier saelab computed it another way (it records no method; this saelab's: {m.method!r})"
                if recorded is None else f"it was computed another way (method {recorded!r}; this saelab's: "
                                         f"{m.method!r})")
    unread = EVAL_TEXT_INPUTS if not _records_eval_text(inputs) or _read_no_eval_text(metric, inputs) else ()
    if missing := [what for key, what in UNRECORDED.items() if key not in inputs and key not in unread]:
        return f"an earlier saelab computed it without recording {' or '.join(missing)}"
    return earlier_intervals(record.get("result") or {}, m.interval_method)


# What a metric may raise that its record names as its error, the other metrics running on.
_METRIC_ERRORS = (SaelabError, ValueError, RuntimeError, OSError)


def _error_reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _computed(run: SuiteRun, m: SuiteMetric) -> tuple[dict | None, str | None]:
    """``m``'s result, or None and why it could not be computed: its error, or the one found before the model
    loaded."""
    if m.name in run.refused:  # known to fail: nothing of it is loaded
        return None, run.refused[m.name]
    try:
        return jsonable(m.compute(run)), None
    except _METRIC_ERRORS as e:
        return None, _error_reason(e)


def _judged(run: SuiteRun, m: SuiteMetric, result: dict) -> tuple[dict | None, str, str | None]:
    """A computed result, its status and reason: not ok where it measured nothing."""
    if empty := m.measured_nothing(result):
        # Skipped like a metric that does not apply, and an error when asked for by name, as such a metric is.
        return None, "error" if m.name in run.cfg.metrics else "skipped", empty
    return result, "ok", None


def _run_metric(run: SuiteRun, m: SuiteMetric, reason: str | None, base_inputs: dict, sae_info: dict,
                eval_info: dict, *, overwrite: bool, progress: bool) -> dict:
    """Compute (or reuse, or skip) one metric, write its envelope; returns its suite.json entry."""
    path = run.evals / f"{m.name}.json"
    inputs = _inputs(run, m, base_inputs)
    entry = {"reused": False, "file": f"{EVALS_DIR}/{m.name}.json"}
    if reason:
        write_json(path, _envelope(m.name, inputs, sae_info, eval_info, "skipped", reason, None, 0.0))
        return {**entry, "status": "skipped", "reason": reason, "wall_s": 0.0}
    old = None if overwrite else _read(path)
    reusable = _reusable(old, inputs)
    earlier = earlier_computation(old, m.name) if reusable else None
    if reusable and earlier is None:
        return _reused(run, m, path, old, eval_info, entry)
    if m.name == "core" and not overwrite and _draws_as_evaluated(run):
        return _taken_from_evaluation(run, m, path, inputs, sae_info, eval_info, entry)
    if earlier:  # kept until the new result replaces it (write_json: atomically), so an interrupted run loses nothing
        print(f"saelab: note: {path} is computed again, not reused: {earlier}", file=sys.stderr)
    if progress:
        print(f"[paper suite] {m.name} ...", flush=True)
    t0 = time.perf_counter()
    result, failed = _computed(run, m)
    wall = time.perf_counter() - t0
    if failed and earlier:  # its file stands (the report says how it was made), not lost for an error; its numbers
        # are not this run's: a metric that reads them (compute_equivalent core's) measures them again
        run.results[m.name] = None
        return {**entry, "status": "error", "reason": f"{failed}; the earlier result in {entry['file']} is kept as it "
                f"was, though {earlier}", RECOMPUTE_ERROR: failed, "wall_s": round(wall, 3)}
    result, status, why = (None, "error", failed) if failed else _judged(run, m, result)
    if earlier and status != "ok":  # measured nothing: this saelab's verdict on these settings replaces the file
        why = f"{why}; it replaced the earlier result in {entry['file']}, as {earlier}"
        if status == "skipped":  # no error line will say it
            print(f"saelab: note: {path}: {why}", file=sys.stderr)
    run.results[m.name] = result
    write_json(path, _envelope(m.name, inputs, sae_info, eval_info, status, why, result, wall))
    return {**entry, "status": status, "reason": why, "wall_s": round(wall, 3)}


def _draw_pool(run: SuiteRun) -> int | None:
    """How many contexts the suite's draw picks among: :func:`draw_contexts` pools ``sample_pool_tokens // T``, or as
    many as it draws where that is more (a draw of another size then picks other first contexts); None where
    ``sample_pool_tokens`` is 0 (the first contexts in order, whatever the draw's size). Two draws from one pool of
    one corpus pick the same first contexts."""
    pool = run.eval_cfg.sample_pool_tokens
    return None if pool == 0 else pooled_contexts(run.n_drawn, pool, run.T)


def _draws_as_evaluated(run: SuiteRun) -> bool:
    """Whether core would read the contexts the evaluation found (``run.evaluated``) read: both draw among as many
    (:func:`_draw_pool`; the evaluation drew core's contexts alone, :func:`core_contexts`)."""
    pool, cfg = _draw_pool(run), run.eval_cfg
    return run.evaluated is not None and pool in (None, pooled_contexts(core_contexts(cfg, run.T - run.first),
                                                                        cfg.sample_pool_tokens, run.T))


def _taken_from_evaluation(run: SuiteRun, m: SuiteMetric, path: Path, inputs: dict, sae_info: dict, eval_info: dict,
                           entry: dict) -> dict:
    """core's result taken from ``run.evaluated`` rather than measured again: core.json and the latent frequencies
    written as core writes them (the frequencies first), said in one line; its suite.json entry, with ``from``."""
    found = run.evaluated
    print(f"saelab: note: {path} takes core's metrics from {found.path}, an evaluation of the same SAE and "
          "settings, not measured again", file=sys.stderr)
    write_latent_frequencies(run.evals, found.frequencies)
    wall = sum((found.result.get("seconds") or {}).values())  # its own measurement's, as a computed core records
    created = _dt.datetime.fromtimestamp(found.path.stat().st_mtime, _dt.timezone.utc).isoformat(timespec="seconds")
    write_json(path, {**_envelope(m.name, inputs, sae_info, eval_info, "ok", None, found.result, wall),
                      "created": created})
    run.results[m.name] = found.result
    return {**entry, "status": "ok", "reason": None, "reused": True, "wall_s": round(wall, 3), "from": str(found.path)}


RECOMPUTE_ERROR = "recompute_error"
"""The suite.json entry's key for the error of a recompute whose earlier file was kept (its reason says so too)."""


def _reused(run: SuiteRun, m: SuiteMetric, path: Path, old: dict, eval_info: dict, entry: dict) -> dict:
    """The suite.json entry of ``old``, ``m``'s record in ``path``, reused."""
    run.results[m.name] = old["result"]
    if (old.get("eval") or {}).get("eval_text") != eval_info["eval_text"]:  # an earlier saelab recorded none
        write_json(path, {**old, "eval": {**(old.get("eval") or {}), "eval_text": eval_info["eval_text"]}})
    return {**entry, "status": "ok", "reason": None, "reused": True, "wall_s": old["wall_s"]}


def _suite_run(lm, sae, model: str, out_dir: Path, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, T: int
               ) -> tuple[SuiteRun, list, dict]:
    """A suite run without its contexts, the metrics wanted and why each does not apply (or None): from the
    settings alone (``lm`` may be None: before the model loads)."""
    first = 1 if sae.cfg.exclude_first else 0
    run = SuiteRun(lm, sae, cfg, eval_cfg, DrawnContexts(torch.empty(0), None, torch.empty(0)), T, first,
                   math.ceil(eval_cfg.downstream_tokens / (T - first)), out_dir / EVALS_DIR, model=model,
                   model_dtype=loaded_dtype(lm))
    wanted = [m for m in SUITE if not cfg.metrics or m.name in cfg.metrics]
    reasons = {m.name: m.applies(run) for m in wanted}
    run.n_drawn = max(_contexts_needed(run, wanted, reasons).values(), default=1)
    return run, wanted, reasons


def _resolve_series(run: SuiteRun, reasons: dict[str, str | None], device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> None:
    """``run.series``: compute_equivalent's reference models, when that metric runs (its inputs record them),
    loaded as the evaluated model is (``device``, ``dtype``)."""
    if "compute_equivalent" in reasons and not reasons["compute_equivalent"]:
        ce = run.cfg.compute_equivalent
        run.series = resolve_series(ce.series or series_for_model(run.model), ce.steps, device=device, dtype=dtype)


def _contexts_read(run: SuiteRun, metric: str) -> dict[str, int]:
    """The contexts ``metric`` reads, by the setting (its path) that asks for them: core's recon and
    downstream tokens (evaluate_core reads both), compute_equivalent's downstream tokens, the others' counts."""
    if metric in CONTEXTS_SETTING:
        return {_contexts_path(metric): getattr(run.cfg, CONTEXTS_SETTING[metric])}
    counts = ("recon_tokens", "downstream_tokens") if metric == "core" else ("downstream_tokens",)
    return {f"eval.{count}": math.ceil(getattr(run.eval_cfg, count) / (run.T - run.first)) for count in counts}


def _contexts_needed(run: SuiteRun, wanted: list[SuiteMetric], reasons: dict[str, str | None]) -> dict[str, int]:
    """The contexts each setting (by its path) asks of the metrics to run that read the eval text
    (:func:`_contexts_read`): a probe of Hugging Face tasks alone asks none, so its --probe-contexts neither widens
    the draw nor refuses a short corpus."""
    needs: dict[str, int] = {}
    for m in wanted:
        if not reasons[m.name] and m.reads_eval_text(run):
            needs.update(_contexts_read(run, m.name))  # a setting two metrics share asks the same of both
    return needs


def _reading_eval_text(run: SuiteRun, wanted: list[SuiteMetric], reasons: dict[str, str | None]) -> list[str]:
    """The metrics to run that measure on the eval corpus's text."""
    return [m.name for m in wanted if not reasons[m.name] and m.reads_eval_text(run)]


def suite_reads_eval_text(sae, model: str, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, T: int) -> bool:
    """Whether a metric of the suite that applies measures on the eval corpus's text, from the settings alone:
    before the model loads, where :func:`held_out_label` says whether that text is held out."""
    return bool(_reading_eval_text(*_suite_run(None, sae, model, Path(), cfg, eval_cfg, T)))


def check_suite_applies(sae, model: str, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, T: int) -> None:
    """Refuse metrics asked for by name (``cfg.metrics``) that do not apply, from the settings alone: before
    the model loads."""
    _refuse_not_applying(cfg, _suite_run(None, sae, model, Path(), cfg, eval_cfg, T)[2])


def _refuse_not_applying(cfg: PaperSuiteConfig, reasons: dict[str, str | None]) -> None:
    bad = {n: r for n, r in reasons.items() if r and cfg.metrics}
    if bad:
        raise ConfigError("metric(s) asked for do not apply: " + "; ".join(f"{m}: {r}" for m, r in bad.items()))


def read_suite_contexts(sae, model: str, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, tokenize,
                        bos_token_id: int | None, T: int) -> DrawnContexts:
    """The eval contexts of ``T`` tokens the suite's metrics that apply read (the most any of them reads).
    ``tokenize``: the model's, or its tokenizer read before the load. A corpus too short for them is refused
    naming the settings that lower the need, as :func:`saelab.evals.core.eval_corpus_too_short` does."""
    run, wanted, reasons = _suite_run(None, sae, model, Path(), cfg, eval_cfg, T)
    needs, n_ctx = _contexts_needed(run, wanted, reasons), run.n_drawn
    if not needs:  # a probe of Hugging Face tasks alone: no corpus to tokenize, nor one too short to refuse
        return DrawnContexts(torch.zeros(0, T, dtype=torch.long), None, torch.zeros(0, dtype=torch.long))
    corpus = resolve_corpus(eval_cfg.corpus, "eval")
    try:
        return draw_contexts(corpus, tokenize, T, n_ctx, pool_tokens=eval_cfg.sample_pool_tokens,
                             bos_token_id=bos_token_id, prepend_bos=sae.cfg.prepend_bos, setting="eval.context_size")
    except CorpusError as e:
        if not getattr(e, "contexts", 0):  # shorter than one context: its own words name eval.context_size
            raise
        over = {setting: n for setting, n in needs.items() if n > e.contexts}
        raise _suite_corpus_too_short(eval_cfg, corpus, e.tokens, e.contexts, n_ctx, run, over) from None


def check_series_before_load(sae, model: str, cfg: PaperSuiteConfig, eval_cfg: EvalConfig, contexts: DrawnContexts,
                             tokenizer, out_dir: str | Path, dtype: torch.dtype | str = torch.float32
                             ) -> dict[str, str]:
    """When compute_equivalent runs, the reference models it will load checked against the eval contexts
    (``contexts``, read with the model's ``tokenizer`` before its load) from their configs and tokenizers alone.
    A wrong series is refused before the model's weights or any of theirs download when compute_equivalent is
    asked for by name (``cfg.metrics``); else it is returned as that metric's error, {name: reason} ({}: none),
    for :func:`run_paper_suite` (``refused``) to record while the other metrics run. Only the checkpoints whose
    loss ``out_dir``'s series_losses.json lacks are checked: a resumed suite loads no other (its result reused
    or not, the losses file holds every loss that result was made of)."""
    run, _, reasons = _suite_run(None, sae, model, Path(out_dir), cfg, eval_cfg, int(contexts.tokens.shape[1]))
    _resolve_series(run, reasons, dtype=dtype)  # the model's: its losses are cached apart
    if run.series is None:  # compute_equivalent does not run
        return {}
    ce = cfg.compute_equivalent
    down = contexts.tokens[:run.n_down]  # the contexts compute_equivalent reads
    try:
        first = first_position(run.sae, ce.exclude_first)
        check_checkpoints_before_load(checkpoints_to_load(run.series, down, first, _series_losses(run)), down,
                                      tokenizer, context_named=RECORDED_CONTEXT if eval_cfg.context_size is None
                                      else CONTEXT_SETTING)
    except _METRIC_ERRORS as e:
        if "compute_equivalent" in cfg.metrics:
            raise
        return {"compute_equivalent": _error_reason(e)}
    return {}


def _suite_corpus_too_short(eval_cfg: EvalConfig, corpus: str, tokens: int, most: int, n_ctx: int, run: SuiteRun,
                            over: dict[str, int]) -> CorpusError:
    """The refusal of an eval corpus of ``tokens`` tokens that fills ``most`` contexts, fewer than the
    ``n_ctx`` the suite reads; ``over``: the settings past it (by path) and the contexts each reads. Its
    ``worded(name)`` names each setting as ``name`` says (a command line: as the user gave it)."""
    per_ctx = run.T - run.first
    text_needed = n_ctx * (run.T - 1 if run.sae.cfg.prepend_bos else run.T)
    values = {p: getattr(eval_cfg if p.startswith("eval.") else run.cfg, p.partition(".")[2]) for p in over}
    limits: dict[int, list[str]] = {}  # token counts share one limit, context counts another
    for p in over:
        limits.setdefault(most * per_ctx if p.startswith("eval.") else most, []).append(p)

    def worded(name) -> str:
        text = "the eval split" if eval_cfg.corpus is None else name("eval.corpus")
        reads = " and ".join(f"{name(p)} {values[p]:,}" for p in over)
        lower = " and ".join(f"{' and '.join(map(name, ps))} <= {limit}" for limit, ps in limits.items())
        needed = f"{text_needed:,} {plural(text_needed, 'token')}"
        return (f"{text} {corpus!r} holds {tokens:,} {plural(tokens, 'token')}, too few for the paper suite "
                f"({reads}: {n_ctx:,} {plural(n_ctx, 'context')} of {run.T:,}, {needed} of text); expected a corpus "
                f"of at least {needed}, or {lower}")

    return worded_corpus_error(worded)


def _prepare(sae, lm, out_dir: Path, cfg: PaperSuiteConfig, eval_cfg: EvalConfig,
             contexts: DrawnContexts | None) -> tuple[SuiteRun, list, dict]:
    """The suite run's shared inputs, the metrics wanted and why each does not apply (or None). ``contexts``:
    the contexts :func:`read_suite_contexts` read before the load (None: read here)."""
    hook = lm.check_hook(sae.cfg.hook_name)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook} of {lm.known_as}")
    sae.check_device(lm.device, f"model {lm.known_as}")
    T = lm.check_context_size(eval_cfg.context_size or sae.cfg.context_size, context_named(eval_cfg.context_size))
    run, wanted, reasons = _suite_run(lm, sae, lm.name, out_dir, cfg, eval_cfg, T)
    if any(m.name == "n2g" for m in wanted):
        _check_n2g_settings(cfg.n2g, sae, lm, asked_for="n2g" in cfg.metrics)
    _refuse_not_applying(cfg, reasons)
    _resolve_series(run, reasons, lm.device, lm.dtype)
    run.contexts = contexts if contexts is not None else read_suite_contexts(sae, lm.name, cfg, eval_cfg, lm.tokenize,
                                                                             lm.bos_token_id, T)
    return run, wanted, reasons


def run_paper_suite(sae, out_dir: str | Path, *, lm, source: str = "", eval_cfg: EvalConfig | None = None,
                    cfg: PaperSuiteConfig | None = None, overwrite: bool = False, progress: bool = True,
                    contexts: DrawnContexts | None = None, refused: dict[str, str] | None = None,
                    sae_hash: str | None = None, eval_text: str | None = None,
                    evaluated: EvaluationFound | None = None) -> dict[str, Any]:
    """Run the paper suite on ``sae`` with ``lm`` into ``out_dir/evals/`` (module docstring).

    Returns the suite index (also written to suite.json). A metric that fails is recorded with
    status "error" and its reason; the caller decides what to do about it. ``contexts``: the eval contexts
    when the caller read them already (:func:`read_suite_contexts`); ``refused``: metrics found to fail
    before the model loaded, with their reason (:func:`check_series_before_load`), recorded so, not run;
    ``sae_hash``: :func:`sae_sha256` of ``sae`` when the caller has it (:func:`check_results_before_load`'s);
    ``eval_text``: :func:`held_out_label`'s label of the eval corpus when the caller took it (and so said the
    warning) already, else taken here where a metric reads that text; ``evaluated``: the caller's evaluation of
    ``sae`` with core's settings (in ``lm``'s dtype), which core takes unless ``overwrite``, or its own record is
    reused, or the suite draws core's contexts otherwise (a pool smaller than its contexts).
    """
    t_start = time.perf_counter()
    check_sae_hook(sae, source or "(given)")
    run, wanted, reasons = _prepare(sae, lm, Path(out_dir), cfg or PaperSuiteConfig(), eval_cfg or EvalConfig(),
                                    contexts)
    run.refused, run.evaluated = dict(refused or {}), evaluated
    run.sae_hash = sae_hash or sae_sha256(sae)
    base_inputs = _base_inputs(run)
    hook = sae.cfg.hook_name
    sae_info = {"source": source, "n_latents": sae.n_latents, "k": sae.cfg.k, "hook": hook, "model": lm.name,
                "input_norm": sae.cfg.input_norm, "sha256": run.sae_hash}
    reading = _reading_eval_text(run, wanted, reasons)
    if reading and eval_text is None:
        eval_text = held_out_label(sae, str(resolve_corpus(run.eval_cfg.corpus, "eval")))
    eval_info = {**{k: base_inputs[k] for k in ("corpus", "context_size", "position_0")},
                 "eval_text": eval_text if reading else None}
    index: dict[str, Any] = {"suite": "paper", "schema_version": SCHEMA_VERSION, "sae": sae_info, "model": lm.name,
                             "hook": hook, "eval": eval_info, "metrics": {}}
    if not overwrite:
        _refuse_replacing(run, wanted, reasons, base_inputs)
    for m in wanted:
        measured_on = {**eval_info, "eval_text": eval_info["eval_text"] if m.name in reading else None}
        index["metrics"][m.name] = _run_metric(run, m, reasons[m.name], base_inputs, sae_info, measured_on,
                                               overwrite=overwrite, progress=progress)
    index["wall_s"] = round(time.perf_counter() - t_start, 2)
    index["metrics_wall_s"] = round(sum(m["wall_s"] for m in index["metrics"].values()), 2)
    write_json(run.evals / "suite.json", index)
    return index


__all__ = ["PAPER_METRICS", "EvaluationFound", "PaperSuiteConfig", "SUITE", "SuiteMetric", "check_results_before_load",
           "check_series_before_load", "check_suite_applies", "earlier_computation", "longest_n_future",
           "read_suite_contexts", "run_paper_suite", "suite_reads_eval_text"]
