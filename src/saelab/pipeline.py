"""The main jobs, each a public function the CLI wraps: harvest, train, evaluate, quickstart.

A run folder holds everything about one SAE::

    run/
      activations/        on-disk activation cache (shared by several SAEs if you like)
      train_config.json   checkpoint.pt   metrics.jsonl   status.json
      sae/                the trained SAE (SAELens folder format)
      metrics.json        evaluation on held-out text
      training_curves.png density.png     report.md
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.data import ActivationCache, ActivationStream, default_corpus, pack_contexts, sample_contexts
from saelab.data import token_contexts
from saelab.data import iter_texts, write_activation_cache
from saelab.errors import CorpusError, NonFiniteError
from saelab.evals.downstream import downstream_metrics
from saelab.evals.reconstruction import reconstruction_metrics
from saelab.models import LanguageModel, load_model
from saelab.sae import TopKSAE, load_sae
from saelab.train import TrainConfig, train_sae
from saelab.train.checkpoint import SAE_DIR, read_metrics
from saelab.utils.atomic import write_json

DEFAULT_HOOK = "blocks.9.hook_resid_post"


@dataclass
class HarvestConfig:
    """Where activations come from."""

    model: str = "default"
    """Language model: 'default' (SmolLM2-135M-Instruct, offline), a hub id such as 'gpt2', a local
    model folder or a .gguf file."""
    hook: str = DEFAULT_HOOK
    """TransformerLens-style hook name, e.g. blocks.9.hook_resid_post."""
    corpus: str | None = None
    """Training text: a .txt/.jsonl/.jsonl.xz file, a folder of .txt, or a HF dataset name
    (e.g. 'Skylion007/openwebtext'). None: the offline Wikipedia corpus when present."""
    n_tokens: int = 1_048_576
    """Activation rows to harvest."""
    context_size: int = 64
    """Tokens per context (64 as in the paper)."""
    prepend_bos: bool = True
    """Start every context with BOS."""
    exclude_first: bool = True
    """Leave position 0 (BOS, the attention sink) out of the activations."""
    lm_batch_size: int = 32
    """Contexts per LM forward."""
    dtype: str = "float16"
    """Storage dtype of the activation cache: float16, bfloat16 or float32."""
    buffer_tokens: int = 262_144
    """Shuffle buffer (rows) between the LM and the cache."""
    sample_pool_tokens: int = 16_777_216
    """Contexts are drawn at random from the first this-many corpus tokens (at least n_tokens),
    so that a harvest smaller than the corpus spans many documents instead of its first few;
    0: contexts in corpus order."""
    seed: int = 0
    """Seed of the context draw and the shuffle."""


@dataclass
class EvalConfig:
    """How to evaluate an SAE on held-out text."""

    corpus: str | None = None
    """Held-out text; None: the offline Wikipedia eval split when present."""
    recon_tokens: int = 32_768
    """Tokens for nMSE, L0 and dead/dense latents."""
    downstream_tokens: int = 16_384
    """Tokens for delta CE, KL and CE recovered (4 LM forwards each)."""
    context_size: int | None = None
    """Context length; None: the SAE's training context size."""
    lm_batch_size: int = 8
    """Contexts per LM forward in the downstream evaluation."""
    ablations: tuple[str, ...] = ("zero", "mean")
    """Baselines for CE recovered."""


def _resolve_corpus(corpus: str | None, split: str) -> str:
    if corpus:
        return corpus
    found = default_corpus(split)
    if found is None:
        raise CorpusError(
            f"no corpus given and the offline default (wiki-en/wiki_{split}.jsonl.xz) was not found; "
            "pass --corpus PATH or a Hugging Face dataset name"
        )
    return found


def _load_lm(model: str | LanguageModel) -> LanguageModel:
    return model if isinstance(model, LanguageModel) else load_model(model)


