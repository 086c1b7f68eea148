"""The core evaluation of an SAE on held-out text: reconstruction and the spliced LM loss.

``evaluate_core(sae, lm, cfg)`` computes; it writes nothing. The jobs layer
(``saelab.pipeline.evaluate``) stores the result in a run folder and draws its plots.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from saelab.data import DrawnContexts, draw_contexts, resolve_corpus
from saelab.data.text import CORPUS_FINGERPRINT, CORPUS_PATH, has_fingerprint
from saelab.errors import CorpusError, NonFiniteError
from saelab.evals._common import position_0_words
from saelab.evals.bootstrap import bounded_groups, by_document, paired_bootstrap, resampled_documents
from saelab.evals.config import EvalConfig
from saelab.evals.downstream import downstream_statistics, downstream_sums, downstream_summary
from saelab.evals.reconstruction import NMSE_STATS, reconstruction_metrics
from saelab.models import model_provenance
from saelab.models.lm import context_named
from saelab.run_folder import recorded_model
from saelab.utils.tensors import all_finite
from saelab.utils.words import plural


@dataclass
class CoreEvaluation:
    """What :func:`evaluate_core` measured."""

    metrics: dict[str, Any]
    """nMSE, L0, dead/dense, CE, delta CE, KL, CE recovered, their intervals (and how they were made:
    ``interval_method``) and the eval settings they come from."""
    frequencies_N: torch.Tensor
    """Fraction of the reconstruction tokens each latent fired on."""
    context_sums: dict[str, torch.Tensor] | None = None
    """:func:`downstream_sums`' per-context sums of the downstream contexts (the first ones read): the
    compute-equivalent's interval resamples their spliced and clean losses."""


def model_record(name: str) -> dict[str, Any]:
    """How metrics.json records the model loaded as ``name``: ``model``, its full id (the hub id of the
    offline default, as report.md names it), and ``model_source``, the spec loaded ("default": its
    dequantized weights, close to but not the hub's), which tells two evaluations' models apart."""
    provenance = model_provenance(name)
    return {"model": provenance["model_name"], "model_source": provenance["model_source"]}


def evaluated_model(metrics: dict[str, Any]) -> str:
    """The model spec an evaluation loaded; files written before ``model_source`` recorded it as ``model``."""
    return recorded_model(metrics.get("model_source"), metrics.get("model"), "the evaluation")


def eval_settings(metrics: dict[str, Any]) -> dict[str, Any]:
    """The settings two evaluations must share for their numbers to be compared (the model as loaded)."""
    keys = ("model", "hook", "eval_corpus", "context_size", "position_0", "n_tokens", "n_predictions")
    # sample_pool_tokens absent: an evaluation from before the contexts were drawn, of the first ones (0)
    return {**{k: metrics.get(k) for k in keys}, "sample_pool_tokens": metrics.get("sample_pool_tokens", 0),
            "model": evaluated_model(metrics)}


HELD_OUT_TEXT, TRAINING_TEXT = "held-out text", "training text (not held out)"
"""The eval text as metrics.json's ``eval_text`` and the paper suite's results name it (:func:`held_out_label`)."""


def held_out_label(sae, corpus: str, source: str | None = "the SAE") -> str:
    """HELD_OUT_TEXT, or TRAINING_TEXT with a one-line warning on stderr when ``corpus`` is the SAE's training
    text: for every evaluation that reads it (``saelab eval``, quickstart, the paper suite). ``source``: the SAE as
    the warning names it; None: judged without a word, the caller warning (:func:`warn_of_training_text`) once it
    has judged several SAEs (a sweep's runs: one line where all were trained on that text)."""
    if not _is_training_text(sae, corpus):
        return HELD_OUT_TEXT
    if source is not None:
        warn_of_training_text(corpus, source)
    return TRAINING_TEXT


