"""The jobs, each a public function the CLI wraps: harvest, train, sweep, evaluate, the paper
suite, quickstart. They compose the layers below and own every file of a run folder (layout:
:mod:`saelab.run_folder`)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import re
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from saelab.data import ActivationCache, ActivationCacheError, ActivationStream, pack_contexts
from saelab.data import cache_is_complete, check_disk_room, note_unfinished_overwrite, resolve_corpus, reusable_cache
from saelab.data import DrawnContexts, StreamConfig, TextsReadOnce, corpus_identity, sample_contexts, token_contexts
from saelab.data import write_activation_cache
from saelab.data.cache import NO_ROWS_STARTED, WRITTEN, cache_manifest
from saelab.data.text import (CORPUS_FINGERPRINT, CORPUS_PATH, corpus_absolute_path, corpus_files_key,
                              corpus_fingerprint, fingerprint_as_recorded, has_fingerprint)
from saelab.errors import (CheckpointError, ConfigError, CorpusError, NonFiniteActivationsError, RunExistsError,
                           SaelabError)
from saelab.evals._common import jsonable
from saelab.evals.bootstrap import earlier_intervals
from saelab.evals.compute_equivalent import resolve_series
from saelab.evals.config import AblationSparsityConfig, EvalConfig, N2GConfig, PaperSuiteConfig
from saelab.evals.core import INTERVAL_METHOD as CORE_INTERVALS, eval_settings, evaluate_core, evaluated_model
from saelab.evals.core import TRAINING_TEXT, held_out_label, read_eval_contexts, warn_of_training_text
from saelab.evals.n2g import check_latents
from saelab.evals.suite import (CORPUS_TEXT, EvaluationFound, check_results_before_load, check_series_before_load,
                                check_suite_applies, longest_n_future, read_suite_contexts, run_paper_suite,
                                suite_reads_eval_text, text_change, weights_change)
from saelab.models import (MODEL_FINGERPRINT, LanguageModel, check_before_load, check_context_fits, load_model,
                           model_fingerprint, model_name, model_provenance, tokenizer_before_load)
from saelab.models.lm import bos_token_id
from saelab.models.loading import dtype_name, loaded_dtype
from saelab.pipeline_config import DEFAULT_HOOK, HARVEST_BATCH, HarvestConfig, QuickstartConfig
from saelab.report import density_histogram, write_paper_report, write_run_report
from saelab.report.markdown import frequencies_mismatch
from saelab.run_folder import (ACTIVATIONS_DIR, DENSITY_PLOT, EVAL_METRICS, EVALS_DIR, SAE_DIR, TRAIN_CONFIG,
                               LatentFrequencies, SaeHashes, check_output_folder, check_sae_hook,
                               check_sweep_has_finished_runs, is_run, model_for, open_sae, read_eval_metrics, read_json,
                               read_latent_frequencies, recorded_model, sae_sha256, sweep_runs, unfinished_sweep_runs,
                               write_latent_frequencies)
from saelab.sae import TopKSAE, load_sae
from saelab.train import TrainConfig, train_sae
from saelab.train import distributed as ddp
from saelab.train.checkpoint import (changed_fields, read_metrics, read_status, recorded_train_seconds,
                                     replacing_run, settle_before_reading, training_changes)
from saelab.train.metric_sinks import check_log_targets
from saelab.train.config import check_warmup
from saelab.utils.atomic import write_json
from saelab.utils.cache_manifest import MANIFEST, holds_an_activation_cache
from saelab.utils.device import resolve_device, same_device
from saelab.utils.folder_lock import RunLock
from saelab.utils.words import plural

SAMPLE_POOL_FACTOR = 16
"""A harvest draws its contexts from at most this many times the tokens it harvests (16 M for the default
1 M, which is also the default --sample-pool-tokens): spread over many documents, while a small harvest
does not tokenize a pool of 16 M tokens for a few thousand."""


def _pool_tokens(cfg: HarvestConfig) -> int:
    """The corpus tokens a harvest draws its contexts from: sample_pool_tokens, at most SAMPLE_POOL_FACTOR
    times the tokens harvested."""
    return min(cfg.sample_pool_tokens, SAMPLE_POOL_FACTOR * cfg.n_tokens)


def check_corpus_fills_a_context(tokenizer, corpus: str, context_size: int, prepend_bos: bool, setting: str,
                                 texts: TextsReadOnce | None = None) -> None:
    """Refuse a corpus too short for one context of ``context_size`` (``setting`` chose it), with the model's
    tokenizer: before the (slow) load with :func:`tokenizer_before_load`'s, else (None) left to the loaded
    model's check. ``texts``: the corpus as the caller streams it (its first documents read there, not opened
    again)."""
    if tokenizer is not None:
        token_contexts(corpus, tokenizer, context_size, n_contexts=1, bos_token_id=bos_token_id(tokenizer),
                       prepend_bos=prepend_bos, setting=setting, texts=None if texts is None else texts.head())


def check_eval_corpus_before_load(tokenizer, cfg: EvalConfig, context_size: int, first: int,
                                  prepend_bos: bool) -> DrawnContexts | None:
    """Refuse an eval corpus too short for ``cfg``'s evaluation (see ``read_eval_contexts``) with the model's
    tokenizer: before the (slow) load with :func:`tokenizer_before_load`'s, else (None) left to the evaluation,
    which reads the corpus the same way after the load. Returns the contexts read (None: none were)."""
    if tokenizer is None:
        return None
    return read_eval_contexts(cfg, tokenizer, bos_token_id(tokenizer), context_size, first, prepend_bos)


def _contexts(cfg: HarvestConfig, lm: LanguageModel, texts: TextsReadOnce, progress: bool):
    """Packed contexts of the corpus, drawn across its first _pool_tokens tokens."""
    check_corpus_fills_a_context(lm.tokenizer, str(texts.source), cfg.context_size, cfg.prepend_bos,
                                 "harvest.context_size", texts)
    contexts = pack_contexts(texts.all(), lm.tokenize, lm.check_context_size(cfg.context_size),
                             bos_token_id=lm.bos_token_id, prepend_bos=cfg.prepend_bos)
    if cfg.sample_pool_tokens > 0:
        per_context = cfg.context_size - (1 if cfg.exclude_first else 0)
        contexts = sample_contexts(contexts, -(-cfg.n_tokens // per_context), _pool_tokens(cfg) // cfg.context_size,
                                   seed=cfg.seed, progress=progress)
    return contexts


def harvest(cfg: HarvestConfig, out_dir: str | Path, *, lm: LanguageModel | None = None,
            device: str | torch.device | None = None, model_dtype: str = "float32", overwrite: bool = False,
            progress: bool = True, overwrite_option: str = "--overwrite",
            texts: TextsReadOnce | None = None) -> ActivationCache:
    """Harvest activations into an on-disk cache; an interrupted harvest keeps the rows it wrote and where its
    stream stopped (also before its shuffle buffer first filled, with no row written yet), and the same call
    writes the rest (without running the model again over the text before).
    ``overwrite_option``: how the caller's command line asks for ``overwrite`` (said when a cache is reused).
    ``texts``: the corpus's stream when the caller's checks opened it already (its first documents read)."""
    check_output_folder(out_dir, "--out", "activations")
    corpus = resolve_corpus(cfg.corpus, "train")  # before the (slow) model load
    check_before_load(lm or cfg.model, cfg.hook, cfg.context_size)
    meta = _harvest_meta(cfg, corpus)
    cache = None
    if not overwrite:  # a finished cache of these settings is reused, one of others refused: before the model loads
        meta = _as_cache_records(meta, out_dir, corpus, overwrite_option)
        cache = _reusable_harvest(out_dir, meta, cfg.dtype, overwrite_option)
    if cache is not None:  # the same command again: the finished cache is the answer
        print(f"saelab: {out_dir} already holds this harvest, {cache.n_rows:,} activations ({overwrite_option} "
              "harvests again)", file=sys.stderr)
        note_unfinished_overwrite(out_dir, overwrite_option)
    else:
        if texts is None or str(texts.source) != str(corpus):  # one stream: the checks' documents are the harvest's
            texts = TextsReadOnce(corpus)
        # A hub model's tokenizer is fetched alone: a short corpus is refused before its weights download.
        tokenizer = tokenizer_before_load(lm or cfg.model)
        check_corpus_fills_a_context(tokenizer, corpus, cfg.context_size, cfg.prepend_bos, "harvest.context_size",
                                     texts)
        cache = _harvest_into(out_dir, cfg, texts, _with_corpus_records(meta, corpus), lm=lm, device=device,
                              model_dtype=model_dtype, overwrite=overwrite, progress=progress, tokenizer=tokenizer)
    if cache.n_rows < cfg.n_tokens:  # the corpus ran out: say so rather than leave a silently smaller cache
        print(f"saelab: warning: the corpus {corpus} gave {cache.n_rows:,} activations, fewer than the "
              f"{cfg.n_tokens:,} asked (--n-tokens); the cache holds all it had", file=sys.stderr)
    return cache


def _harvest_meta(cfg: HarvestConfig, corpus: str) -> dict[str, Any]:
    """What an activation cache records of its harvest (a local model path as an absolute one)."""
    meta = {**model_provenance(model_name(cfg.model)), "hook_name": cfg.hook, "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos, "exclude_first": cfg.exclude_first, "dataset": corpus,
            "harvest": asdict(cfg)}
    if cfg.sample_pool_tokens and _pool_tokens(cfg) < cfg.sample_pool_tokens:
        # Only a pool smaller than the option's is recorded: caches drawn from the option's whole pool, as
        # before the pool was sized to the harvest, are still this harvest; a smaller one is not resumed.
        meta["sample_pool_tokens_drawn"] = _pool_tokens(cfg)
    return meta


def _as_cache_records(meta: dict[str, Any], out_dir: str | Path, corpus: str,
                      overwrite_option: str) -> dict[str, Any]:
    """``meta`` as the cache in ``out_dir`` is to be compared with it, where that cache recorded its corpus's
    fingerprint and ``corpus`` is a local file or folder: the text it names decides, not the name. The same text
    under another name (another folder, another relative path) is the cache's corpus, so only real differences of
    settings are named; the same name now holding other text is refused. A cache without a fingerprint (an
    earlier saelab's) is compared by the name alone."""
    manifest = cache_manifest(out_dir)
    recorded = manifest["meta"] if manifest is not None and isinstance(manifest.get("meta"), dict) else {}
    fingerprint = recorded.get(CORPUS_FINGERPRINT)
    if not isinstance(fingerprint, dict) or corpus_files_key(corpus) is None:
        return meta
    if has_fingerprint(corpus, fingerprint):
        harvest_given = recorded.get("harvest")
        named = harvest_given.get("corpus") if isinstance(harvest_given, dict) else meta["harvest"]["corpus"]
        return {**meta, "dataset": recorded.get("dataset"), "harvest": {**meta["harvest"], "corpus": named}}
    if recorded.get("dataset") == meta["dataset"]:
        now = corpus_fingerprint(corpus)
        verb = "reuse" if manifest["complete"] else "resume"
        raise ActivationCacheError(
            f"cannot {verb} activation cache {str(out_dir)!r}: {WRITTEN} the corpus {meta['dataset']!r}, which "
            f"held other text then ({_fingerprint_shown(fingerprint)}; now {_fingerprint_shown(now)}); pass "
            f"overwrite=True ({overwrite_option}) to harvest it again")
    return meta  # another name and other text: refused by its name, as a cache without a fingerprint


def _fingerprint_shown(fingerprint: dict[str, Any]) -> str:
    """'8,192 bytes, sha256 0123456789ab...': enough to tell two texts apart in one line."""
    size = fingerprint.get("bytes")
    return (f"{size:,} bytes, " if isinstance(size, int) else "") + f"sha256 {str(fingerprint.get('sha256'))[:12]}..."


def _with_corpus_records(meta: dict[str, Any], corpus: str) -> dict[str, Any]:
    """``meta`` with the fingerprint of the corpus as this harvest reads it and where it lies, resolved (a hub
    dataset: neither). Taken now, from the folder the corpus was named in, so an SAE trained on the cache records
    the text it was trained on, and an evaluation tells that text by content under any name or folder, and the
    file it was read from, even once edited, under any name for it. Only a writing harvest hashes it (a file
    unchanged since an earlier hash, by this process or an earlier call, is not read again: file_fingerprints); a
    reuse or resume compares the settings alone (cache.RECORDED_ONLY), after _as_cache_records read the recorded
    one."""
    recorded = {CORPUS_FINGERPRINT: corpus_fingerprint(corpus), CORPUS_PATH: corpus_absolute_path(corpus)}
    return {**meta, **{key: value for key, value in recorded.items() if value is not None}}


def _reusable_harvest(out_dir: str | Path, meta: dict[str, Any], dtype: str,
                      overwrite_option: str) -> ActivationCache | None:
    """reusable_cache, taking a finished cache an earlier saelab drew from the whole --sample-pool-tokens pool
    (its meta has no sample_pool_tokens_drawn): its rows are a valid harvest of these options. Only an
    unfinished one needs the same draw to go on, which the pool sized to the harvest cannot give."""
    try:
        return reusable_cache(out_dir, meta=meta, dtype=dtype)
    except ActivationCacheError:
        if "sample_pool_tokens_drawn" not in meta:
            raise
    whole_pool = {key: value for key, value in meta.items() if key != "sample_pool_tokens_drawn"}
    cache = reusable_cache(out_dir, meta=whole_pool, dtype=dtype)  # another difference: refused by its name
    if cache is None:
        raise ActivationCacheError(
            f"cannot resume activation cache {str(out_dir)!r}: its harvest was started by an earlier saelab, which "
            f"drew its contexts from the whole --sample-pool-tokens pool ({meta['harvest']['sample_pool_tokens']:,} "
            f"tokens), not from {meta['sample_pool_tokens_drawn']:,}: its rest cannot be drawn the same way; pass "
            f"overwrite=True ({overwrite_option}) to harvest it again")
    return cache


def _harvest_into(out_dir: str | Path, cfg: HarvestConfig, texts: TextsReadOnce, meta: dict[str, Any], *,
                  lm: LanguageModel | None, device: str | torch.device | None, model_dtype: str, overwrite: bool,
                  progress: bool, tokenizer=None) -> ActivationCache:
    """Load the model (with ``tokenizer``, read already, when given) and write (or resume) the cache."""
    lm = load_model(lm or cfg.model, device=device, dtype=model_dtype, tokenizer=tokenizer, progress=progress)
    lm.check_hook(cfg.hook)
    check_disk_room(out_dir, cfg.n_tokens, lm.hook_width(cfg.hook), cfg.dtype, overwrite=overwrite)
    stream = ActivationStream(lm, cfg.hook, _contexts(cfg, lm, texts, progress),
                              StreamConfig(batch_size=HARVEST_BATCH, lm_batch_size=cfg.lm_batch_size,
                                           exclude_first=cfg.exclude_first, buffer_tokens=cfg.buffer_tokens,
                                           seed=cfg.seed, max_tokens=cfg.n_tokens, drop_last=False,
                                           progress=progress))
    return write_activation_cache(stream, out_dir, meta=meta, dtype=cfg.dtype, resume=not overwrite,
                                  overwrite=overwrite, progress=progress)


def _open_cache(cache: str | Path | ActivationCache, rows_needed: int) -> ActivationCache:
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    if cache.n_rows < rows_needed:
        raise CorpusError(f"activation cache {cache.folder} holds {cache.n_rows:,} {plural(cache.n_rows, 'row')} but "
                          "training needs "
                          f"{rows_needed:,} (total_tokens); harvest more or train on fewer tokens (--total-tokens "
                          f"{cache.n_rows} at most)")
    return cache


def _cache_meta(cache: ActivationCache) -> dict[str, Any]:
    keys = ("model_name", "hook_name", "context_size", "prepend_bos", "exclude_first", "dataset", "model_source",
            CORPUS_FINGERPRINT, CORPUS_PATH)
    return {k: cache.meta[k] for k in keys if k in cache.meta}


def _cache_record(cache: ActivationCache) -> dict[str, Any]:
    """What a run records of the cache it trains on (train_config.json's "data"): its folder, and a
    fingerprint by which a resume on another cache is refused: the manifest (rows, settings) and the head
    of each shard, since two harvests with the same settings have equal manifests. Reads 64 KiB a shard. The
    manifest's ``seconds`` (how long the writing took) is left out: the same rows harvested again are the same.
    Runs recorded while it was in are matched by ``fingerprint_with_seconds`` (checkpoint.data_changes)."""
    forms = {"fingerprint": {k: v for k, v in cache.manifest.items() if k != "seconds"}}
    if "seconds" in cache.manifest:
        forms["fingerprint_with_seconds"] = cache.manifest
    digests = {name: hashlib.sha256(json.dumps(m, sort_keys=True).encode("utf-8")) for name, m in forms.items()}
    for shard in cache.manifest["shards"]:
        with open(cache.folder / shard["file"], "rb") as f:
            head = f.read(1 << 16)
        for digest in digests.values():
            digest.update(head)
    return {"activations": str(cache.folder.resolve()), **{name: d.hexdigest() for name, d in digests.items()}}


def _cache_batches(cache: ActivationCache, cfg: TrainConfig, device: str | torch.device | None = None, *,
                   own_rows: bool = False):
    """The cache's training batches from a batch on; with ``own_rows``, only this process's rows of each
    (``ddp.local_rows``'s slice), read without the other processes' (the whole batch in one process)."""
    form = batch_form(cache, resolve_device(device).type == "cuda")

    def batches_from(start_batch: int):
        part = (ddp.rank(), ddp.world_size()) if own_rows and ddp.is_distributed() else None
        return cache.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, start_batch=start_batch, part=part, **form)
    return batches_from