def harvest(cfg: HarvestConfig, out_dir: str | Path, *, lm: LanguageModel | None = None,
            overwrite: bool = False, progress: bool = True) -> ActivationCache:
    """Harvest activations into an on-disk cache; an interrupted harvest resumes where it stopped."""
    lm = lm or _load_lm(cfg.model)
    lm.check_hook(cfg.hook)
    corpus = _resolve_corpus(cfg.corpus, "train")
    contexts = pack_contexts(iter_texts(corpus), lm.tokenize, cfg.context_size, bos_token_id=lm.bos_token_id,
                             prepend_bos=cfg.prepend_bos)
    first = next(contexts, None)  # an empty corpus raises here; a too-short one gives no context
    if first is None:
        raise CorpusError(f"corpus {corpus!r} is too short: it does not fill one context of "
                          f"{cfg.context_size} tokens; expected at least that much text")
    contexts = itertools.chain([first], contexts)
    if cfg.sample_pool_tokens > 0:
        per_context = cfg.context_size - (1 if cfg.exclude_first else 0)
        contexts = sample_contexts(contexts, -(-cfg.n_tokens // per_context),
                                   cfg.sample_pool_tokens // cfg.context_size, seed=cfg.seed)
    stream = ActivationStream(lm, cfg.hook, contexts, batch_size=4096, lm_batch_size=cfg.lm_batch_size,
                              exclude_first=cfg.exclude_first, buffer_tokens=cfg.buffer_tokens, seed=cfg.seed,
                              max_tokens=cfg.n_tokens, drop_last=False, progress=progress)
    meta = {"model_name": cfg.model if isinstance(cfg.model, str) else lm.name, "hook_name": cfg.hook,
            "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
            "exclude_first": cfg.exclude_first, "dataset": corpus, "harvest": asdict(cfg)}
    return write_activation_cache(stream, out_dir, meta=meta, dtype=cfg.dtype, resume=not overwrite,
                                  overwrite=overwrite, progress=progress)


def train_from_cache(cache: str | Path | ActivationCache, run_dir: str | Path, cfg: TrainConfig, *,
                     overwrite: bool = False, progress: bool = True) -> TopKSAE:
    """Train one SAE on an activation cache (resumes an interrupted run in the same folder)."""
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    if cache.n_rows < cfg.total_tokens:
        raise CorpusError(f"activation cache {cache.folder} holds {cache.n_rows:,} rows but training asks for "
                          f"total_tokens={cfg.total_tokens:,}; harvest more or train on fewer tokens")
    return train_sae(cfg, _cache_batches(cache, cfg), run_dir, d_in=cache.d, meta=_cache_meta(cache),
                     overwrite=overwrite, progress=progress)


def sweep_configs(base: TrainConfig, grid: dict[str, list[Any]]) -> dict[str, TrainConfig]:
    """Every combination of the grid's values over ``base``, keyed by a folder name like n4096_k32."""
    import itertools
    from dataclasses import replace

    short = {"n_latents": "n", "k": "k", "lr": "lr", "k_aux": "kaux", "total_tokens": "tok"}
    keys = list(grid)
    out = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = replace(base, **dict(zip(keys, values)))
        name = "_".join(f"{short.get(k, k)}{v:g}" if isinstance(v, float) else f"{short.get(k, k)}{v}"
                        for k, v in zip(keys, values)) or "base"
        out[name] = cfg
    return out


def sweep_from_cache(cache: str | Path | ActivationCache, out_dir: str | Path, base: TrainConfig,
                     grid: dict[str, list[Any]], *, overwrite: bool = False, progress: bool = True
                     ) -> dict[str, TopKSAE]:
    """Train every SAE of a grid from ONE pass over an activation cache, each in out_dir/<name>/."""
    from saelab.train import train_many

    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    configs = sweep_configs(base, grid)
    need = max(c.total_tokens for c in configs.values())
    if cache.n_rows < need:
        raise CorpusError(f"activation cache {cache.folder} holds {cache.n_rows:,} rows; the sweep needs {need:,}")
    out_dir = Path(out_dir)
    saes = train_many(list(configs.values()), _cache_batches(cache, base), [out_dir / n for n in configs],
                      d_in=cache.d, meta=_cache_meta(cache), overwrite=overwrite, progress=progress)
    return dict(zip(configs, saes))


def _cache_meta(cache: ActivationCache) -> dict[str, Any]:
    keys = ("model_name", "hook_name", "context_size", "prepend_bos", "exclude_first", "dataset")
    return {k: cache.meta[k] for k in keys if k in cache.meta}


def _cache_batches(cache: ActivationCache, cfg: TrainConfig):
    def batches_from(start_batch: int):
        return cache.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, start_batch=start_batch)
    return batches_from


def evaluate(sae: TopKSAE | str | Path, *, lm: LanguageModel | str | None = None, cfg: EvalConfig | None = None,
             out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Core metrics of an SAE on held-out text; writes metrics.json (and density.png) to out_dir."""
    cfg = cfg or EvalConfig()
    sae = sae if isinstance(sae, TopKSAE) else load_sae(sae)
    lm = _load_lm(lm or sae.cfg.model_name or "default")
    hook = lm.check_hook(sae.cfg.hook_name)
    sae.check_input(torch.empty(0, lm.hook_width(hook)), name=f"activations at {hook} of {lm.name}")
    corpus = _resolve_corpus(cfg.corpus, "eval")
    T = cfg.context_size or sae.cfg.context_size
    n_needed = max(cfg.recon_tokens, cfg.downstream_tokens)
    first = 1 if sae.cfg.exclude_first else 0
    tokens = token_contexts(corpus, lm.tokenize, T, n_contexts=-(-n_needed // (T - first)),
                            bos_token_id=lm.bos_token_id, prepend_bos=sae.cfg.prepend_bos)

    t0 = time.perf_counter()
    sae.eval()
    with torch.no_grad():
        acts = [lm.activations(tokens[i:i + 32], hook)[:, first:].reshape(-1, lm.hook_width(hook))
                for i in range(0, tokens.shape[0], 32)]
    acts_ND = torch.cat(acts)[:cfg.recon_tokens]
    if not torch.isfinite(acts_ND).all():
        raise NonFiniteError(f"activations at {hook} of model {lm.name} on eval corpus {corpus!r} contain NaN or "
                             "inf; expected finite activations (is the model broken, or overflowing its dtype?)")
    recon, freq = reconstruction_metrics(sae, acts_ND.split(4096), progress=progress)
    t_recon = time.perf_counter() - t0
    n_ctx = -(-cfg.downstream_tokens // (T - first))
    down = downstream_metrics(lm, sae, tokens[:n_ctx], hook=hook, lm_batch_size=cfg.lm_batch_size,
                              mean_act_D=acts_ND.mean(dim=0), ablations=cfg.ablations, progress=progress)
    result = {**recon.to_dict(), **down, "model": lm.name, "hook": hook, "eval_corpus": str(corpus),
              "context_size": T, "position_0": "excluded" if first else "included",
              "seconds": {"reconstruction": round(t_recon, 2), "downstream": round(time.perf_counter() - t0 - t_recon, 2)}}
    if out_dir is not None:
        from saelab.report.plots import density_histogram

        out_dir = Path(out_dir)
        write_json(out_dir / "metrics.json", result)
        density_histogram(freq, out_dir / "density.png", recon.n_tokens)
    return result


@dataclass
class QuickstartConfig:
    """The main job: harvest, train, evaluate and report on the offline default."""

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(n_latents=8192, k=32, total_tokens=1_048_576))
    eval: EvalConfig = field(default_factory=EvalConfig)


def quickstart(cfg: QuickstartConfig, run_dir: str | Path, *, lm: LanguageModel | None = None,
               overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Harvest -> train -> evaluate -> report.md, each stage resumable, in one run folder.

    ``lm``: the already-loaded model that ``cfg.harvest.model`` names (it is then not loaded again).
    """
    from saelab.report.markdown import write_run_report

    run_dir = Path(run_dir)
    times: dict[str, float] = {}
    t = time.perf_counter()
    lm = lm or _load_lm(cfg.harvest.model)
    times["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    cfg.harvest.n_tokens = max(cfg.harvest.n_tokens, cfg.train.total_tokens)
    cache = harvest(cfg.harvest, run_dir / "activations", lm=lm, overwrite=overwrite, progress=progress)
    times["harvest"] = time.perf_counter() - t
    t = time.perf_counter()
    sae = train_from_cache(cache, run_dir, cfg.train, overwrite=overwrite, progress=progress)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = evaluate(sae, lm=lm, cfg=cfg.eval, out_dir=run_dir, progress=progress)
    times["evaluate"] = time.perf_counter() - t
    metrics["wall_seconds"] = {k: round(v, 1) for k, v in times.items()} | {"total": round(sum(times.values()), 1)}
    write_json(run_dir / "metrics.json", metrics)
    write_run_report(run_dir)
    return metrics


def load_run(run_dir: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """The trained SAE of a run folder and its evaluation metrics (empty if not evaluated)."""
    run_dir = Path(run_dir)
    sae = load_sae(run_dir / SAE_DIR)
    path = run_dir / "metrics.json"
    return sae, (json.loads(path.read_text()) if path.exists() else {})


__all__ = ["DEFAULT_HOOK", "EvalConfig", "HarvestConfig", "QuickstartConfig", "evaluate", "harvest", "load_run",
           "quickstart", "read_metrics", "sweep_configs", "sweep_from_cache", "train_from_cache"]