def warn_of_training_text(corpus: str, source: str) -> None:
    """The one-line warning that ``corpus`` is the text ``source`` (an SAE, or a sweep of them) was trained on."""
    print(f"warning: evaluating on {corpus}, the text {source} was trained on; the metrics are not held-out",
          file=sys.stderr)


def _is_training_text(sae, corpus: str) -> bool:
    """Whether ``corpus`` is the text the SAE was trained on: by the fingerprint of its content where the SAE records
    one (its harvest took it, an export carries it: the same text under any name is it, another file of the same
    name is not), else (an SAE of an earlier saelab) by the corpus's name or path as recorded. The file at the
    absolute path a run records is the training text even once edited: it may hold what was trained on still."""
    fingerprint = sae.cfg.extra.get(CORPUS_FINGERPRINT)
    trained_on = sae.cfg.dataset
    if isinstance(fingerprint, dict) and isinstance(fingerprint.get("sha256"), str):
        trained_at = _training_corpus_path(sae)
        same_file = trained_at is not None and Path(corpus).exists() and \
            Path(trained_at).resolve() == Path(corpus).resolve()
        return same_file or has_fingerprint(corpus, fingerprint)
    return bool(trained_on) and (trained_on == corpus or (Path(trained_on).exists() and Path(corpus).exists()
                                                         and Path(trained_on).resolve() == Path(corpus).resolve()))


def _training_corpus_path(sae) -> str | None:
    """The absolute path of the corpus a run's SAE was trained on: as its harvest resolved it (a relative
    ``--corpus`` too), else its ``dataset`` where that is absolute (a run harvested before that record; an
    export, which records neither, gives None)."""
    resolved = sae.cfg.extra.get(CORPUS_PATH)
    if isinstance(resolved, str):
        return resolved
    trained_on = sae.cfg.dataset
    return trained_on if trained_on and Path(trained_on).is_absolute() else None


def _hook_rows(lm, tokens_NT: torch.Tensor, hook: str, first: int, n_rows: int, batch: int) -> torch.Tensor:
    """Activations at ``hook`` of the first contexts, positions from ``first`` on, cut to ``n_rows``."""
    rows, got = [], 0
    for i in range(0, tokens_NT.shape[0], batch):
        acts = lm.activations(tokens_NT[i:i + batch], hook)[:, first:].reshape(-1, lm.hook_width(hook))
        rows.append(acts.float())
        got += acts.shape[0]
        if got >= n_rows:
            break
    return torch.cat(rows)[:n_rows]


def core_contexts(cfg: EvalConfig, per_ctx: int) -> int:
    """How many contexts core reads (``per_ctx`` tokens scored in each): enough for ``cfg.recon_tokens`` and
    ``cfg.downstream_tokens``."""
    return max(math.ceil(n / per_ctx) for n in (cfg.recon_tokens, cfg.downstream_tokens))


def read_eval_contexts(cfg: EvalConfig, tokenize, bos_token_id: int | None, context_size: int, first: int,
                       prepend_bos: bool) -> DrawnContexts:
    """The contexts ``[N, context_size]`` the evaluation reads from ``cfg.corpus``, drawn across its first
    ``cfg.sample_pool_tokens`` tokens: enough for ``cfg.recon_tokens`` and ``cfg.downstream_tokens`` scored
    tokens, each context's from position ``first`` on. ``tokenize``: the model's, or its tokenizer read before
    the load. A corpus too short for them is refused naming the settings that lower the need
    (:func:`eval_corpus_too_short`)."""
    corpus = resolve_corpus(cfg.corpus, "eval")
    per_ctx = context_size - first
    needs = {name: getattr(cfg, name) for name in ("recon_tokens", "downstream_tokens")}
    n_contexts = core_contexts(cfg, per_ctx)
    try:
        return draw_contexts(corpus, tokenize, context_size, n_contexts, pool_tokens=cfg.sample_pool_tokens,
                             bos_token_id=bos_token_id, prepend_bos=prepend_bos, setting="eval.context_size")
    except CorpusError as e:
        if not getattr(e, "contexts", 0):  # shorter than one context: its own words name eval.context_size
            raise
        window = context_size - 1 if prepend_bos else context_size
        raise eval_corpus_too_short(cfg.corpus, corpus, e.tokens, e.contexts * per_ctx, n_contexts * window,
                                    context_size, needs) from None