def batch_form(cache: ActivationCache, to_gpu: bool) -> dict[str, Any]:
    """How training reads ``cache``'s batches: for a GPU the rows go as stored (float16: half the bytes),
    assembled in page-locked memory (one copy on the host, an asynchronous one to the GPU) and widened there;
    the CPU widens them while reading ahead."""
    return {"dtype": cache.torch_dtype, "pin_memory": True} if to_gpu else {}


@contextlib.contextmanager
def _naming_cache(cache: ActivationCache):
    """A NaN or inf met in training comes from the cache's rows: say which cache."""
    try:
        yield
    except NonFiniteActivationsError as e:
        raise NonFiniteActivationsError(f"{e}, read from activation cache {cache.folder}; harvest it again "
                                        "(--overwrite)") from e


def train_from_cache(cache: str | Path | ActivationCache, run_dir: str | Path, cfg: TrainConfig, *,
                     device: str | torch.device | None = None, overwrite: bool = False,
                     progress: bool = True, log_to: Sequence[str] = ()) -> TopKSAE:
    """Train one SAE on an activation cache (resumes an interrupted run in the same folder);
    ``log_to``: also log its metrics to "tensorboard" and/or "wandb"."""
    check_output_folder(run_dir, "--out", "run")
    check_warmup(cfg)
    cache = _open_cache(cache, cfg.total_tokens)
    settle_before_reading(Path(run_dir))
    done = None if overwrite else finished_training(Path(run_dir), cfg, cache)
    if done is not None:  # the same command again: the finished run is the answer
        print(f"saelab: {run_dir} already holds this finished run (--overwrite trains it again)", file=sys.stderr)
        return done
    with _naming_cache(cache):
        return train_sae(cfg, _cache_batches(cache, cfg, device), run_dir, d_in=cache.d, meta=_cache_meta(cache),
                         overwrite=overwrite, progress=progress, device=device, log_to=log_to,
                         data=_cache_record(cache), own_rows_from=_cache_batches(cache, cfg, device, own_rows=True))


