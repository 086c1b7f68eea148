"""Sparsity of ablation effects (Gao et al. 2024, "sparsity of ablation effects" metric).

Definition pinned here (and in ``tests/test_evals_ablation_sparsity.py``):

1. Sample a *site*: a context and a position ``p`` with ``p + T <= context length`` (``T`` =
   ``cfg.n_future``, 16 in the paper), ``p >= 1`` when the SAE leaves out position 0 (BOS).
2. Encode the hook activation ``x_p`` with the SAE. For each active latent ``i`` (value ``z_i > 0``),
   subtract its contribution ``z_i * W_dec[i]`` (times the per-token std for a LayerNorm-input SAE)
   from ``x_p`` and leave everything else as it is: the SAE error term is kept, so an ablation of
   nothing is exactly the clean model. Only position ``p`` is edited.
3. Run the model on. The effect is the change of the logits at positions ``p .. p+T-1`` (the
   ablated position and the next ``T-1``): ``T`` vectors of ``V`` (vocabulary) numbers.
4. Because adding a constant to all logits of one position does not change its softmax, the
   median change of each position (over ``V``) is subtracted from that position
   (``cfg.center = "median"``, as the paper; ``"none"`` skips it).
5. The ``V * T`` numbers form one vector ``d``; the score is ``(||d||_1 / ||d||_2)^2 / (V * T)``:
   the effective fraction of (token, position) logits affected. It is ``1 / (V*T)`` for a one-hot
   ``d``, 1 when every entry has the same magnitude, and ~``2/pi`` (0.64) for a Gaussian ``d``.
   An ablation with no effect at all (``d = 0``) has no score; such ablations are counted
   (``n_null``) and left out of the mean.
6. Report the mean over all (site, latent) ablations.

Baselines, at the same sites:

- ``random`` (the fair one, ``cfg.random_baseline``): for every latent ablation, a random
  direction of the same size is subtracted instead: ``u * ||c_i||`` with ``c_i`` the latent's
  contribution (in the activation's space) and ``u`` uniform on the unit sphere of the activation
  space (a normalized isotropic Gaussian). Latent and random ablations then remove the same
  amount of activation, so the comparison asks only whether the latent's *direction* has sparser
  effects than an arbitrary one.
- ``channel`` (the older one, kept for comparison): residual-stream channel ``j`` loses its
  value, ``x_p[j] -> 0`` (``cfg.channels_per_site`` channels drawn at random per site). The size
  removed, ``|x_p[j]|``, is unrelated to a latent's, so the two are not like for like.

Intervals (``saelab.evals.bootstrap``, ``cfg.n_boot`` replicates, ``cfg.ci_level``): the sites'
documents are resampled (the sites of one document together; each context alone when the contexts'
``documents`` are not given or name one document); every mean is over the pooled scored ablations of the drawn documents,
and the latent-vs-baseline ratio and difference are paired (the same draw for both).

Ablations run in batches: the context (cut after ``p + T - 1``, which causality allows) is
repeated along the batch dimension, row 0 unedited, each other row with one ablation, and only
the last ``T`` positions are unembedded. Row 0 gives the clean logits of that very forward.

Result schema (``run_ablation_sparsity`` returns a JSON-serializable dict)::

    metric              "ablation_sparsity"
    hook                hook the SAE reads and the ablations edit
    config              the AblationSparsityConfig as a dict
    n_sites             (context, position) sites sampled
    n_future            T
    vocab_size          V (logit width)
    latent              summary of the latent ablations (see below)
    random              the same for the random directions of the latents' sizes (None if not random_baseline)
    channel             the same for residual-channel ablations (None if channels_per_site == 0)
    ratio_latent_to_random    latent.mean / random.mean (< 1: latents have sparser effects): the headline
    ratio_latent_to_channel   latent.mean / channel.mean (the older, unmatched comparison)
    interval_groups     what the intervals resample: "documents" (the contexts' documents given, and the sites'
                        contexts in two or more of them) or "contexts"
    interval_method     how the intervals were made (INTERVAL_METHOD; an earlier saelab's result records none)
    intervals           {latent_mean, random_mean, channel_mean, ratio_latent_to_random,
                         latent_minus_random, ratio_latent_to_channel}: bootstrap intervals
                        {estimate, low, high, level, n_boot, n_groups, n_undefined} ({} when n_boot is 0)
    gaussian_reference  2/pi, the score of a Gaussian random effect vector
    ablations_per_s     latent and baseline ablations done per second of wall time (forwards + scores)
    latents_per_s       latent ablations per second of the time spent on them (site encode, forwards, scores)
    latent_s            that time; wall_s - latent_s went to the baselines
    wall_s              wall time of the ablation loop

    summary = {mean, median, std, min, max (score over scored ablations, None when none),
               effect_l2_mean (mean L2 norm of the centred V*T effect vector: the effect's size),
               n_ablations (done), n_null (zero effect, unscored)}
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from saelab.evals._common import (
    check_tokens,
    config_dict,
    first_position,
    json_float,
    last_logits,
    latent_contributions,
    resolve_hook,
)
from saelab.evals.bootstrap import by_document, check_documents, paired_bootstrap, ratio, resampled_documents
from saelab.evals.config import CENTERS, AblationSparsityConfig
from saelab.utils.words import plural

GAUSSIAN_REFERENCE = 2 / math.pi


def _centered(delta_TV: torch.Tensor, center: str) -> torch.Tensor:
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    d = delta_TV.double()
    return d - d.median(dim=-1, keepdim=True).values if center == "median" else d


def ablation_sparsity_score(delta_TV: torch.Tensor, center: str = "median") -> torch.Tensor:
    """The score of effect vectors ``delta [..., T, V]`` (logit changes): one value per leading index.

    ``(||d||_1 / ||d||_2)^2 / (T * V)`` over the ``T * V`` entries, after subtracting each row's
    median over ``V`` when ``center == "median"`` (torch.median: the lower middle value for an
    even ``V``). NaN where ``d`` is all zero.
    """
    d = _centered(delta_TV, center).flatten(-2)
    l1 = d.abs().sum(-1)
    l2sq = d.pow(2).sum(-1)
    score = l1.pow(2) / l2sq / d.shape[-1]
    return torch.where(l2sq > 0, score, torch.full_like(score, float("nan")))


@torch.no_grad()
def ablation_logit_deltas(lm, context_T: torch.Tensor, pos: int, deltas_RD: torch.Tensor, hook: str,
                          n_future: int, batch_size: int = 32) -> torch.Tensor:
    """Logit changes ``[R, n_future, V]`` of ``R`` ablations at position ``pos`` of one context.

    Row ``r`` subtracts ``deltas_RD[r]`` from the activation at ``hook``, position ``pos``; the
    changes are read at positions ``pos .. pos + n_future - 1`` against an unedited row of the same
    forward pass.
    """
    end = pos + n_future
    if end > context_T.shape[0]:
        raise ValueError(f"position {pos} + n_future {n_future} exceeds the context length {context_T.shape[0]}")
    toks = context_T[:end].to(lm.device)
    out = []
    for start in range(0, deltas_RD.shape[0], batch_size):
        chunk = deltas_RD[start:start + batch_size]
        R = chunk.shape[0]

        def edit(x_BTD: torch.Tensor, chunk=chunk) -> torch.Tensor:
            x = x_BTD.clone()
            x[1:, pos] -= chunk.to(x.dtype).to(x.device)
            return x

        logits = last_logits(lm, toks.unsqueeze(0).expand(R + 1, -1), {hook: edit}, n_future)
        out.append((logits[1:] - logits[:1]).cpu())
    return torch.cat(out) if out else torch.empty(0, n_future, lm.vocab_size)


def _summary(scores: list[torch.Tensor], norms: list[torch.Tensor]) -> dict:
    s = torch.cat(scores) if scores else torch.empty(0, dtype=torch.float64)
    l2 = torch.cat(norms) if norms else torch.empty(0, dtype=torch.float64)
    ok = s[~s.isnan()]
    if ok.numel() == 0:
        stats = dict.fromkeys(("mean", "median", "std", "min", "max"))
    else:
        stats = {"mean": json_float(ok.mean()), "median": json_float(ok.median()),
                 "std": json_float(ok.std()) if ok.numel() > 1 else 0.0,
                 "min": json_float(ok.min()), "max": json_float(ok.max())}
    return {**stats, "effect_l2_mean": json_float(l2.mean()) if l2.numel() else None,
            "n_ablations": int(s.numel()), "n_null": int(s.isnan().sum())}


def random_directions_like(contrib_RD: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random direction per row, uniform on the sphere, scaled to that row's norm (CPU, float32)."""
    u = torch.randn(contrib_RD.shape, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    return (u * contrib_RD.double().cpu().norm(dim=-1, keepdim=True)).float()


def _sample_sites(N: int, T_ctx: int, first: int, n_future: int, n: int, g: torch.Generator) -> list[tuple[int, int]]:
    last = T_ctx - n_future  # largest allowed position
    if last < first:
        raise ValueError(f"contexts of {T_ctx} {plural(T_ctx, 'token')} are too short for n_future={n_future} "
                         f"(positions start at {first})")
    ctx = torch.randint(0, N, (n,), generator=g)
    pos = torch.randint(first, last + 1, (n,), generator=g)
    return sorted(zip(ctx.tolist(), pos.tolist()))


PARTS = ("latent", "random", "channel")
_MEAN = {part: ratio(f"{part}_sum", f"{part}_n") for part in PARTS}  # NaN when a draw holds none
INTERVAL_STATS = {
    "latent_mean": _MEAN["latent"],
    "random_mean": _MEAN["random"],
    "channel_mean": _MEAN["channel"],
    "ratio_latent_to_random": lambda t: _MEAN["latent"](t) / _MEAN["random"](t),
    "latent_minus_random": lambda t: _MEAN["latent"](t) - _MEAN["random"](t),
    "ratio_latent_to_channel": lambda t: _MEAN["latent"](t) / _MEAN["channel"](t),
}
"""Statistics of the per-context totals (sum of scores and number of scored ablations of each part)."""
INTERVAL_METHOD = "documents of the sites' contexts (those contexts where they lie in one document)"
"""How ablation sparsity's intervals are made, as its results record it (``interval_method``): a result
that records another or none is computed again, not reused (:func:`saelab.evals.bootstrap.earlier_intervals`)."""


class _Scores:
    """Scores and effect norms of each part, and per-context totals for the intervals."""

    def __init__(self) -> None:
        self.scores: dict[str, list[torch.Tensor]] = {k: [] for k in PARTS}
        self.norms: dict[str, list[torch.Tensor]] = {k: [] for k in PARTS}
        self.totals: dict[int, dict[str, float]] = {}
        self.vocab: int | None = None

    def add(self, part: str, context: int, delta_RTV: torch.Tensor, center: str) -> None:
        s = ablation_sparsity_score(delta_RTV, center)
        self.scores[part].append(s)
        self.norms[part].append(_centered(delta_RTV, center).flatten(-2).norm(dim=-1))
        tot = self.totals.setdefault(context, dict.fromkeys([f"{k}_{x}" for k in PARTS for x in ("sum", "n")], 0.0))
        ok = s[~s.isnan()]
        tot[f"{part}_sum"] += float(ok.sum())
        tot[f"{part}_n"] += ok.numel()
        self.vocab = delta_RTV.shape[-1]

    def intervals(self, cfg: AblationSparsityConfig, documents_N: torch.Tensor | None) -> tuple[dict, str]:
        """The intervals and what they resample: the documents of the contexts the sites fell in, or those
        contexts where they lie in one document (the metric's other contexts do not enter its intervals)."""
        contexts = torch.tensor(list(self.totals), dtype=torch.long)
        documents = None if documents_N is None else resampled_documents(documents_N.cpu()[contexts])
        unit = "contexts" if documents is None else "documents"
        if cfg.n_boot == 0 or not self.totals:
            return {}, unit
        keys = next(iter(self.totals.values())).keys()
        per_context = {k: torch.tensor([t[k] for t in self.totals.values()], dtype=torch.float64) for k in keys}
        stats = {k: f for k, f in INTERVAL_STATS.items()
                 if ("random" not in k or cfg.random_baseline) and ("channel" not in k or cfg.channels_per_site)}
        return paired_bootstrap(by_document(per_context, documents), stats, n_boot=cfg.n_boot, level=cfg.ci_level,
                                seed=cfg.seed), unit


def _ablate_site(lm, sae, tokens_NT: torch.Tensor, c: int, p: int, hook: str, cfg: AblationSparsityConfig,
                 g: torch.Generator, g_dir: torch.Generator, out: _Scores) -> float:
    """Every ablation of one site into ``out``; returns the seconds spent on the latent ablations."""
    t_site = time.perf_counter()
    context = tokens_NT[c]
    x_D = lm.activations(context[None, :p + 1], hook)[0, p].float()
    vals, idx, contrib = latent_contributions(sae, x_D[None])
    active = (vals[0] > 0).nonzero().squeeze(1)
    if cfg.latents_per_site is not None and active.numel() > cfg.latents_per_site:
        active = active[torch.randperm(active.numel(), generator=g)[: cfg.latents_per_site]]
    if active.numel():
        out.add("latent", c, ablation_logit_deltas(lm, context, p, contrib[0, active], hook, cfg.n_future,
                                                   cfg.batch_size), cfg.center)
    latent_s = time.perf_counter() - t_site
    if cfg.random_baseline and active.numel():
        dirs = random_directions_like(contrib[0, active], g_dir)
        out.add("random", c, ablation_logit_deltas(lm, context, p, dirs, hook, cfg.n_future, cfg.batch_size),
                cfg.center)
    if cfg.channels_per_site:
        n_ch = min(cfg.channels_per_site, x_D.shape[0])
        chans = torch.randperm(x_D.shape[0], generator=g)[:n_ch]
        deltas = torch.zeros(n_ch, x_D.shape[0])
        deltas[torch.arange(n_ch), chans] = x_D.cpu()[chans]
        out.add("channel", c, ablation_logit_deltas(lm, context, p, deltas, hook, cfg.n_future, cfg.batch_size),
                cfg.center)
    return latent_s


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None or a["mean"] is None or not b["mean"]:
        return None
    return json_float(a["mean"] / b["mean"])


@torch.no_grad()
def run_ablation_sparsity(lm, sae, tokens_NT: torch.Tensor, cfg: AblationSparsityConfig | None = None, *,
                          documents: torch.Tensor | None = None) -> dict:
    """Ablation sparsity of ``sae``'s latents and of its baselines on ``tokens_NT`` (module docstring);
    ``documents``: the document of each context, which the intervals resample (None: each context alone)."""
    cfg = cfg or AblationSparsityConfig()
    tokens_NT = check_tokens(tokens_NT)
    check_documents(documents, tokens_NT)
    hook = resolve_hook(lm, sae, cfg.hook)
    first = first_position(sae, cfg.exclude_first)
    g = torch.Generator().manual_seed(cfg.seed)
    g_dir = torch.Generator().manual_seed(cfg.seed + 1_000_003)  # apart from g: sites and channels as before
    sites = _sample_sites(tokens_NT.shape[0], tokens_NT.shape[1], first, cfg.n_future, cfg.n_sites, g)

    res = _Scores()
    t0 = time.perf_counter()
    latent_s = 0.0
    for c, p in tqdm(sites, desc="ablation sparsity", unit="site", disable=not cfg.progress):
        latent_s += _ablate_site(lm, sae, tokens_NT, c, p, hook, cfg, g, g_dir, res)
    wall = time.perf_counter() - t0

    latent = _summary(res.scores["latent"], res.norms["latent"])
    random = _summary(res.scores["random"], res.norms["random"]) if cfg.random_baseline else None
    channel = _summary(res.scores["channel"], res.norms["channel"]) if cfg.channels_per_site else None
    n_done = sum(part["n_ablations"] for part in (latent, random, channel) if part)
    intervals, unit = res.intervals(cfg, documents)
    return {
        "metric": "ablation_sparsity",
        "hook": hook,
        "config": config_dict(cfg),
        "n_sites": len(sites),
        "n_future": cfg.n_future,
        "vocab_size": res.vocab if res.vocab is not None else lm.vocab_size,
        "latent": latent,
        "random": random,
        "channel": channel,
        "ratio_latent_to_random": _ratio(latent, random),
        "ratio_latent_to_channel": _ratio(latent, channel),
        "intervals": intervals,
        "interval_groups": unit,
        "interval_method": INTERVAL_METHOD,
        "gaussian_reference": GAUSSIAN_REFERENCE,
        "ablations_per_s": json_float(n_done / wall) if wall > 0 else None,
        "latents_per_s": json_float(latent["n_ablations"] / latent_s) if latent_s > 0 else None,
        "latent_s": latent_s,
        "wall_s": wall,
    }
