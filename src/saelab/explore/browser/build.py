"""One pass over text that gathers everything the feature browser shows, for one or several SAEs.

Definitions (the browser's pages and ``site.json`` use exactly these):

- **Tokens scored**: ``n_contexts`` contexts of ``context_size`` tokens packed from the corpus as
  everywhere in saelab (BOS first), drawn at random (seed 0) from its first ``sample_pool_tokens`` tokens by the
  draw the evaluations read theirs with (:func:`saelab.data.draw_contexts`: the same corpus, pool and context
  size give the contexts ``saelab eval`` reads first), so that they come from many documents and not the
  first few (0: the first contexts, in order); position 0 is left out when the SAE was trained without it
  (``cfg.exclude_first``), so ``n_tokens = n_contexts * (context_size - 1)`` then. Each SAE is
  scored from its own first position, whichever SAEs are browsed with it. ``n_contexts`` is
  ``BrowseConfig.n_tokens`` rounded up to whole contexts of the SAE that scores fewest per context.
- **Context number**: a context's place in the corpus's stream of contexts (0: the first packed from its start;
  ``DrawnContexts.index``), the number a site's pages record each example by and ``saelab top`` shows; read in
  order, it is the context's row among those read.
- **Active**: a latent is active at a token when its TopK+ReLU value there is > 0.
- **Density** = active tokens / tokens scored. **Max activation** = the largest value over the
  tokens scored. **Mean activation** = the mean value over the tokens where it is active.
- **Top contexts**: the ``n_top`` contexts with the largest per-context maximum of the latent
  (one entry per context; ties go to the earlier context), shown as a window of tokens around
  the first position reaching that maximum.
- **Quantile samples**: a uniform random sample without replacement of ``n_samples`` contexts in
  which the latent is active (keys from :func:`~.stats.sample_keys`), sorted by their maximum and
  cut into ``n_bands`` groups of (nearly) equal size: band 1 holds the lowest quarter of the
  sampled context maxima (for 4 bands), band 4 the highest. So the bands sample the quantiles of
  the per-context maximum of the latent over the contexts where it fires.
- **Histogram**: counts of the latent's nonzero values over all tokens scored, in ``n_bins``
  equal bins over ``[0, 2^e)`` with ``2^e`` the smallest power of two above the max activation
  (exact, see :class:`~.stats.DoublingHistogram`).
- **Direct logit effect**: ``W_U (g * W_dec[i])`` for every vocabulary token, where ``g`` is the
  final norm's weight (LayerNorm centring applied too; the data-dependent ``1/rms`` scale and the
  bias are not), i.e. :func:`saelab.explore.attribution.unembed_direction`: the logit change per
  unit of the latent along the direct path, skipping the layers after the hook. The ``n_logits``
  largest are "promoted", the ``n_logits`` smallest "suppressed".
- **Nearest latents**: the ``n_neighbours`` other latents of the same SAE with the largest
  cosine between decoder rows.
- **Explanation**: an N2G explanation (see :mod:`saelab.evals.n2g`) from the file named by
  ``n2g_file`` (the paper suite's or a ``run_n2g`` result, default the run's ``evals/n2g.json``) or built here for
  ``n2g_n_latents`` latents from their top contexts; absent otherwise.

Several SAEs read the same LM forward (they must share model, hook and width); feature families
across their sizes come from the same pass (:mod:`.families`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from saelab.data import DrawnContexts
from saelab.errors import CheckpointError, ConfigError, CorpusError, ShapeMismatchError
from saelab.evals.config import N2GConfig
from saelab.evals.n2g import checked_per_latent, load_result, padding_id, read_result_json
from saelab.explore.browser.stats import (
    DoublingHistogram,
    FiringCounts,
    RunningTopK,
    active_entries,
    context_maxima,
    context_rows,
    sample_keys,
)
from saelab.explore.config import BrowseConfig
from saelab.sae.topk import TopKSAE
from saelab.utils.words import plural


# ---- inputs ----------------------------------------------------------------------------------------------


@dataclass
class SAESource:
    """One SAE to browse: where it came from and the short name its pages live under."""

    name: str
    source: str
    sae: TopKSAE
    run_dir: Path | None = None
    """The run folder, when the source was one (N2G results may live there)."""


def open_sae_source(source: str | Path, name: str | None = None, *, several: bool = False,
                    allow_http: bool = False) -> SAESource:
    """Load a run folder (``RUN/sae``), a SAELens or sparsify folder, an OpenAI ``.pt`` file or URL;
    ``several`` and ``allow_http``: as in :func:`saelab.run_folder.open_sae`."""
    from saelab.run_folder import open_sae

    sae, run_dir = open_sae(source, several=several, allow_http=allow_http)
    path = Path(str(source)).expanduser()
    stem = path.name if run_dir is not None else (path.stem if path.suffix == ".pt" else path.name)
    return SAESource(name or stem or "sae", str(source), sae, run_dir=run_dir)


def name_apart(sources: Sequence[SAESource]) -> None:
    """Name SAEs that share a folder's name by the nearest parent folders where their paths differ, in place:
    run1/sae and run2/sae become run1-sae and run2-sae (a name is the folder of an SAE's pages, one SAE's
    would overwrite the other's). Names that no other SAE has stay as they are; the same path given twice
    keeps its name, for :func:`check_compatible` to refuse."""
    groups: dict[str, list[SAESource]] = {}
    for s in sources:
        groups.setdefault(s.name, []).append(s)
    for same in (g for g in groups.values() if len(g) > 1):
        for s, prefix in zip(same, _differing_parents([_folders_above(s.source) for s in same])):
            s.name = f"{prefix}-{s.name}" if prefix else s.name


def _folders_above(source: str) -> list[str]:
    """The names of the folders above an SAE's file or folder, nearest first (of a URL: its path's)."""
    path = Path(source) if "://" in source else Path(os.path.abspath(Path(source).expanduser()))
    return [p.name for p in path.parents]


def _differing_parents(chains: list[list[str]]) -> list[str]:
    """For each chain of folder names (nearest first), the names at the levels where the chains differ, up to
    the nearest level that tells them all apart, outermost first and joined by '-'; '' for all when none does."""
    depth = max(map(len, chains))
    chains = [c + [""] * (depth - len(c)) for c in chains]
    for d in range(1, depth + 1):
        if len({tuple(c[:d]) for c in chains}) == len(chains):
            differ = [i for i in range(d) if len({c[i] for c in chains}) > 1]
            return ["-".join(c[i] for i in reversed(differ) if c[i]) for c in chains]
    return [""] * len(chains)


def check_compatible(sources: Sequence[SAESource], hook: str | None = None, model: str | None = None) -> str:
    """The shared hook of several SAEs; refuses SAEs on different hooks, widths or models.

    ``hook`` / ``model`` given by the user override what the SAE configs say (the model check is then skipped).
    """
    if not sources:
        raise ConfigError("no SAE given")
    first = sources[0]
    hooks = {s.name: hook or s.sae.cfg.hook_name for s in sources}
    for s in sources:
        if not hooks[s.name]:
            raise CheckpointError(f"SAE {s.source} has no hook name in its config; pass --hook")
        if hooks[s.name] != hooks[first.name]:
            raise ShapeMismatchError(f"SAEs read different hooks: {s.source} reads {hooks[s.name]!r}, "
                                     f"{first.source} reads {hooks[first.name]!r}; families and one-pass "
                                     "browsing need SAEs on the same hook")
        if s.sae.cfg.d_in != first.sae.cfg.d_in:
            raise ShapeMismatchError(f"SAEs have different widths: {s.source} has d_in={s.sae.cfg.d_in}, "
                                     f"{first.source} has d_in={first.sae.cfg.d_in}")
        if (s.sae.cfg.model_name and first.sae.cfg.model_name and not model
                and s.sae.cfg.model_name != first.sae.cfg.model_name):
            raise ShapeMismatchError(f"SAEs come from different models: {s.source} ({s.sae.cfg.model_name}) and "
                                     f"{first.source} ({first.sae.cfg.model_name}); pass --model to use one model for all")
    seen: dict[str, SAESource] = {}
    for s in sources:
        if s.name in seen:  # the folder of its pages in the site, of its families and of its export
            raise ConfigError(f"SAEs {seen[s.name].source} and {s.source} share the name {s.name!r}; expected each "
                              "SAE once, under a name of its own (where these are two SAEs, rename one's folder)")
        seen[s.name] = s
    return hooks[first.name]


def another_hook_words(hook: str, source: str, trained_at: str) -> str:
    """What the note says of an SAE read at ``hook`` that was trained at ``trained_at``."""
    return f"--hook {hook}: {source} was trained at {trained_at}; its latents are read at {hook} here"


def note_another_hook(sources: Sequence[SAESource], hook: str) -> None:
    """Say, once every check has passed, which SAEs are read at another hook than they were trained at: a near
    miss (blocks.8 for blocks.9) gives plausible-looking pages. An SAE that records no hook has none to compare."""
    for s in sources:
        if s.sae.cfg.hook_name and s.sae.cfg.hook_name != hook:
            print(f"saelab: note: {another_hook_words(hook, s.source, s.sae.cfg.hook_name)}", file=sys.stderr)


def another_model_words(model, source: str, sae) -> str | None:
    """What the note says of an SAE read on ``model`` (a spec as given or a loaded model; None: the SAE's own) that
    records another model (:func:`~saelab.models.same_model`); None where it is the model the SAE records, or the SAE
    records none. An export's local model, recorded by its base name, is the file or folder of that name a path
    leads to: ``--model PATH`` is how it is given."""
    from saelab.models.loading import model_provenance, same_model
    from saelab.run_folder import model_left_behind, sae_model
    from saelab.utils.hub import local_path

    recorded, given = sae_model(sae), getattr(model, "name", model)
    if given is None or recorded is None:
        return None
    if model_left_behind(sae) is not None:  # recorded by its base name
        local = local_path(given)
        same = local is not None and local.name == recorded
    else:
        same = same_model(recorded, given)
    if same:
        return None
    return (f"--model {given}: {source} was trained on {model_provenance(recorded)['model_name']}; its latents are "
            f"read from {given} here")


def note_another_model(sources: Sequence[SAESource], model) -> None:
    """Say, once every check has passed, which SAEs are read on another model than they record (``model``: the one
    given, None for their own): a model of the same width gives plausible-looking pages."""
    for s in sources:
        words = another_model_words(model, s.source, s.sae)
        if words:
            print(f"saelab: note: {words}", file=sys.stderr)


# ---- the pass ----------------------------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Everything gathered for one SAE; tensors indexed by latent (see the module docstring)."""

    source: SAESource
    n_tokens: int
    count_N: torch.Tensor
    sum_N: torch.Tensor
    max_N: torch.Tensor
    hist_NH: torch.Tensor
    hist_top_N: torch.Tensor
    top_act_NK: torch.Tensor
    top_ctx_NK: torch.Tensor
    top_pos_NK: torch.Tensor
    top_rows_NKT: torch.Tensor
    sample_act_NS: torch.Tensor
    sample_ctx_NS: torch.Tensor
    sample_pos_NS: torch.Tensor
    sample_rows_NST: torch.Tensor
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    neighbours: dict[str, torch.Tensor] = field(default_factory=dict)
    explanations: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def density_N(self) -> torch.Tensor:
        return self.count_N.double() / max(self.n_tokens, 1)

    @property
    def mean_N(self) -> torch.Tensor:
        return torch.where(self.count_N > 0, self.sum_N / self.count_N.clamp(min=1), torch.zeros_like(self.sum_N))


def top_contexts_state(n_latents: int, k: int, T: int) -> RunningTopK:
    """Per latent, the ``k`` contexts with the largest maximum: context index, position of the max, activation row."""
    return RunningTopK(n_latents, k, {"ctx": (), "pos": (), "rows": (T,)}, {"rows": torch.float32})


def context_payload(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, n_latents: int, ctx_B: torch.Tensor,
                    pos_NB: torch.Tensor):
    """The payload function of :func:`top_contexts_state` for one batch (rows built only for entries that enter)."""

    def rows(lat_P, item_P):
        return {"ctx": ctx_B[item_P], "pos": pos_NB[lat_P, item_P],
                "rows": context_rows(vals_BTK, idx_BTK, n_latents, lat_P, item_P)}

    return rows


class _Collector:
    """The per-SAE accumulators of one pass."""

    def __init__(self, sae: TopKSAE, T: int, cfg: BrowseConfig, n_contexts: int) -> None:
        n = sae.n_latents
        self.sae, self.n = sae, n
        # a latent lists each context once: slots past the contexts read would stay empty, and a --n-top of
        # 300,000 filled the memory with them
        self.top = top_contexts_state(n, min(cfg.n_top, n_contexts), T)
        self.samples = RunningTopK(n, min(cfg.n_samples, n_contexts), {"ctx": (), "pos": (), "max": (), "rows": (T,)},
                                   {"max": torch.float32, "rows": torch.float32})
        self.hist = DoublingHistogram(n, cfg.n_bins)
        self.counts = FiringCounts(n)
        self.seed = cfg.seed

    def update(self, vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, ctx_B: torch.Tensor) -> None:
        max_NB, pos_NB = context_maxima(vals_BTK, idx_BTK, self.n)
        rows = context_payload(vals_BTK, idx_BTK, self.n, ctx_B, pos_NB)
        self.top.update(max_NB, rows)
        keys_NB = sample_keys(ctx_B, self.n, self.seed)
        keys_NB[~torch.isfinite(max_NB)] = float("-inf")

        def sampled(lat_P, item_P):
            return {**rows(lat_P, item_P), "max": max_NB[lat_P, item_P]}

        self.samples.update(keys_NB, sampled)
        lat_M, val_M = active_entries(vals_BTK, idx_BTK)
        self.hist.update(lat_M, val_M)
        self.counts.update(lat_M, val_M)

    def finish(self, source: SAESource, n_tokens: int) -> LatentStats:
        top, smp = self.top, self.samples
        return LatentStats(
            source=source, n_tokens=n_tokens, count_N=self.counts.count_N, sum_N=self.counts.sum_N,
            max_N=top.score_NK[:, 0].clamp(min=0).nan_to_num(0.0, neginf=0.0),
            hist_NH=self.hist.counts_NH, hist_top_N=self.hist.top_edge(),
            top_act_NK=top.score_NK.nan_to_num(0.0, neginf=0.0).clamp(min=0), top_ctx_NK=top.payload["ctx"],
            top_pos_NK=top.payload["pos"], top_rows_NKT=top.payload["rows"],
            sample_act_NS=smp.payload["max"], sample_ctx_NS=smp.payload["ctx"], sample_pos_NS=smp.payload["pos"],
            sample_rows_NST=smp.payload["rows"],
        )


def first_scored(sae: TopKSAE) -> int:
    return 1 if sae.cfg.exclude_first else 0


def shared_first(saes) -> int:
    """The first position every SAE of ``saes`` reads: families compare co-activations on the same tokens, so
    they leave position 0 out when any SAE was trained without it."""
    return max(first_scored(sae) for sae in saes)


def resolve_corpus(cfg: BrowseConfig) -> str:
    """``cfg.corpus``, or the offline Wikipedia eval split when none is given."""
    from saelab.data import resolve_corpus as resolve

    return resolve(cfg.corpus, "eval")


def contexts_read(saes: Sequence[TopKSAE], cfg: BrowseConfig) -> tuple[int, int, int]:
    """(contexts, tokens per context, first position scored) that :func:`read_tokens` reads for ``saes``: known
    from the settings and the SAEs' configs before any text is read."""
    T = cfg.context_size or saes[0].cfg.context_size
    first = shared_first(saes)  # an SAE trained without position 0 scores fewest per context
    if T - first < 1:
        raise ValueError(f"context_size={T} leaves no scored token")
    return math.ceil(cfg.n_tokens / (T - first)), T, first


def contexts_read_words(n_contexts: int, T: int, first: int, n_tokens: str) -> str:
    """What :func:`contexts_read` gives, said with ``n_tokens``, the setting and its value as the caller names them:
    "the 65 contexts read (browse.n_tokens 2,000 in contexts of 32 tokens, 31 scored in each)"."""
    scored = f", {T - first} scored in each" if first else ""
    return f"the {n_contexts:,} {plural(n_contexts, 'context')} read ({n_tokens} in contexts of {T} tokens{scored})"


DRAW_SEED = 0
"""The seed of the contexts' draw: the evaluations' (``draw_contexts``' default)."""


def contexts_drawn(cfg: BrowseConfig, tokens_read: int) -> str:
    """How :func:`read_tokens` reads its contexts, in the words a site and top record it (after "contexts").
    ``tokens_read``: the tokens of the contexts read, which the draw pools where they are more than the pool."""
    if not cfg.sample_pool_tokens:
        return "read from the corpus's start, in order"
    pool = max(cfg.sample_pool_tokens, tokens_read)
    return f"drawn at random (seed {DRAW_SEED}) from the corpus's first {pool:,} tokens"


def read_tokens(lm, sae: TopKSAE | Sequence[TopKSAE], cfg: BrowseConfig,
                context_setting: str | None = "context_size") -> torch.Tensor:
    """The contexts ``[N, T]`` the browser reads (see the module docstring), in the order drawn: the tokens of
    :func:`read_contexts`."""
    return read_contexts(lm, sae, cfg, context_setting).tokens


def read_contexts(lm, sae: TopKSAE | Sequence[TopKSAE], cfg: BrowseConfig,
                  context_setting: str | None = "context_size") -> DrawnContexts:
    """The contexts the browser reads (see the module docstring), in the order drawn, each with its place in the
    corpus's stream of contexts (``.index``: the number a site and top show it by). ``lm``: the
    language model, or its tokenizer alone (read before the model loads; ``check_before_load`` checks the context
    size then).
    ``sae``: the SAE, or several that read the same contexts: enough are read for each to score
    ``cfg.n_tokens``, and a corpus too short is refused with the most that every one of them can score.
    ``context_setting`` names what sets the context size in a corpus too short for one (None: the caller
    reads the SAE's own, which nothing changes)."""
    from saelab.data import draw_contexts
    from saelab.models import LanguageModel
    from saelab.models.lm import bos_token_id, context_named

    saes = list(sae) if isinstance(sae, Sequence) else [sae]
    sae = saes[0]
    corpus = resolve_corpus(cfg)
    n_contexts, T, first = contexts_read(saes, cfg)
    if isinstance(lm, LanguageModel):
        T, tokenize, bos = lm.check_context_size(T, context_named(cfg.context_size)), lm.tokenize, lm.bos_token_id
    else:
        tokenize, bos = lm, bos_token_id(lm)
    try:
        return draw_contexts(corpus, tokenize, T, n_contexts, pool_tokens=cfg.sample_pool_tokens, bos_token_id=bos,
                             prepend_bos=sae.cfg.prepend_bos, setting=context_setting, seed=DRAW_SEED)
    except CorpusError as e:
        e.max_tokens = getattr(e, "contexts", 0) * (T - first)  # the largest n_tokens the corpus allows
        raise


def read_contexts_before_load(tokenizer, sae: TopKSAE | Sequence[TopKSAE], cfg: BrowseConfig,
                              context_setting: str | None = "context_size") -> DrawnContexts | None:
    """:func:`read_contexts` with the model's tokenizer read before the (slow) load (``tokenizer_before_load``'s),
    so that a corpus too short for ``cfg.n_tokens`` is named first; None when the tokenizer is None (it comes
    only with the load)."""
    return None if tokenizer is None else read_contexts(tokenizer, sae, cfg, context_setting)


@torch.no_grad()
def collect_statistics(lm, sources: Sequence[SAESource], tokens_NT: torch.Tensor, cfg: BrowseConfig, *,
                       hook: str, families: bool = True, latent_stats: bool = True, progress: bool = True
                       ) -> tuple[list[LatentStats], Any, dict[str, float]]:
    """The one pass: LM forward (truncated), each SAE's encoder, every accumulator, per batch.

    Returns per-SAE :class:`LatentStats` (empty list without ``latent_stats``), the family
    co-activation counts (``None`` without ``families`` or with one SAE) and the seconds spent in
    ``lm``, ``encode`` and ``stats``.
    """
    from saelab.explore.browser.families import CoactivationCounts

    N, T = tokens_NT.shape
    collectors = [_Collector(s.sae, T, cfg, N) for s in sources] if latent_stats else []
    order = sorted(range(len(sources)), key=lambda i: sources[i].sae.n_latents)
    coact = CoactivationCounts([sources[i].sae for i in order]) if families and len(sources) > 1 else None
    shared = shared_first(s.sae for s in sources)
    times = {"lm": 0.0, "encode": 0.0, "stats": 0.0}
    for ctx_B, codes in encoded_batches(lm, [s.sae for s in sources], tokens_NT, hook, cfg.lm_batch_size,
                                        times=times, progress=progress):
        t0 = time.perf_counter()
        for col, (vals, idx) in zip(collectors, codes):
            col.update(vals, idx, ctx_B)
        if coact is not None:
            coact.update([_scored_from(*codes[i], shared) for i in order], ctx_B.numel() * (T - shared))
        times["stats"] += time.perf_counter() - t0
    stats = [c.finish(s, N * (T - first_scored(s.sae))) for c, s in zip(collectors, sources)]
    return stats, coact, times


def _scored_from(vals_BTK: torch.Tensor, idx_BTK: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes with the positions before ``first`` inactive (a copy where any are scored)."""
    if first and vals_BTK[:, :first].any():
        vals_BTK = vals_BTK.clone()
        vals_BTK[:, :first] = 0
    return vals_BTK, idx_BTK


def encoded_batches(lm, saes: Sequence[TopKSAE], tokens_NT: torch.Tensor, hook: str, batch_size: int, *,
                    times: dict[str, float] | None = None, progress: bool = False, desc: str = "browse"):
    """Yield ``(ctx_B, [(vals_BTK, idx_BTK) per SAE])`` for consecutive batches of contexts.

    One truncated LM forward per batch read by every SAE; codes are on the CPU, each SAE's unscored
    positions (position 0 when that SAE leaves it out) have value 0. ``times`` (if given)
    accumulates the seconds spent in ``lm`` and ``encode``.
    """
    firsts = [first_scored(sae) for sae in saes]
    first = min(firsts)  # the bar counts the tokens any SAE scores
    N, T = tokens_NT.shape
    for sae in saes:
        sae.eval()
    bar = tqdm(total=N * (T - first), unit="tok", unit_scale=True, disable=not progress, desc=desc, smoothing=0.05)
    for start in range(0, N, batch_size):
        toks = tokens_NT[start:start + batch_size]
        t0 = time.perf_counter()
        with torch.no_grad():
            x_BTD = lm.activations(toks, hook)
            t1 = time.perf_counter()
            codes = [_encode(sae, x_BTD, own) for sae, own in zip(saes, firsts)]
        if times is not None:
            times["lm"] = times.get("lm", 0.0) + t1 - t0
            times["encode"] = times.get("encode", 0.0) + time.perf_counter() - t1
        bar.update(toks.shape[0] * (T - first))
        yield torch.arange(start, start + toks.shape[0]), codes
    bar.close()


def _encode(sae: TopKSAE, x_BTD: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes on the CPU; the encoder runs where the SAE lives (the LM may be elsewhere)."""
    x_n, _ = sae.normalize_input(x_BTD.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))
    vals, idx, _ = sae.encode_topk(x_n)
    vals, idx = vals.float().cpu(), idx.cpu()
    vals[:, :first] = 0  # unscored positions count as inactive everywhere
    return vals, idx


# ---- after the pass: decoder geometry, logits, explanations ---------------------------------------------------


@torch.no_grad()
def direct_logit_effects(lm, sae: TopKSAE, n_top: int, chunk: int = 256, hist_bins: int = 0) -> dict[str, torch.Tensor]:
    """Top promoted / suppressed tokens of every latent (module docstring), in chunks of latents.

    With ``hist_bins``, also a histogram of each latent's effect over the whole vocabulary, as
    SAEDashboard draws it: ``hist_bins`` equal bins between the smallest (``hist_lo``) and largest
    (``hist_hi``) effect, the largest value in the last bin (``torch.histc``'s rules), ``hist_counts``.
    """
    from saelab.explore.attribution import unembed_direction

    n = sae.n_latents
    k = min(n_top, lm.vocab_size)
    out = {name: torch.empty(n, k, dtype=dt) for name, dt in
           (("pos_ids", torch.long), ("pos_vals", torch.float32), ("neg_ids", torch.long), ("neg_vals", torch.float32))}
    if hist_bins:
        out.update(hist_counts=torch.zeros(n, hist_bins, dtype=torch.long), hist_lo=torch.empty(n),
                   hist_hi=torch.empty(n))
    for s in range(0, n, chunk):
        eff_CV = unembed_direction(lm, sae.W_dec[s:s + chunk].to(lm.device)).float().cpu()
        top = eff_CV.topk(k, dim=1)
        bot = eff_CV.topk(k, dim=1, largest=False)
        out["pos_ids"][s:s + chunk], out["pos_vals"][s:s + chunk] = top.indices, top.values
        out["neg_ids"][s:s + chunk], out["neg_vals"][s:s + chunk] = bot.indices, bot.values
        if hist_bins:
            lo, hi = eff_CV.min(dim=1).values, eff_CV.max(dim=1).values
            flat = lo == hi  # histc widens a constant row's range to [v - 1, v + 1]
            lo, hi = torch.where(flat, lo - 1, lo), torch.where(flat, hi + 1, hi)
            out["hist_lo"][s:s + chunk], out["hist_hi"][s:s + chunk] = lo, hi
            out["hist_counts"][s:s + chunk] = equal_bin_counts(eff_CV, lo, hi, hist_bins)
    return out


def equal_bin_counts(x_CV: torch.Tensor, lo_C: torch.Tensor, hi_C: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``[C, n_bins]`` counts of each row of ``x_CV`` in equal bins over ``[lo, hi]``: ``torch.histc`` of
    each row, vectorised (same arithmetic, so values on a bin edge fall on the same side)."""
    C = x_CV.shape[0]
    flat = (lo_C == hi_C)[:, None]  # histc's rule for an empty range: [lo - 1, hi + 1]
    lo, hi = torch.where(flat, lo_C[:, None] - 1, lo_C[:, None]), torch.where(flat, hi_C[:, None] + 1, hi_C[:, None])
    pos = (x_CV - lo).mul_(n_bins).div_(hi - lo).long()  # in place, in histc's order of operations
    pos.clamp_(0, n_bins - 1).add_(torch.arange(C)[:, None] * n_bins)  # the maximum falls in the last bin
    return torch.bincount(pos.view(-1), minlength=C * n_bins).view(C, n_bins)


@torch.no_grad()
def nearest_by_decoder(W_dec_ND: torch.Tensor, n_top: int, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """For each latent, the ``n_top`` other latents with the largest decoder cosine (ids, cosines)."""
    W = W_dec_ND.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = W.shape[0]
    k = min(n_top, n - 1)
    ids = torch.empty(n, k, dtype=torch.long)
    cos = torch.empty(n, k)
    for s in range(0, n, chunk):
        sim = W[s:s + chunk] @ W.T
        rows = torch.arange(s, min(s + chunk, n))
        sim[rows - s, rows] = float("-inf")  # not its own neighbour
        top = sim.topk(k, dim=1)
        ids[s:s + chunk], cos[s:s + chunk] = top.indices, top.values
    return {"ids": ids, "cos": cos}


def pattern_text(tokens: Sequence[str], anchored: bool) -> str:
    """One N2G pattern as text: wildcards as '…', '⟨start⟩' in front when anchored to the context start."""
    body = "".join("…" if t == "*" else t for t in tokens)
    return ("⟨start⟩" if anchored else "") + body


def explanation_from_n2g(entry: dict[str, Any], n_patterns: int = 3) -> dict[str, Any]:
    """The browser's explanation record from one ``per_latent`` entry of a ``run_n2g`` result."""
    pats = entry.get("patterns") or []
    texts = [pattern_text(p["tokens"], bool(p.get("anchored"))) for p in pats[:n_patterns]]
    return {"text": " | ".join(texts), "patterns": [{"text": pattern_text(p["tokens"], bool(p.get("anchored"))),
                                                    "value": p.get("value"), "count": p.get("count")} for p in pats],
            "precision": entry.get("precision"), "recall": entry.get("recall"), "f1": entry.get("f1")}


# Where a run keeps N2G explanations: the paper suite's result (`saelab eval RUN --suite paper`), then a
# run_n2g result saved beside the SAE.
RUN_N2G_FILES = (Path("evals") / "n2g.json", Path("n2g.json"))


def run_explanations(run_dir: Path, sae: TopKSAE) -> dict[int, dict[str, Any]]:
    """The N2G explanations a run keeps for ``sae``: the paper suite's, when it ran to the end on these
    weights (a failed or skipped N2G, or one of weights retrained since, has none to show), else those of
    a ``run_n2g`` result saved as RUN/n2g.json; {} when there are none."""
    from saelab.run_folder import sae_sha256  # lazy: the hash reads every weight, only when there is a file

    suite_file, own_file = (run_dir / name for name in RUN_N2G_FILES)
    if suite_file.is_file():
        try:
            record = read_result_json(suite_file, str(suite_file))
            if isinstance(record, dict) and record.get("status") == "ok" and isinstance(record.get("result"), dict) \
                    and (record.get("inputs") or {}).get("sae_sha256") == sae_sha256(sae):
                return _explanations(checked_per_latent(record["result"], str(suite_file), sae.n_latents))
        except (CheckpointError, ConfigError) as e:  # a damaged suite record: the site is built without it
            print(f"saelab: warning: {e}; the site shows no N2G explanations", file=sys.stderr)
    return read_n2g_file(own_file, sae.n_latents) if own_file.is_file() else {}


def read_n2g_file(path: str | Path, n_latents: int | None = None, name: str | None = None) -> dict[int, dict[str, Any]]:
    """Explanations by latent from a ``run_n2g`` JSON result, or from the paper suite's n2g.json that
    holds one as its "result". The whole file is checked first (:func:`saelab.evals.n2g.load_result`):
    an entry that is no explanation, a latent given twice or (with ``n_latents``) one the SAE lacks is
    refused, naming the file as ``name`` (the setting that gave it, say; default its path) and the entry."""
    return _explanations(load_result(path, n_latents, name))


def _explanations(per_latent: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(e["latent"]): explanation_from_n2g(e) for e in per_latent}


def given_explanations(source: SAESource, cfg: BrowseConfig) -> dict[int, dict[str, Any]]:
    """The N2G explanations to show for ``source``: those of ``cfg.n2g_file``, else those its run folder keeps."""
    if cfg.n2g_file:
        return read_n2g_file(cfg.n2g_file, source.sae.n_latents, name=f"browse.n2g_file {cfg.n2g_file}")
    if source.run_dir is not None:
        return run_explanations(source.run_dir, source.sae)
    return {}


def n2g_padding_id(tokenizer, cfg: BrowseConfig) -> int:
    """The one token of ``cfg.n2g_padding_token``; a text the tokenizer splits is refused (ConfigError)."""
    try:
        return padding_id(tokenizer, cfg.n2g_padding_token, "browse.n2g_padding_token")  # the command line: its option
    except ValueError as e:
        raise ConfigError(str(e)) from None


@torch.no_grad()
def build_n2g_explanations(lm, stats: LatentStats, tokens_NT: torch.Tensor, hook: str, cfg: BrowseConfig,
                           progress: bool = True) -> dict[int, dict[str, Any]]:
    """N2G explanations for ``cfg.n2g_n_latents`` latents built from the top contexts already found."""
    from saelab.evals.n2g import WILDCARD, build_explanations, model_act_fn
    from saelab.evals.probe_tasks import token_strings

    sae = stats.source.sae
    alive = (stats.count_N > 0).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(cfg.seed)
    lats = alive[torch.randperm(alive.numel(), generator=g)[:cfg.n2g_n_latents]].sort().values.tolist()
    if not lats:
        return {}
    ncfg = N2GConfig(n_examples=cfg.n_top, padding_token=cfg.n2g_padding_token)
    pad_id = n2g_padding_id(lm.tokenizer, cfg)
    s0 = 1 if sae.cfg.prepend_bos else 0
    act_fn = model_act_fn(lm, sae, hook, sae.cfg.prepend_bos, pad_id, ncfg.seq_batch_size)
    strs: dict[int, str] = {}

    def shown(t: int) -> str:  # a pattern's token as the pages show tokens
        return "*" if t == WILDCARD else token_strings(lm.tokenizer, [t], strs, readable_bytes=True)[0]

    out = {}
    for lat in tqdm(lats, desc="N2G", disable=not progress):
        examples = {lat: [(tokens_NT[int(c), s0:int(p) + 1].tolist(), float(a))
                          for c, p, a in zip(stats.top_ctx_NK[lat], stats.top_pos_NK[lat], stats.top_act_NK[lat])
                          if int(c) >= 0 and float(a) > 0]}
        expl, _ = build_explanations(examples, act_fn, {lat: float(stats.max_N[lat])}, ncfg, pad_id)[lat]
        pats = sorted(expl.patterns, key=lambda p: (-p.count, -p.value))[:ncfg.max_patterns_reported]
        entry = {"patterns": [{"tokens": [shown(t) for t in p.ids], "anchored": p.anchored, "value": p.value,
                               "count": p.count} for p in pats]}
        out[lat] = explanation_from_n2g(entry)
    return out


def finish_statistics(lm, stats: LatentStats, tokens_NT: torch.Tensor, hook: str, cfg: BrowseConfig,
                      progress: bool = True, logit_hist_bins: int = 0,
                      explanations: dict[int, dict[str, Any]] | None = None) -> None:
    """Add decoder neighbours, direct logit effects and explanations to ``stats`` (in place).

    ``explanations``: the N2G explanations :func:`given_explanations` read already (they are read here otherwise).
    ``logit_hist_bins``: also the histogram of each latent's direct logit effect over the vocabulary
    (the Neuronpedia export needs it: pass :data:`.export.LOGIT_HIST_BINS`; it is computed there otherwise).
    """
    sae = stats.source.sae
    stats.neighbours = nearest_by_decoder(sae.W_dec.detach(), cfg.n_neighbours)
    stats.logits = direct_logit_effects(lm, sae, cfg.n_logits, hist_bins=logit_hist_bins)
    stats.explanations.update(given_explanations(stats.source, cfg) if explanations is None else explanations)
    if cfg.n2g_n_latents:
        stats.explanations.update(build_n2g_explanations(lm, stats, tokens_NT, hook, cfg, progress))