def sweep_configs(base: TrainConfig, grid: dict[str, list[Any]]) -> dict[str, TrainConfig]:
    """Every combination of the grid's values over ``base``, keyed by a folder name like n4096_k32. The runs
    train together on one stream of batches: the grid cannot set batch_size."""
    if "batch_size" in grid:  # each run would count base-sized batches as its own: steps and lr schedule wrong
        raise ConfigError("a sweep's runs train together on the same batches, so they share one batch size: set "
                          "batch_size in the base config, not in the grid")
    short = {"n_latents": "n", "k": "k", "lr": "lr", "k_aux": "kaux", "total_tokens": "tok"}
    # One order, TrainConfig's, whatever order the grid was typed in: `k=8 n-latents=256` names n256_k8
    order = [f.name for f in fields(TrainConfig)]
    keys = sorted(grid, key=lambda k: order.index(k) if k in order else len(order))
    out, point_of = {}, {}
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{short.get(k, k)}{_folder_value(v)}" for k, v in zip(keys, values)) or "base"
        cfg = replace(base, **dict(zip(keys, values)))
        if name in out and out[name] != cfg:  # never expected (floats are written exactly): one folder, two runs
            raise ConfigError(f"the grid's points {point_of[name]} and {dict(zip(keys, values))} both name the run "
                              f"folder {name}; give values that differ in their written form")
        out.setdefault(name, cfg)  # a point given twice is one run
        point_of.setdefault(name, dict(zip(keys, values)))
    return out


def _folder_value(value: Any) -> str:
    """A grid value as a run folder's name writes it: a float in 6 significant digits (0.0003, 1e-05) where they
    say it exactly, else in all it needs (0.0010000001 beside 0.001)."""
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return float.__repr__(value) if isinstance(value, float) else str(value)  # numpy's repr names its type


def sweep_from_cache(cache: str | Path | ActivationCache, out_dir: str | Path, base: TrainConfig,
                     grid: dict[str, list[Any]], *, device: str | torch.device | None = None,
                     overwrite: bool = False, progress: bool = True, log_to: Sequence[str] = ()) -> dict[str, TopKSAE]:
    """Train every SAE of a grid from ONE pass over an activation cache, each in out_dir/<name>/.
    A run already finished with the same config on such activations is kept (the same command
    resumes a sweep), unless ``overwrite``."""
    from saelab.train import train_many

    check_output_folder(out_dir, "--out", "sweep")
    configs = sweep_configs(base, grid)
    for c in configs.values():  # a point's steps set by the grid: the refusal names that grid entry
        check_warmup(c, run=f"the grid's total_tokens={c.total_tokens}" if "total_tokens" in grid else None)
    cache = _open_cache(cache, max(c.total_tokens for c in configs.values()))
    out_dir = Path(out_dir)
    configs, finished = _named_as_finished(out_dir, configs, cache, overwrite=overwrite)
    done = {} if overwrite else {n: load_sae(out_dir / n / SAE_DIR) for n in finished}
    todo = [n for n in configs if done.get(n) is None]
    if todo:
        with _naming_cache(cache):
            saes = train_many([configs[n] for n in todo], _cache_batches(cache, base, device),
                              [out_dir / n for n in todo],
                              d_in=cache.d, meta=_cache_meta(cache), overwrite=overwrite, progress=progress,
                              device=device, log_to=log_to, data=_cache_record(cache),
                              own_rows_from=_cache_batches(cache, base, device, own_rows=True))
        done.update(zip(todo, saes))
    return {n: done[n] for n in configs}


def _named_as_finished(out_dir: Path, configs: dict[str, TrainConfig], cache: ActivationCache, *,
                       overwrite: bool = False) -> tuple[dict[str, TrainConfig], set[str]]:
    """(``configs`` with each grid point that a run of ``out_dir`` under another name trains (same config,
    e.g. k=32 given where the recipe's k is 32, or a name an earlier saelab wrote in the order the grid was
    typed) renamed to that run, the names of the points finished), so the same SAE is not trained and
    counted twice, and a cut-off run goes on in its folder (with ``overwrite`` it is trained again there)."""
    record = _cache_record(cache)
    settle_before_reading(*(out_dir / name for name in configs))  # its runs' killed overwrites put back
    neighbours = [d for d in sorted(out_dir.iterdir()) if d.is_dir() and d.name not in configs and d.name[0] != "."] \
        if out_dir.is_dir() else []
    settle_before_reading(*neighbours, busy_left=True)  # runs a grid point may be: another writer's are its own
    others = [run for run in sweep_runs(out_dir) if run.name not in configs]
    cut_off = [run for run in unfinished_sweep_runs(out_dir) if run.name not in configs]
    out, finished = {}, set()
    for name, cfg in configs.items():
        here = finished_training(out_dir / name, cfg, cache, record=record, load=False)
        same = None if here else next(
            (run.name for run in others if finished_training(run, cfg, cache, record=record, load=False)), None)
        if same is not None and same not in out:
            done = "trains it again there (--overwrite)" if overwrite else "kept it, not trained again"
            print(f"saelab: sweep point {name} is the finished run {out_dir / same} (same training config): {done}",
                  file=sys.stderr)
        resumed = None if here or same is not None or (out_dir / name).exists() else next(
            (run.name for run in cut_off if _same_training(run, cfg, cache, record)), None)
        if resumed is not None and resumed not in out:  # else trained beside it, and it stays unfinished for good
            done = "trains it again there (--overwrite)" if overwrite else "goes on training it there"
            print(f"saelab: sweep point {name} is the unfinished run {out_dir / resumed} (same training config): "
                  f"{done}", file=sys.stderr)
        out.setdefault(same or resumed or name, cfg)
        if here or same is not None:
            finished.add(same or name)
    return out, finished


def evaluate(sae: TopKSAE | str | Path, *, lm: LanguageModel | str | None = None, cfg: EvalConfig | None = None,
             out_dir: str | Path | None = None, device: str | torch.device | None = None,
             model_dtype: str = "float32", progress: bool = True, sae_hash: str | None = None,
             contexts: DrawnContexts | None = None, allow_http: bool = False,
             before_load: Callable[[TopKSAE], None] | None = None, eval_text: str | None = None) -> dict[str, Any]:
    """Core metrics of an SAE on held-out text; with ``out_dir`` also metrics.json (recording the
    SAE's weight hash and the eval settings), latent_frequencies.safetensors and density.png there.
    ``sae_hash``: :func:`sae_sha256` of ``sae`` when the caller has it already (hashing reads every weight);
    ``contexts``: the eval contexts when the caller read them already (:func:`check_eval_corpus_before_load`);
    ``allow_http``: also download the SAE from a plain http URL; ``before_load``: as :func:`notes_before_load`
    takes it; ``eval_text``: :func:`held_out_label`'s label of the eval corpus where the caller took it and said the
    notes before its model loaded (:func:`evaluate_sweep`: every run's at once), else they are said here: that
    ``out_dir``'s metrics.json is evaluated again (:func:`_note_evaluated_again`), the caller's, the training
    text's."""
    cfg = cfg or EvalConfig()
    if out_dir is not None:
        check_output_folder(out_dir, "--out")
    given = isinstance(sae, TopKSAE)
    named = None if given else sae
    sae = sae if given else open_sae(sae, allow_http=allow_http)[0]
    resolve_corpus(cfg.corpus, "eval")  # a missing corpus is named before the model loads
    spec = lm or model_for(sae, named)
    check_before_load(spec, sae.cfg.hook_name, cfg.context_size, sae.cfg.context_size, sae=sae)
    # A hub model's tokenizer is fetched alone: a short corpus is refused before its weights download.
    tokenizer = None if isinstance(spec, LanguageModel) else tokenizer_before_load(spec)
    # read before the load, for the evaluation: a loaded model's reads the corpus at once
    if contexts is None:
        contexts = check_eval_corpus_before_load(tokenizer, cfg, cfg.context_size or sae.cfg.context_size,
                                                 int(sae.cfg.exclude_first), sae.cfg.prepend_bos)
    sae_hash = sae_hash or sae_sha256(sae)
    if eval_text is None:
        if out_dir is not None:
            _note_evaluated_again(Path(out_dir), sae, cfg, spec, model_dtype, sae_hash)
        eval_text = notes_before_load(sae, cfg, before_load)
    weights = model_fingerprint(spec)  # the files as the load reads them
    lm = load_model(spec, device=device, dtype=model_dtype, tokenizer=tokenizer, progress=progress)  # once
    sae = _beside_model(sae, lm, given=given)
    core = evaluate_core(sae, lm, cfg, progress=progress, contexts=contexts)
    metrics = jsonable({**core.metrics, MODEL_FINGERPRINT: weights, "eval_text": eval_text,
                        "sae_sha256": sae_hash, "eval_config": _eval_config_record(cfg),
                        "eval_as_read": _eval_as_read(cfg, sae), "model_dtype": dtype_name(lm.dtype)})
    if out_dir is not None:
        # The frequencies go first: metrics.json marks the evaluation done, so one cut off before it runs
        # again and rewrites them; they record the SAE and the settings, so a report never pairs them with
        # a metrics.json of another evaluation.
        write_latent_frequencies(out_dir, LatentFrequencies(core.frequencies_N, metrics["sae_sha256"],
                                                            eval_settings(metrics)))
        write_json(Path(out_dir) / EVAL_METRICS, metrics)
        density_histogram(core.frequencies_N, Path(out_dir) / DENSITY_PLOT, metrics["n_tokens"])
    return metrics


def notes_before_load(sae: TopKSAE, cfg: EvalConfig, before_load: Callable[[TopKSAE], None] | None) -> str:
    """What the core evaluation of ``sae`` with ``cfg`` says once every check has passed, before the model loads
    (not after minutes of model work), as the paper suite says it; where the evaluation is reused, before its
    metrics are returned. First the caller's notes (``before_load``, called with the SAE: the CLI's of another
    --hook or --model), then the warning of an eval corpus that is the SAE's training text. Returns
    :func:`held_out_label`'s label of that corpus, for metrics.json."""
    if before_load is not None:
        before_load(sae)
    return held_out_label(sae, str(resolve_corpus(cfg.corpus, "eval")))  # the corpus evaluate_core records