def _row_groups(groups_N: torch.Tensor, per_ctx: int, n_rows: int) -> torch.Tensor:
    """The group of every activation row read from contexts of groups ``groups_N``, ``per_ctx`` rows each."""
    rows = groups_N.repeat_interleave(per_ctx)[:n_rows]
    return torch.unique(rows, return_inverse=True)[1]  # ids 0 .. G-1 of the groups read


INTERVAL_METHOD = "documents of the contexts core reads (those contexts where they lie in one document)"
"""How core's intervals are made, as its results record it (``interval_method``): a result that records another
or none is computed again, not reused (:func:`saelab.evals.bootstrap.earlier_intervals`). Changed only where the
intervals change."""


def _core_documents(documents: torch.Tensor | None, n_shorter: int) -> torch.Tensor | None:
    """The documents core's intervals resample, or None (its contexts): decided from the contexts core reads, the
    two parts' nested prefixes of the draw, not from the whole draw (in the paper suite it holds every metric's
    contexts). One rule for both parts, as ``interval_groups`` is one record: documents where the shorter prefix
    (``n_shorter`` contexts) spans two or more, so neither part is left with one group."""
    if documents is None or resampled_documents(documents[:n_shorter]) is None:
        return None
    return documents


def _intervals(recon_groups: dict[str, torch.Tensor], down_groups: dict[str, torch.Tensor],
               down: dict[str, float]) -> dict[str, dict]:
    """Bootstrap intervals (``DEFAULT_N_BOOT`` draws of the groups, ``DEFAULT_LEVEL``) of both nMSEs, delta CE,
    KL and CE recovered; none for a CE recovered without a value (its ablation's rise is within noise)."""
    out = {**paired_bootstrap(recon_groups, NMSE_STATS), **paired_bootstrap(down_groups, downstream_statistics(down_groups))}
    for name, interval in out.items():
        if name in down and not math.isfinite(down[name]):
            interval.update(estimate=None, low=None, high=None)
    return out


def eval_corpus_too_short(given: str | None, corpus: str, tokens: int, most: int, text_needed: int, T: int,
                          needs: dict[str, int]) -> CorpusError:
    """The refusal of an eval corpus of ``tokens`` tokens that fills fewer contexts of ``T`` than the
    evaluation reads (``text_needed`` tokens of text), ``most`` the most tokens it lets each setting in
    ``needs`` score. It names each setting by its path ("eval.corpus", "eval.recon_tokens"); its
    ``worded(name)`` words it again with each as ``name`` says (a command line: as the user gave it)."""
    over = {f"eval.{setting}": n for setting, n in needs.items() if n > most}

    def worded(name) -> str:
        text = "the eval split" if given is None else name("eval.corpus")
        reads = " and ".join(f"{name(setting)} {n:,}" for setting, n in over.items())
        needed = f"{text_needed:,} {plural(text_needed, 'token')}"
        return (f"{text} {corpus!r} holds {tokens:,} {plural(tokens, 'token')}, too few for the evaluation ({reads} "
                f"in contexts of {T:,}: {needed} of text); expected a corpus of at least {needed}, or "
                f"{' and '.join(map(name, over))} <= {most}")

    return worded_corpus_error(worded)


def worded_corpus_error(worded: Callable[[Callable[[str], str]], str]) -> CorpusError:
    """A CorpusError naming each setting by its path, as ``worded(name)`` words it with ``name`` = identity;
    a caller that knows how the user gave each setting words it again (its ``worded`` attribute)."""
    err = CorpusError(worded(lambda setting: setting))
    err.worded = worded
    return err