def _note_evaluated_again(out_dir: Path, sae: TopKSAE, cfg: EvalConfig, spec: LanguageModel | str,
                          model_dtype: str, sae_hash: str) -> None:
    """Say, before the model loads, that ``out_dir``'s evaluation of these settings is made again rather than reused,
    and why (its intervals are not this saelab's); it stays as it was until the new metrics.json replaces it. Told
    as the reuse was refused, from the model as named (``spec``: :func:`model_name` gives the loaded model's name)
    and the dtype it is loaded in (:func:`~saelab.models.loading.loaded_dtype`)."""
    earlier = earlier_evaluation(out_dir, sae, cfg, model=spec, model_dtype=model_dtype, sae_hash=sae_hash)
    if earlier:
        print(f"saelab: note: {out_dir / EVAL_METRICS} is evaluated again, not reused: {earlier}", file=sys.stderr)


def _beside_model(sae: TopKSAE, lm: LanguageModel, *, given: bool) -> TopKSAE:
    """``sae`` on the model's device: the evaluations splice it into the model's forward. An SAE the
    caller gave that lies elsewhere is copied there, so it stays where the caller put it."""
    if same_device(sae.W_dec.device, lm.device):
        return sae
    return copy.deepcopy(sae).to(lm.device) if given else sae.to(lm.device)


def _eval_config_record(cfg: EvalConfig) -> dict[str, Any]:
    """The eval config as metrics.json stores it (JSON types: tuples are lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def _eval_as_read(cfg: EvalConfig, sae: TopKSAE) -> dict[str, Any]:
    """The eval settings left to defaults or paths, as this evaluation of ``sae`` reads them: the corpus's file
    (corpus_identity: ``ev.jsonl`` typed in two folders names two files), its whole text's fingerprint (the identity
    hashes the first 16 MiB; an evaluation's sample pool may read past them) and the context size."""
    return {"corpus": corpus_identity(cfg.corpus, "eval"),
            CORPUS_TEXT: corpus_fingerprint(resolve_corpus(cfg.corpus, "eval")),
            "context_size": cfg.context_size or sae.cfg.context_size}


def evaluation_is_current(run_dir: str | Path, sae: TopKSAE, cfg: EvalConfig, *,
                          model: str | LanguageModel | None = None, model_dtype: str = "float32",
                          sae_hash: str | None = None) -> bool:
    """True when the run's metrics.json describes this SAE evaluated with this config, model dtype and
    model (None: the SAE's own; one given loaded is in its own dtype, whatever ``model_dtype`` asks). An unreadable
    metrics.json is not current: the evaluation runs again. ``sae_hash``: as :func:`read_eval_metrics` takes it."""
    changes = evaluation_changes(run_dir, sae, cfg, model=model, model_dtype=model_dtype, sae_hash=sae_hash)
    return _state_of(changes) == "current"


def _state_of(changes: list[str] | None) -> str:
    return "none" if changes is None else "other" if changes else "current"


def evaluation_changes(run_dir: str | Path, sae: TopKSAE, cfg: EvalConfig, *, model: str | LanguageModel | None,
                        model_dtype: str, sae_hash: str | None = None) -> list[str] | None:
    """The settings (eval config, model dtype, model) in which the run's evaluation of ``sae`` differs from
    this one, as "eval.recon_tokens 2048 -> 1024"; None when it holds no readable evaluation of ``sae``, or one of
    these settings that is evaluated again (:func:`earlier_evaluation`). ``sae_hash``: as :func:`read_eval_metrics`
    takes it."""
    recorded = _recorded_evaluation(run_dir, sae, cfg, model=model, model_dtype=model_dtype, sae_hash=sae_hash)
    if recorded is None:
        return None
    old, changes = recorded
    return changes or (None if earlier_intervals(old, CORE_INTERVALS) else [])


def earlier_evaluation(run_dir: str | Path, sae: TopKSAE, cfg: EvalConfig, *, model: str | LanguageModel | None = None,
                       model_dtype: str = "float32", sae_hash: str | None = None) -> str | None:
    """Why the run's evaluation of ``sae`` with these settings is made again rather than reused: its intervals are
    not the ones this saelab computes (:func:`saelab.evals.bootstrap.earlier_intervals`); None when it holds no such
    evaluation. Arguments as :func:`evaluation_is_current` takes them."""
    recorded = _recorded_evaluation(run_dir, sae, cfg, model=model, model_dtype=model_dtype, sae_hash=sae_hash)
    return None if recorded is None or recorded[1] else earlier_intervals(recorded[0], CORE_INTERVALS)


def _recorded_evaluation(run_dir: str | Path, sae: TopKSAE, cfg: EvalConfig, *, model: str | LanguageModel | None,
                         model_dtype: str, sae_hash: str | None) -> tuple[dict[str, Any], list[str]] | None:
    """The run's evaluation of ``sae`` (its metrics.json) and the settings in which it differs from this one; None
    when it holds no readable evaluation of ``sae``. metrics.json records the dtype the model was in: compared with
    the one it is in now (:func:`~saelab.models.loading.loaded_dtype`), not the one asked for."""
    old = _readable_eval_metrics(run_dir, sae, sae_hash=sae_hash)
    if not old:
        return None
    old_eval, new_eval = old.get("eval_config"), _eval_config_record(cfg)
    if isinstance(old_eval, dict):  # written before the contexts were drawn: the first ones, as 0 reads them
        old_eval = {"sample_pool_tokens": 0, **old_eval}
    texts = None, None
    if isinstance(old_eval, dict) and isinstance(old.get("eval_as_read"), dict):  # older files: settings as typed
        old_eval, new_eval = {**old_eval, **old["eval_as_read"]}, {**new_eval, **_eval_as_read(cfg, sae)}
        # an earlier saelab's record has no fingerprint: judged by the corpus's identity alone; one taken otherwise
        # then is compared as it was taken
        recorded = CORPUS_TEXT in old_eval
        texts = old_eval.pop(CORPUS_TEXT, None), new_eval.pop(CORPUS_TEXT, None)
        texts = (texts[0], fingerprint_as_recorded(resolve_corpus(cfg.corpus, "eval"), texts[1], texts[0])) \
            if recorded else (None, None)
    spec = model or model_for(sae)
    changes = changed_fields({"eval": old_eval, "model_dtype": old.get("model_dtype", "float32"),
                              "model": evaluated_model(old)},
                             {"eval": new_eval, "model_dtype": loaded_dtype(spec, model_dtype),
                              "model": model_name(spec)})
    changes += text_change(old_eval, new_eval, *texts) if isinstance(old_eval, dict) else []
    return old, changes + _weights_changes(old, spec)


def _weights_changes(old: dict[str, Any], spec: str | LanguageModel) -> list[str]:
    """:func:`weights_change` of a metrics.json's model and the model ``spec`` names; none where it records no
    fingerprint (an earlier saelab's: judged by the model's name, and nothing is hashed)."""
    if MODEL_FINGERPRINT not in old:
        return []
    return weights_change({"model": evaluated_model(old), MODEL_FINGERPRINT: old[MODEL_FINGERPRINT]},
                          {"model": model_name(spec), MODEL_FINGERPRINT: model_fingerprint(spec)})


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, *, lm: LanguageModel | str | None = None,
                 device: str | torch.device | None = None, model_dtype: str = "float32", overwrite: bool = False,
                 progress: bool = True, sae_hash: str | None = None, sae: TopKSAE | None = None,
                 contexts: DrawnContexts | None = None, before_load: Callable[[TopKSAE], None] | None = None,
                 eval_text: str | None = None) -> dict[str, Any]:
    """Evaluate a run folder's SAE into its metrics.json and rewrite its report.md. An evaluation of
    this SAE already there is reused when its settings are these, and kept (refused) when they are
    not, unless ``overwrite``. ``sae_hash``, ``sae``, ``contexts``: :func:`sae_sha256` of the run's SAE,
    the SAE as loaded from the run and the eval contexts, when the caller has them (none is read again);
    ``before_load``, ``eval_text``: as :func:`evaluate` takes them (said also where the evaluation is reused).
    Holds the run's lock throughout: a training into the run, or another evaluation of it, is refused
    meanwhile (and this one is refused while they run), so metrics.json describes the SAE beside it."""
    lock = RunLock(Path(run_dir)).acquire()
    try:
        return _evaluate_run_locked(run_dir, cfg or EvalConfig(), lm=lm, device=device, model_dtype=model_dtype,
                                    overwrite=overwrite, progress=progress, sae_hash=sae_hash, sae=sae,
                                    contexts=contexts, before_load=before_load, eval_text=eval_text)
    finally:
        lock.release()


def _evaluate_run_locked(run_dir: str | Path, cfg: EvalConfig, *, lm: LanguageModel | str | None,
                         device: str | torch.device | None, model_dtype: str, overwrite: bool, progress: bool,
                         sae_hash: str | None, sae: TopKSAE | None, contexts: DrawnContexts | None,
                         before_load: Callable[[TopKSAE], None] | None, eval_text: str | None) -> dict[str, Any]:
    sae = sae if sae is not None else load_sae(Path(run_dir) / SAE_DIR)
    # Once, for the check, the evaluation and the report: hashing reads every weight.
    sae_hash = sae_hash or sae_sha256(sae)
    changes = None if overwrite else evaluation_changes(run_dir, sae, cfg, model=lm, model_dtype=model_dtype,
                                                         sae_hash=sae_hash)
    if changes == []:
        print(f"{Path(run_dir) / EVAL_METRICS} already holds this evaluation (--overwrite runs it again)",
              file=sys.stderr)
        if eval_text is None:  # else said by the caller
            notes_before_load(sae, cfg, before_load)
        return read_eval_metrics(run_dir, sae, sae_hash=sae_hash)
    if changes:
        resolve_corpus(cfg.corpus, "eval")  # a missing corpus first: --overwrite or --out, as advised, meets it next
        raise RunExistsError(f"{Path(run_dir) / EVAL_METRICS} holds this SAE's evaluation with other settings "
                             f"({', '.join(changes)}); pass --overwrite to replace it, or --out DIR to write this "
                             "one elsewhere")
    metrics = evaluate(sae, lm=lm, cfg=cfg, out_dir=run_dir, device=device, model_dtype=model_dtype,
                       progress=progress, sae_hash=sae_hash, contexts=contexts, before_load=before_load,
                       eval_text=eval_text)
    if (Path(run_dir) / TRAIN_CONFIG).exists():
        write_run_report(run_dir, density_drawn_by=metrics, sae_hash=sae_hash, sae=sae)
    return metrics