@torch.no_grad()
def evaluate_core(sae, lm, cfg: EvalConfig | None = None, *, progress: bool = True,
                  contexts: DrawnContexts | torch.Tensor | None = None) -> CoreEvaluation:
    """Reconstruction metrics on ``cfg.recon_tokens`` held-out tokens and the spliced loss on
    ``cfg.downstream_tokens``, both from the contexts :func:`read_eval_contexts` draws (BOS first, position 0
    as the SAE was trained). ``contexts``: those contexts when the caller read them already (with the model's
    tokenizer, before the load)."""
    cfg = cfg or EvalConfig()
    hook = lm.check_hook(sae.cfg.hook_name)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook} of {lm.known_as}")
    sae.check_device(lm.device, f"model {lm.known_as}")
    corpus = resolve_corpus(cfg.corpus, "eval")
    T = lm.check_context_size(cfg.context_size or sae.cfg.context_size, context_named(cfg.context_size))
    first = 1 if sae.cfg.exclude_first else 0
    per_ctx = T - first
    n_recon, n_down = math.ceil(cfg.recon_tokens / per_ctx), math.ceil(cfg.downstream_tokens / per_ctx)
    drawn = contexts if contexts is not None else read_eval_contexts(cfg, lm.tokenize, lm.bos_token_id, T, first,
                                                                     sae.cfg.prepend_bos)
    if isinstance(drawn, torch.Tensor):  # contexts of unknown documents: each its own unit of the intervals
        drawn = DrawnContexts(drawn, None, torch.arange(drawn.shape[0]))
    tokens = drawn.tokens
    t0 = time.perf_counter()
    sae.eval()
    acts_ND = _hook_rows(lm, tokens[:n_recon], hook, first, cfg.recon_tokens, cfg.lm_batch_size)
    if not all_finite(acts_ND):
        raise NonFiniteError(f"activations at {hook} of model {lm.known_as} on eval corpus {corpus!r} contain NaN or "
                             "inf; expected finite activations (is the model broken, or overflowing its dtype?)")
    documents = _core_documents(drawn.documents, min(n_recon, n_down))
    # bounded over the contexts core reads: documents only other metrics read (the paper suite's draw) would
    # change which of core's are merged beyond MAX_GROUPS, so its intervals with the other metrics' counts
    n_read = max(n_recon, n_down)
    groups = bounded_groups((documents if documents is not None else torch.arange(tokens.shape[0]))[:n_read])
    recon, frequencies = reconstruction_metrics(sae, acts_ND.split(4096), progress=progress,
                                                row_groups=_row_groups(groups[:n_recon], per_ctx, acts_ND.shape[0]))
    t_recon = time.perf_counter() - t0
    per_context = downstream_sums(lm, sae, tokens[:n_down], hook=hook, lm_batch_size=cfg.lm_batch_size,
                                  mean_act_D=acts_ND.mean(dim=0), ablations=cfg.ablations,
                                  variants_per_forward=cfg.variants_per_forward, progress=progress)
    sums = by_document(per_context, groups[:n_down])
    down = downstream_summary(sums)
    metrics = {**recon.to_dict(), **down, "intervals": _intervals(recon.per_group, sums, down),
               "interval_groups": "contexts" if documents is None else "documents", "interval_method": INTERVAL_METHOD,
               **model_record(lm.name), "hook": hook, "eval_corpus": str(corpus),
               "context_size": T, "position_0": position_0_words(first), "sample_pool_tokens": cfg.sample_pool_tokens,
               "dead_definition": f"never fired on the {recon.n_tokens:,} eval tokens (not the training-time window)",
               "seconds": {"reconstruction": round(t_recon, 2),
                           "downstream": round(time.perf_counter() - t0 - t_recon, 2)}}
    return CoreEvaluation(metrics, frequencies, per_context)