def _readable_eval_metrics(run_dir: str | Path, sae: TopKSAE, *, sae_hash: str | None = None) -> dict[str, Any]:
    """The run's metrics.json when it describes ``sae``; {} when absent, unreadable or of another SAE."""
    try:
        return read_eval_metrics(run_dir, sae, sae_hash=sae_hash)
    except SaelabError:
        return {}


EvalContextsRead = dict[tuple[str, int, int, bool], torch.Tensor]
"""Eval contexts read already, by (model, context size, first position, prepend_bos): what evaluate_sweep
would read again."""


def check_evaluation_before_training(cache: str | Path, cfg: EvalConfig) -> EvalContextsRead:
    """Refuse, before SAEs train on ``cache``, what would refuse their evaluation after the training: a
    missing eval corpus or one too short for the evaluation, a hook or context the cache's model does not take.
    Returns the eval contexts read for the check (for ``evaluate_sweep``'s ``contexts_read``)."""
    resolve_corpus(cfg.corpus, "eval")
    meta = ActivationCache(cache).meta
    spec = recorded_model(meta.get("model_source"), meta.get("model_name"), f"activation cache {cache}")
    check_before_load(spec, meta.get("hook_name", ""), cfg.context_size, meta.get("context_size"))
    context_size = cfg.context_size or meta.get("context_size")
    if not context_size:
        return {}
    # The SAEs trained on the cache read its contexts, from the position its harvest kept.
    read = (spec, context_size, int(bool(meta.get("exclude_first"))), meta.get("prepend_bos", True))
    contexts = check_eval_corpus_before_load(tokenizer_before_load(spec), cfg, *read[1:])
    return {} if contexts is None else {read: contexts}


class SaeSettings(NamedTuple):
    """An SAE's settings without its weights (``cfg``, as the SAE has it): what a note of the model or hook it
    records reads, kept for every run of a sweep while the SAEs not to evaluate are dropped."""
    cfg: Any


class _TokenizersBeforeLoad(dict):
    """Each model's :func:`tokenizer_before_load`, read once: for the checks of every run, then for the load."""

    def __missing__(self, spec: str):
        self[spec] = tokenizer_before_load(spec)
        return self[spec]


def evaluate_sweep(folder: str | Path, cfg: EvalConfig | None = None, *, model: str | None = None,
                   device: str | torch.device | None = None, model_dtype: str = "float32", overwrite: bool = False,
                   progress: bool = True, sae_hashes: SaeHashes | None = None,
                   contexts_read: EvalContextsRead | None = None,
                   before_load: Callable[[dict[Path, SaeSettings]], None] | None = None) -> dict[str, Any]:
    """Core-evaluate every run of a sweep folder (one model load each); runs whose metrics.json
    describes their SAE with the same settings are kept, and ones with other settings refused before any
    work, unless ``overwrite``. ``sae_hashes``: filled with each run's SAE hash, for the scaling study next.
    ``contexts_read``: eval contexts of ``cfg`` read already (check_evaluation_before_training's), used
    where a run reads the same ones. ``before_load``: called with each run's SaeSettings once every run is checked,
    before any model loads (the CLI's note of a ``model`` other than the runs'), after the notes of runs evaluated
    again; the training text's warning follows it (:func:`_sweep_eval_texts`)."""
    cfg = cfg or EvalConfig()
    sae_hashes = sae_hashes or SaeHashes()
    runs = sweep_runs(folder)
    if not runs and unfinished_sweep_runs(folder):  # an interrupted sweep: its runs named, as the CLI does
        check_sweep_has_finished_runs(folder)
    if not runs:
        raise SaelabError(f"{folder}: no run folders with a trained SAE inside; expected the output folder of "
                          "`saelab sweep`")
    resolve_corpus(cfg.corpus, "eval")  # a missing corpus is named before any model loads
    state, specs, changes, hashes, saes, contexts, settings = {}, {}, {}, {}, {}, {}, {}
    corpus_read, tokenizers = dict(contexts_read or {}), _TokenizersBeforeLoad()
    # Each SAE is loaded once: those to evaluate are kept from their check to their evaluation (on the CPU;
    # the sweep trained them all at once), the others dropped after their check.
    for run in runs:
        # once per run, for the check, the evaluation and the scaling study: hashing reads every weight
        sae, hashes[run] = sae_hashes.load(run)
        settings[run] = SaeSettings(sae.cfg)
        changes[run] = None if overwrite else evaluation_changes(run, sae, cfg, model=model, model_dtype=model_dtype,
                                                                  sae_hash=hashes[run])
        state[run] = _state_of(changes[run])
        specs[run] = model or model_for(sae)
        if state[run] == "none":  # to be evaluated: its hook, context and corpus checked before any model loads
            check_before_load(specs[run], sae.cfg.hook_name, cfg.context_size, sae.cfg.context_size, sae=sae)
            read = (specs[run], cfg.context_size or sae.cfg.context_size, int(sae.cfg.exclude_first),
                    sae.cfg.prepend_bos)
            if read not in corpus_read:  # runs of one cache read the same contexts: once, for every evaluation
                corpus_read[read] = check_eval_corpus_before_load(tokenizers[specs[run]], cfg, *read[1:])
            saes[run], contexts[run] = sae, corpus_read[read]
    other = [run for run in runs if state[run] == "other"]
    if other:
        raise RunExistsError(f"{', '.join(run.name for run in other)} in {folder} "
                             f"{'holds' if len(other) == 1 else 'hold'} an evaluation with other "
                             f"settings ({', '.join(changes[other[0]])}); pass --overwrite to replace them")
    for run, sae in saes.items():  # those to evaluate: said before any model loads, where evaluate says it
        _note_evaluated_again(run, sae, cfg, specs[run], model_dtype, hashes[run])
    if before_load is not None:
        before_load(settings)
    eval_texts = _sweep_eval_texts(folder, settings, cfg)
    models: dict[str, LanguageModel] = {}
    out: dict[str, Any] = {}
    for run in runs:
        if state[run] == "current":
            out[run.name] = "already evaluated"
            continue
        spec = specs[run]
        if spec not in models:
            models[spec] = load_model(spec, device=device, dtype=model_dtype, tokenizer=tokenizers.get(spec),
                                      progress=progress)
        if progress:
            print(f"[sweep eval] {run.name}", flush=True)
        m = evaluate_run(run, cfg, lm=models[spec], overwrite=True, progress=progress,  # not current: replaced
                         sae_hash=hashes[run], sae=saes.pop(run), contexts=contexts.pop(run),
                         eval_text=eval_texts[run])
        out[run.name] = {k: m[k] for k in ("nmse", "l0", "delta_ce") if k in m}
    return out


def _sweep_eval_texts(folder: str | Path, settings: dict[Path, SaeSettings], cfg: EvalConfig) -> dict[Path, str]:
    """Each run's :func:`held_out_label` of the eval corpus, its warning said once every run is checked and before
    any model loads, for runs reused too (each run's evaluation says it no more): one line naming the sweep where
    every run was trained on that text, as the CLI's note of another --model names it, else one for each that was."""
    corpus = str(resolve_corpus(cfg.corpus, "eval"))
    labels = {run: held_out_label(sae, corpus, source=None) for run, sae in settings.items()}
    trained_on = [run for run, label in labels.items() if label == TRAINING_TEXT]
    for source in [folder] if len(trained_on) == len(labels) else trained_on:
        warn_of_training_text(corpus, str(source))
    return labels


def paper_suite(source: str | Path, *, out_dir: str | Path | None = None, lm: LanguageModel | str | None = None,
                hook: str | None = None, eval_cfg: EvalConfig | None = None, cfg: PaperSuiteConfig | None = None,
                device: str | torch.device | None = None, model_dtype: str = "float32", allow_http: bool = False,
                overwrite: bool = False, progress: bool = True,
                before_load: Callable[[TopKSAE, str | None], None] | None = None) -> dict[str, Any]:
    """`saelab eval SAE --suite paper`: the suite into OUT/evals/ (OUT: the run folder, or ``out_dir``),
    OUT/evals/report.md, and the run's report.md. Returns the suite index with "report", the path of that
    report. Raises after writing when a metric failed. ``before_load``: called with the SAE (at ``hook``) and the
    hook it records once every check has passed, before the model loads (the CLI's notes of another hook or
    model)."""
    sae, run = open_sae(source, allow_http=allow_http)
    trained_at = sae.cfg.hook_name
    own_hook = not hook or hook == trained_at  # the hash covers the hook: another makes another SAE
    if hook:
        sae.cfg.hook_name = hook
    out = _suite_folder(out_dir, run)
    eval_cfg = eval_cfg or EvalConfig()
    _check_suite_inputs(sae, source, run, out, eval_cfg, cfg)
    spec = lm or model_for(sae, source)
    check_before_load(spec, sae.cfg.hook_name, eval_cfg.context_size, sae.cfg.context_size, sae=sae)
    cfg, T = cfg or PaperSuiteConfig(), eval_cfg.context_size or sae.cfg.context_size
    check_suite_applies(sae, model_name(spec), cfg, eval_cfg, T)
    # A hub model's tokenizer is fetched alone, so that a short corpus is refused before its weights download.
    tokenizer = None if isinstance(spec, LanguageModel) else tokenizer_before_load(spec)
    contexts = None if tokenizer is None else read_suite_contexts(  # a short corpus refused before the load
        sae, model_name(spec), cfg, eval_cfg, tokenizer, bos_token_id(tokenizer), T)
    # compute_equivalent's reference models to load, from their configs and tokenizers alone: refused here when
    # asked for by name, else its error, the other metrics running on
    dtype = loaded_dtype(spec, model_dtype)  # compute_equivalent's references
    refused = {} if contexts is None else check_series_before_load(sae, model_name(spec), cfg, eval_cfg, contexts,
                                                                 tokenizer, out, dtype)
    # Results it would replace, last: the SAE is hashed for it, once (the suite takes the hash)
    sae_hash = None if overwrite else check_results_before_load(sae, model_name(spec), cfg, eval_cfg, T, out, dtype)
    # Into a run folder: its lock, as evaluate_run holds it (a retraining meanwhile would mix two SAEs' files).
    lock = RunLock(run).acquire() if out is run else None
    try:
        # core's evaluation saved already (`saelab eval`, quickstart), read under the lock: taken, not measured again
        evaluated = None if overwrite or not _suite_runs(cfg, "core") else _evaluation_found(
            (out, run), sae, eval_cfg, spec, model_dtype, sae_hash)
        if before_load is not None:
            before_load(sae, trained_at)
        # the training text's warning beside those notes, before the load; the suite's records say it too
        eval_text = held_out_label(sae, str(resolve_corpus(eval_cfg.corpus, "eval"))) \
            if suite_reads_eval_text(sae, model_name(spec), cfg, eval_cfg, T) else None
        lm = load_model(spec, device=device, dtype=model_dtype, tokenizer=tokenizer, progress=progress)  # once
        sae = _beside_model(sae, lm, given=False)
        index = run_paper_suite(sae, out, lm=lm, source=str(source), eval_cfg=eval_cfg, cfg=cfg,
                                overwrite=overwrite, progress=progress, contexts=contexts, refused=refused,
                                sae_hash=sae_hash, eval_text=eval_text, evaluated=evaluated)
        write_paper_report(out)
        if out is run and (run / TRAIN_CONFIG).exists():  # with a link to evals/report.md
            # The suite hashed the run's SAE (unless --hook made it another): the report need not hash it again.
            write_run_report(run, sae_hash=index["sae"]["sha256"] if own_hook else None)
    finally:
        if lock is not None:
            lock.release()
    failed = {m: v["reason"] for m, v in index["metrics"].items() if v["status"] == "error"}
    if failed:
        raise SaelabError(f"paper suite wrote {out / EVALS_DIR / 'report.md'} but failed in {len(failed)} "
                          "metric(s): " + "; ".join(f"{m}: {r}" for m, r in failed.items()))
    return {**index, "report": str(out / EVALS_DIR / "report.md")}


def _evaluation_found(folders: Sequence[Path | None], sae: TopKSAE, cfg: EvalConfig, spec: LanguageModel | str,
                      model_dtype: str, sae_hash: str) -> EvaluationFound | None:
    """The evaluation in the first of ``folders`` whose metrics.json is of ``sae`` with these settings
    (:func:`evaluation_is_current`: the model ``spec`` in ``model_dtype``) and whose latent frequencies beside it
    are of that evaluation, for the paper suite's core to take; None where none is."""
    for folder in dict.fromkeys(f for f in folders if f is not None):
        if not evaluation_is_current(folder, sae, cfg, model=spec, model_dtype=model_dtype, sae_hash=sae_hash):
            continue
        metrics = read_eval_metrics(folder, sae_hash=sae_hash)
        try:
            saved = read_latent_frequencies(folder)
        except CheckpointError:  # damaged: core measures them again
            continue
        if saved is not None and not frequencies_mismatch(saved, folder, sae.n_latents, sae_hash,
                                                          eval_settings(metrics), weights=SAE_DIR,
                                                          evaluation=EVAL_METRICS):
            result = jsonable({k: v for k, v in metrics.items() if k not in EVALUATION_RECORDS})
            return EvaluationFound(folder / EVAL_METRICS, result, saved)
    return None


def _check_suite_inputs(sae: TopKSAE, source: str | Path, run: Path | None, out: Path | None, eval_cfg: EvalConfig,
                        cfg: PaperSuiteConfig | None) -> None:
    """What refuses the paper suite's inputs and output folder, before the model loads."""
    if out is None:
        raise ConfigError(f"--suite paper writes its results to a folder: pass --out DIR for {source}, which is "
                          "not a run folder")
    check_output_folder(out, "--out")
    another_run = run is None or out.resolve() != run.resolve()
    if another_run and (out / TRAIN_CONFIG).is_file():  # as `eval --out`: a run's evals/ are its own SAE's
        raise ConfigError(f"--out {out} is the run folder of another SAE; its evals/ describe that SAE: pick "
                          "another folder")
    check_sae_hook(sae, source)
    resolve_corpus(eval_cfg.corpus, "eval")
    if _suite_runs(cfg, "n2g"):  # latent ids the SAE lacks; more latents to draw than it has
        check_latents(cfg.n2g.latents, sae.n_latents, name="--n2g-latents")
        n = cfg.n2g.n_latents
        # The default (64) may exceed a small SAE: it then draws every latent that fires, as 0 does.
        if not cfg.n2g.latents and n > sae.n_latents and n != N2GConfig.n_latents:
            raise ConfigError(f"--n2g-n-latents {n}: the SAE has {sae.n_latents} {plural(sae.n_latents, 'latent')}; "
                              f"expected at most {sae.n_latents} (0: every latent that fires)")
    if _suite_runs(cfg, "compute_equivalent") and cfg.compute_equivalent.series:  # an unknown name
        resolve_series(cfg.compute_equivalent.series, cfg.compute_equivalent.steps)
    if _suite_runs(cfg, "ablation_sparsity"):
        _check_n_future(cfg.ablation_sparsity.n_future, eval_cfg.context_size or sae.cfg.context_size,
                        sae.cfg.exclude_first)


def _check_n_future(n_future: int, T: int | None, exclude_first: bool) -> None:
    """A --abl-n-future the contexts cannot hold, refused before the model loads; the default is not typed, and
    on short contexts the suite records the metric as skipped."""
    if T and n_future != AblationSparsityConfig.n_future and n_future > longest_n_future(T, int(exclude_first)):
        raise ConfigError(f"contexts of {T} tokens are too short for --abl-n-future {n_future}; expected at most "
                          f"{longest_n_future(T, int(exclude_first))}")


def _suite_runs(cfg: PaperSuiteConfig | None, metric: str) -> bool:
    """Whether settings given for ``metric`` (None: none given) are used: --metrics, if given, names it."""
    return cfg is not None and (not cfg.metrics or metric in cfg.metrics)


def _suite_folder(out_dir: str | Path | None, run: Path | None) -> Path | None:
    """The folder whose evals/ the paper suite writes: ``out_dir``, else the run folder. The run folder
    named as ``out_dir``, or its own evals/ folder, is the run folder (not RUN/evals/evals/)."""
    if out_dir is None:
        return run
    if run is not None and Path(out_dir).resolve() in (run.resolve(), (run / EVALS_DIR).resolve()):
        return run
    return Path(out_dir)


def finished_training(run_dir: Path, cfg: TrainConfig, cache: ActivationCache, *, record: dict | None = None,
                      load: bool = True) -> TopKSAE | bool | None:
    """The SAE of a finished run in ``run_dir`` trained with ``cfg`` on activations like ``cache``'s
    (same model, hook, corpus, context), else None. ``record``: :func:`_cache_record` of ``cache`` when
    the caller has it (it reads every shard's head); ``load=False``: True instead of the SAE."""
    if read_status(run_dir).get("state") != "finished" or not _same_training(run_dir, cfg, cache, record):
        return None
    return load_sae(run_dir / SAE_DIR) if load else True


def _same_training(run_dir: Path, cfg: TrainConfig, cache: ActivationCache, record: dict | None) -> bool:
    """Whether the run in ``run_dir``, finished or not, trains with ``cfg`` on activations like ``cache``'s."""
    if not (run_dir / TRAIN_CONFIG).exists():
        return False
    recorded = read_json(run_dir / TRAIN_CONFIG, "training config")
    same_data = all(recorded.get("sae", {}).get(k) == v for k, v in _cache_meta(cache).items()
                    if k not in ("model_source", CORPUS_FINGERPRINT, CORPUS_PATH))  # in the SAE's extra
    return same_data and not training_changes({"train": recorded.get("train"), "data": recorded.get("data")},
                                              {"train": cfg.to_dict(), "data": record or _cache_record(cache)})


def _check_finished_run_matches(run_dir: Path, cfg: TrainConfig, cache_kept: bool) -> None:
    """Refuse, before the harvest, a folder whose finished run was trained with other settings (the
    training would refuse it anyway, after the harvest's minutes). ``cache_kept``: the folder holds an activation
    cache, and no --overwrite-activations."""
    if read_status(run_dir).get("state") != "finished" or not (run_dir / TRAIN_CONFIG).exists():
        return
    recorded = {"train": read_json(run_dir / TRAIN_CONFIG, "training config").get("train")}
    changed = training_changes(recorded, {"train": cfg.to_dict()})
    if changed:
        raise RunExistsError(f"run folder {run_dir} holds a finished run trained with other settings ({', '.join(changed)}); "
                             "pick another --out, or pass --overwrite to train again"
                             f"{' (the activation cache is kept)' if cache_kept else ''}")


def _check_finished_evaluation_matches(run_dir: Path, cfg: EvalConfig, lm: LanguageModel | None,
                                       model_dtype: str) -> str | None:
    """Refuse, before any work, to replace a finished run's evaluation with one of other settings
    (as ``saelab eval`` refuses); ``lm``: the model given loaded (None: the SAE's, loaded in ``model_dtype``).
    Returns :func:`sae_sha256` of the finished run's SAE (None: no finished run, or no evaluation to check it
    against), for the rest of the call: hashing reads every weight, so a run without one is hashed only by the
    evaluation, after the checks that may refuse the call."""
    if read_status(run_dir).get("state") != "finished" or not (run_dir / SAE_DIR).is_dir() \
            or not (run_dir / EVAL_METRICS).exists():
        return None
    sae = load_sae(run_dir / SAE_DIR)
    sae_hash = sae_sha256(sae)
    changed = evaluation_changes(run_dir, sae, cfg, model=lm, model_dtype=model_dtype, sae_hash=sae_hash)
    if changed:
        raise RunExistsError(f"{run_dir / EVAL_METRICS} holds this run's evaluation with other settings "
                             f"({', '.join(changed)}); `saelab eval {run_dir} --overwrite` with the new settings "
                             "replaces it, --overwrite trains and evaluates again, or pick another --out")
    return sae_hash


@contextlib.contextmanager
def _naming_quickstart_cache(run_dir: Path):
    """The quickstart's activation cache of other settings is named, with the way out."""
    try:
        yield
    except ActivationCacheError as e:
        difference = re.search(f"({WRITTEN}|{NO_ROWS_STARTED}) (.*?)(?=; pass )", str(e))
        if difference is None:  # not a cache of other settings
            raise
        # an empty harvest's own words would repeat what this message says of it: its setting alone
        what, shown = (("an empty harvest started", difference[2]) if difference[1] == NO_ROWS_STARTED
                       else ("activations harvested", difference[0]))
        raise ActivationCacheError(f"{run_dir / ACTIVATIONS_DIR} holds {what} with other settings "
                                   f"({shown}); pass --overwrite-activations --overwrite to harvest and "
                                   "train again, or pick another --out") from e


def _quickstart_harvest(cfg: HarvestConfig, run_dir: Path, lm: LanguageModel, overwrite: bool,
                        progress: bool, texts: TextsReadOnce | None = None) -> ActivationCache:
    with _naming_quickstart_cache(run_dir):
        return harvest(cfg, run_dir / ACTIVATIONS_DIR, lm=lm, overwrite=overwrite, progress=progress,
                       overwrite_option="--overwrite-activations", texts=texts)


def _recorded_stage_seconds(run_dir: Path, key: str = "stage_seconds") -> dict[str, float] | None:
    """The stage times an earlier quickstart call recorded in metrics.json under ``key`` ({} when metrics.json is
    not readable, None when it has no such record)."""
    try:
        recorded = json.loads((run_dir / EVAL_METRICS).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, (int, float))} if isinstance(recorded, dict) else None


WORK_STAGES = ("harvest", "train", "evaluate")
"""The stages whose results a run folder keeps; a call that runs none of them did no work."""
SHARED_STAGES = ("check_inputs", "load_model")
"""Stages every call that does work repeats (a call that finds every stage done checks its inputs alone)."""
HARVEST_CALL_SECONDS = "harvest_call_seconds"
"""metrics.json's record of the SHARED_STAGES seconds of the calls behind the kept activation cache: an overwrite
that keeps the cache adds its own to these, not to those of the training and evaluation it replaces."""
EVALUATION_RECORDS = (MODEL_FINGERPRINT, "eval_text", "sae_sha256", "eval_config", "eval_as_read", "model_dtype",
                      "wall_seconds", "stage_seconds", HARVEST_CALL_SECONDS, "reused")
"""What metrics.json records beside the core metrics (:func:`evaluate`'s, then quickstart's): no part of the paper
suite's core result, whose envelope records the SAE, the settings and the weights."""


def _stage_seconds(run_dir: Path, earlier: dict[str, float], times: dict[str, float], reused: list[str],
                   trained_before: float, harvested: tuple[float | None, bool],
                   harvest_calls: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds each stage took, summed over the calls whose work the current results come from. A reused stage
    keeps its earlier record; a resumed training adds the earlier calls' training (``trained_before``) to this
    call's, as a resumed harvest adds the earlier calls' writing of the cache (``harvested``: :func:`cache_seconds`
    before this call), and an overwrite counts its own call alone. The input checks and the model load, which
    every working call repeats, add this call's to those of the earlier calls behind the results it keeps
    (:func:`_shared_seconds_kept`), and count this call's alone where it replaced them all. A call that found
    every stage done did none of the work: the record stays as it was. A stage with no earlier record (its call
    was interrupted later, so wrote none) is its own record's: the training loop's, the cache's writing; an
    interrupted call's checks and load are not known. ``times``: this call's seconds of the stages it ran (none of
    ``reused``); ``harvest_calls``: the checks and load of the calls behind the kept cache, as recorded."""
    if not any(stage in times for stage in WORK_STAGES):
        times = {}  # its checks are this call's wall time, no part of the results' making
    out = {stage: t for stage, t in earlier.items() if stage != "total" and stage not in times}
    kept = _shared_seconds_kept(earlier, times, reused, harvest_calls)
    for stage, t in times.items():
        out[stage] = round(t + (kept.get(stage, 0.0) if stage in SHARED_STAGES else 0.0), 1)
    if "train" in times:
        out["train"] = round(times["train"] + trained_before, 1)
    elif "train" in reused and "train" not in out:  # no earlier record: the training loop's own time
        out["train"] = round(recorded_train_seconds(read_status(run_dir)), 1)
    cache_s, finished = harvested
    if "harvest" in times and cache_s and not finished:
        out["harvest"] = round(times["harvest"] + cache_s, 1)
    elif "harvest" in reused and "harvest" not in out and cache_s is not None and finished:
        out["harvest"] = cache_s
    return {**out, "total": round(sum(out.values()), 1)}


def _shared_seconds_kept(earlier: dict[str, float], times: dict[str, float], reused: list[str],
                         harvest_calls: dict[str, float] | None) -> dict[str, float]:
    """The checks and load of the earlier calls behind the results a working call keeps: none where it harvests
    (it makes every result); those of the calls behind the cache where it trains (the training and evaluation
    recorded before are replaced, or never finished), else the earlier record's (its training kept too). A record
    of an earlier saelab keeps none apart for the cache: its whole record counts on, as it did then."""
    if "harvest" not in reused:
        return {}
    return harvest_calls if "train" in times and harvest_calls is not None else earlier


def _harvest_call_seconds(times: dict[str, float], reused: list[str], earlier: dict[str, float],
                          harvest_calls: dict[str, float] | None) -> dict[str, float] | None:
    """The checks and load of the calls behind the kept cache, for the next call's :func:`_stage_seconds`: this
    call's where it harvested, else as recorded (none where no call recorded any; None: an earlier saelab's record,
    which kept them in its whole record alone)."""
    if "harvest" in times:
        return {stage: times[stage] for stage in SHARED_STAGES if stage in times}
    return {} if harvest_calls is None and not earlier else harvest_calls


def cache_seconds(cache: Path) -> tuple[float | None, bool]:
    """The seconds an activation cache's writing took so far, every call counted (its manifest's; None where it
    records none: an earlier saelab's), and whether it is finished."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, False
    if not isinstance(manifest, dict):
        return None, False
    seconds = manifest.get("seconds")
    return (float(seconds) if isinstance(seconds, (int, float)) else None), manifest.get("complete") is True


def _timed(times: dict[str, float], name: str, fn):
    t = time.perf_counter()
    out = fn()
    times[name] = round(time.perf_counter() - t, 1)
    return out


def _check_quickstart_inputs(cfg: QuickstartConfig, harvest_cfg: HarvestConfig, run_dir: Path,
                             lm: LanguageModel | None, *, model_dtype: str, overwrite: bool, overwrite_activations: bool,
                             log_to: Sequence[str]) -> str | None:
    """Everything that refuses a quickstart, checked before the model loads: its output folder and
    loggers, earlier results of other settings, both corpora, the hook and both context sizes. Returns
    :func:`sae_sha256` of the finished run's SAE it checked (None: none, or ``overwrite``)."""
    check_output_folder(run_dir, "--out", "run")
    check_log_targets(log_to)
    check_warmup(cfg.train)  # quickstart harvests every training token: its steps are known now
    settle_before_reading(run_dir)  # an overwrite killed mid-way: the checks below read the run it set aside
    corpus = resolve_corpus(harvest_cfg.corpus, "train")
    resolve_corpus(cfg.eval.corpus, "eval")
    # A cache of other settings first: its refusal names both options that replace it and the run trained
    # on it, where the run's would send the user to --overwrite alone, refused next for the cache.
    if not overwrite_activations:
        with _naming_quickstart_cache(run_dir):
            meta = _as_cache_records(_harvest_meta(harvest_cfg, corpus), run_dir / ACTIVATIONS_DIR, corpus,
                                     "--overwrite-activations")
            _reusable_harvest(run_dir / ACTIVATIONS_DIR, meta, harvest_cfg.dtype, "--overwrite-activations")
    finished_hash = None
    if not overwrite:
        _check_finished_run_matches(run_dir, cfg.train, cache_kept=not overwrite_activations and
                                    holds_an_activation_cache(run_dir / ACTIVATIONS_DIR))
        finished_hash = _check_finished_evaluation_matches(run_dir, cfg.eval, lm, model_dtype)
    spec = lm or harvest_cfg.model
    check_before_load(spec, harvest_cfg.hook)
    check_context_fits(spec, harvest_cfg.context_size, "harvest.context_size {n}")
    if cfg.eval.context_size:  # the evaluation's, else refused only after the harvest and the training
        check_context_fits(spec, cfg.eval.context_size, "eval.context_size {n}")
    return finished_hash


def _check_corpora_are_long_enough(cfg: QuickstartConfig, harvest_cfg: HarvestConfig, run_dir: Path, tokenizer,
                                   overwrite_activations: bool) -> tuple[TextsReadOnce | None, torch.Tensor | None]:
    """A training corpus still to harvest too short for one context, or the eval corpus too short for the
    evaluation: refused before the model loads, not after a harvest and a training. The SAE evaluates at the
    harvest's context size unless eval.context_size is given; either way, that is the setting that shrinks the
    evaluation's contexts. Returns the training corpus's stream (None: no harvest to do), for the harvest to
    go on reading, and the eval contexts read (None: none were), for the evaluation. ``tokenizer``: the model's,
    from :func:`tokenizer_before_load` (None: the checks wait for the load)."""
    texts = None
    if overwrite_activations or not cache_is_complete(run_dir / ACTIVATIONS_DIR):
        corpus = resolve_corpus(harvest_cfg.corpus, "train")
        texts = TextsReadOnce(corpus)
        check_corpus_fills_a_context(tokenizer, corpus, harvest_cfg.context_size, harvest_cfg.prepend_bos,
                                     "harvest.context_size", texts)
    return texts, check_eval_corpus_before_load(tokenizer, cfg.eval, cfg.eval.context_size or harvest_cfg.context_size,
                                                int(harvest_cfg.exclude_first), harvest_cfg.prepend_bos)


def _finished_quickstart(cfg: QuickstartConfig, harvest_cfg: HarvestConfig, run_dir: Path,
                         lm: LanguageModel | None, model_dtype: str,
                         finished_hash: str | None) -> dict[str, Any] | None:
    """The run's metrics when its harvest, training and evaluation are all done with these settings.
    ``finished_hash``: :func:`sae_sha256` of the finished run's SAE, as the checks returned it."""
    corpus = resolve_corpus(harvest_cfg.corpus, "train")
    meta = _as_cache_records(_harvest_meta(harvest_cfg, corpus), run_dir / ACTIVATIONS_DIR, corpus,
                             "--overwrite-activations")
    cache = _reusable_harvest(run_dir / ACTIVATIONS_DIR, meta, harvest_cfg.dtype, "--overwrite-activations")
    sae = None if cache is None else finished_training(run_dir, cfg.train, cache)
    if sae is None or not evaluation_is_current(run_dir, sae, cfg.eval, model=lm or harvest_cfg.model,
                                                model_dtype=model_dtype, sae_hash=finished_hash):
        return None
    return read_eval_metrics(run_dir, sae, sae_hash=finished_hash)


def _quickstart_stages(cfg: QuickstartConfig, harvest_cfg: HarvestConfig, run_dir: Path, lm: LanguageModel | None,
                       times: dict[str, float], *, device: str | torch.device | None, model_dtype: str,
                       overwrite: bool, overwrite_activations: bool, progress: bool, log_to: Sequence[str],
                       finished_hash: str | None, train_texts: TextsReadOnce | None,
                       eval_contexts: DrawnContexts | None, tokenizer) -> tuple[dict[str, Any], list[str]]:
    """Load the model, then harvest, train and evaluate, each stage reused when done with these settings;
    returns the metrics and the stages reused (``times`` gets the others' seconds). ``finished_hash``,
    ``train_texts``, ``eval_contexts``, ``tokenizer``: :func:`sae_sha256` of the finished run's SAE, the training
    corpus's stream, the eval contexts and the model's tokenizer, as the checks returned or read them."""
    lm = _timed(times, "load_model", lambda: load_model(lm or harvest_cfg.model, device=device, dtype=model_dtype,
                                                        tokenizer=tokenizer, progress=progress))
    reused = ["harvest"] if not overwrite_activations and cache_is_complete(run_dir / ACTIVATIONS_DIR) else []
    cache = _timed(times, "harvest", lambda: _quickstart_harvest(harvest_cfg, run_dir, lm, overwrite_activations,
                                                                 progress, train_texts))
    sae = None if overwrite else finished_training(run_dir, cfg.train, cache)
    reused += ["train"] if sae is not None else []
    if sae is None:
        sae = _timed(times, "train", lambda: train_from_cache(cache, run_dir, cfg.train, device=device,
                                                              overwrite=overwrite, progress=progress,
                                                              log_to=log_to))
        finished_hash = None  # the SAE just trained
    sae_hash = finished_hash or sae_sha256(sae)  # once, for the check and the evaluation: it reads every weight
    if evaluation_is_current(run_dir, sae, cfg.eval, model=lm, model_dtype=model_dtype, sae_hash=sae_hash):
        reused.append("evaluate")
        return read_eval_metrics(run_dir, sae, sae_hash=sae_hash), reused
    return _timed(times, "evaluate", lambda: evaluate(sae, lm=lm, cfg=cfg.eval, out_dir=run_dir, progress=progress,
                                                      sae_hash=sae_hash, contexts=eval_contexts)), reused


def quickstart(cfg: QuickstartConfig, run_dir: str | Path, *, lm: LanguageModel | None = None,
               device: str | torch.device | None = None, model_dtype: str = "float32", overwrite: bool = False,
               overwrite_activations: bool = False, progress: bool = True,
               log_to: Sequence[str] = ()) -> dict[str, Any]:
    """Harvest -> train -> evaluate -> report.md in one run folder. Every stage resumes: a finished
    harvest, training or evaluation with the same settings is reused. ``overwrite`` replaces the
    training and evaluation (the activation cache stays unless ``overwrite_activations``).

    ``lm``: the already-loaded model that ``cfg.harvest.model`` names (it is then not loaded again).
    """
    # check_inputs: everything before the model's load, the check whether every stage is done included
    started = time.perf_counter()
    run_dir = Path(run_dir)
    harvest_cfg = replace(cfg.harvest, n_tokens=max(cfg.harvest.n_tokens, cfg.train.total_tokens))
    finished_hash = _check_quickstart_inputs(cfg, harvest_cfg, run_dir, lm, model_dtype=model_dtype,
                                             overwrite=overwrite, overwrite_activations=overwrite_activations,
                                             log_to=log_to)
    times: dict[str, float] = {}
    earlier = _recorded_stage_seconds(run_dir) or {}
    harvest_calls = _recorded_stage_seconds(run_dir, HARVEST_CALL_SECONDS)
    # as the training's, the harvest's earlier calls: a cache overwritten now counts this call's alone
    harvested = (None, False) if overwrite_activations else cache_seconds(run_dir / ACTIVATIONS_DIR)
    status = read_status(run_dir)  # an unfinished training resumed now: its earlier calls' seconds
    trained_before = 0.0 if overwrite or status.get("state") == "finished" else recorded_train_seconds(status)
    done = None if overwrite or overwrite_activations else _finished_quickstart(cfg, harvest_cfg, run_dir, lm,
                                                                               model_dtype, finished_hash)
    if done is not None:  # every stage done with these settings: the model is not even loaded
        note_unfinished_overwrite(run_dir / ACTIVATIONS_DIR, "--overwrite-activations")
        times["check_inputs"] = round(time.perf_counter() - started, 1)
        return _write_quickstart_results(run_dir, done, list(WORK_STAGES), times,
                                         (earlier, harvest_calls), trained_before, harvested)
    # A hub model's tokenizer is fetched alone: a short corpus is refused before its weights download.
    # Timed with the checks: it tokenizes the eval pool, seconds the other stages would not show.
    tokenizer = tokenizer_before_load(lm or harvest_cfg.model)
    train_texts, eval_contexts = _check_corpora_are_long_enough(cfg, harvest_cfg, run_dir, tokenizer,
                                                                overwrite_activations)
    times["check_inputs"] = round(time.perf_counter() - started, 1)
    if overwrite and (run_dir / TRAIN_CONFIG).exists():
        print(f"--overwrite: replacing the training and evaluation in {run_dir} (activation cache kept)",
              file=sys.stderr)
    # The earlier training and evaluation stay readable until this call's report is written.
    with replacing_run(run_dir) if overwrite else contextlib.nullcontext():
        metrics, reused = _quickstart_stages(cfg, harvest_cfg, run_dir, lm, times, device=device,
                                             model_dtype=model_dtype, overwrite=overwrite,
                                             overwrite_activations=overwrite_activations, progress=progress,
                                             log_to=log_to, finished_hash=finished_hash, train_texts=train_texts,
                                             eval_contexts=eval_contexts, tokenizer=tokenizer)
        return _write_quickstart_results(run_dir, metrics, reused, times, (earlier, harvest_calls), trained_before,
                                         harvested)


def _write_quickstart_results(run_dir: Path, metrics: dict[str, Any], reused: list[str], times: dict[str, float],
                              recorded: tuple[dict[str, float], dict[str, float] | None], trained_before: float,
                              harvested: tuple[float | None, bool]) -> dict[str, Any]:
    """metrics.json with the stage times, and report.md. ``recorded``: the earlier call's stage_seconds and
    harvest_call_seconds."""
    earlier, harvest_calls = recorded
    # This invocation's wall times; stages whose earlier result was reused are listed, not timed.
    times = {stage: t for stage, t in times.items() if stage not in reused}
    metrics["wall_seconds"] = {**times, "total": round(sum(times.values()), 1)}
    metrics["stage_seconds"] = _stage_seconds(run_dir, earlier, times, reused, trained_before, harvested,
                                              harvest_calls)
    harvest_calls = _harvest_call_seconds(times, reused, earlier, harvest_calls)
    if harvest_calls is not None:
        metrics[HARVEST_CALL_SECONDS] = harvest_calls
    metrics["reused"] = reused
    write_json(run_dir / EVAL_METRICS, jsonable(metrics))  # an earlier saelab's file may hold NaN
    # The run's SAE, hashed when these metrics were measured or checked against it: not hashed again.
    write_run_report(run_dir, density_drawn_by=None if "evaluate" in reused else metrics,
                     sae_hash=metrics.get("sae_sha256"))
    return metrics


def load_run(run_dir: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """The trained SAE of a run folder and its evaluation metrics (empty if none describe this SAE)."""
    sae = load_sae(Path(run_dir) / SAE_DIR)
    return sae, read_eval_metrics(run_dir, sae)


__all__ = ["DEFAULT_HOOK", "EvalConfig", "HarvestConfig", "PaperSuiteConfig", "QuickstartConfig", "eval_settings",
           "earlier_evaluation", "evaluate", "evaluate_run", "evaluate_sweep", "evaluation_changes",
           "evaluation_is_current",
           "finished_training", "harvest", "is_run", "load_run", "notes_before_load", "paper_suite", "quickstart",
           "read_metrics", "sweep_configs", "sweep_from_cache", "train_from_cache"]
