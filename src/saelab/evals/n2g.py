"""N2G explanations of latents (Gao et al. 2024, explainability; Foote et al. 2023, Neuron to Graph).

An explanation is a set of token n-grams with wildcards, each ending at the token where the latent
fires, with the latent's (normalized) activation as its prediction. Definitions pinned here and in
``tests/test_evals_n2g.py``:

**Building** (per latent, from the build split; the steps of OpenAI's ``explanations.py`` N2G
builder, implemented anew, with an activation function evaluated in batches):

1. Examples: the latent's ``n_examples`` top-activating contexts, each cut after its
   max-activating token (one example per context). ``max_act`` is the latent's largest activation
   on the build split; values are reported normalized by it.
2. Minimal suffix: the shortest suffix of the example (at most ``max_len`` tokens, re-run through
   the model on its own, after BOS when the SAE's contexts start with one) on whose last token the
   latent reaches ``keep_frac`` (0.5) of the example's activation. Examples without one are dropped.
3. Saliency: each suffix token in turn is replaced by a padding token (" _" for GPT-2); its
   saliency is ``1 - act(replaced) / act(suffix)``. Tokens with saliency below
   ``saliency_threshold`` (0.5) become wildcards ("any token").
4. Anchor: if putting a padding token in front of the suffix brings the activation below
   ``keep_frac`` of the example's, the pattern must start the context (right after BOS).
5. The pattern's value is ``act(suffix) / max_act``; identical patterns (same tokens, wildcards and
   anchor) are merged, their values averaged; patterns worth less than ``min_value`` are dropped.

**Predicting**: at each token, the patterns are matched backwards from that token (exact token
before wildcard, backtracking); the first pattern completely matched gives the prediction, its
value; no match predicts 0. The shortest matching pattern along the search wins.

**Scoring** (held-out split, positions from ``exclude_first`` on): the latent *fires* at a token
when its activation exceeds ``firing_frac * max_act`` (default 0: any nonzero activation); the
explanation *predicts* firing when its prediction is > 0. Per latent, ``precision = TP / (TP + FP)``
(undefined when nothing is predicted), ``recall = TP / (TP + FN)`` (undefined when the latent never
fires there), ``F1 = 2 TP / (2 TP + FP + FN)``; averages are over latents where defined; ``micro``
pools the counts of all explained latents. ``corr`` is the Pearson correlation of predicted
(``value * max_act``) and actual activations.

**Splicing** (§4.4): on the held-out contexts the hook activation is replaced by an SAE
reconstruction from simulated latents (N2G predictions scaled by ``max_act``), two ways:

- ``n2g_all``, the paper's definition: *every* latent is simulated. The explained latents take
  their N2G predictions and every latent without an explanation is 0, so the model sees only what
  the explanations account for. This approaches the paper's number when every latent that fires
  is explained (``cfg.n_latents = 0``); with a sample of latents, most latents are simply 0 and the
  loss is mostly that of dropping them (``n_simulated`` / ``simulated_frac`` say how many).
- ``n2g_partial``: only the explained latents are replaced; all others keep their SAE values.
  Not the paper's metric; it isolates the explained latents (compare ``zeroed``: the same latents
  set to 0, others kept): ``ce_recovered_partial = (ce_zeroed - ce_n2g_partial) / (ce_zeroed -
  ce_sae)`` is 1 when N2G's activations serve the model as well as the real ones and 0 when they
  are no better than dropping those latents.

Each is compared with the clean model (delta CE, KL) and the plain SAE splice. With
``cfg.splice_error_term`` the SAE's error ``x - SAE(x)`` is added back in every splice. Where the
SAE reads position 0 of contexts that start with BOS, N2G predicts nothing at BOS (no text
precedes it): there every run takes the plain SAE reconstruction, as the SAE splice and
``saelab.evals.downstream`` replace it, so the runs differ only where the explanations predict.

**Split**: with the contexts' documents known (the eval draws give them), whole documents go to the build
or the held-out side, documents taken in random order (``cfg.seed``) into the held-out part until it holds
``heldout_frac`` of the contexts; else (or with one document) the last ``heldout_frac`` of the contexts.

**Intervals** (``saelab.evals.bootstrap``, ``cfg.n_boot`` replicates, ``cfg.ci_level``): the
held-out documents are resampled (each context alone when documents are not known, or the held-out
contexts lie in one document); precision, recall
and F1 (means over latents, from the drawn contexts' pooled counts) and the splice's delta CEs (pooled
over the drawn contexts' predictions) are recomputed on each draw, paired (the same draw for every
quantity, so ``n2g_all_minus_sae`` has the shared context difficulty removed). The explanations stay
fixed.

Result schema (``run_n2g`` returns a JSON-serializable dict)::

    metric            "n2g"
    hook, config      as used
    n_explained       latents attempted: an explanation was built for each (sampled at random among those
                      firing on the build split); those that kept a pattern are the splice's n_simulated
    n_build_contexts, n_eval_contexts
    precision, recall, f1, corr   means over the latents attempted, each where defined (None when undefined for all)
    micro             {precision, recall, f1, tp, fp, fn}: counts pooled over latents
    mean_patterns     patterns per explanation
    per_latent        [{latent, max_act, n_examples_used, n_patterns, precision, recall, f1, corr,
                        tp, fp, fn, patterns: [{tokens (str, "*" = wildcard), ids (-1 = wildcard),
                        anchored, value, count}] (the most frequent max_patterns_reported)}]
    splice            {ce_clean, ce_sae, ce_n2g_all, ce_n2g_partial, ce_zeroed, delta_ce_sae, delta_ce_n2g_all,
                       delta_ce_n2g_partial, delta_ce_zeroed, kl_sae, kl_n2g_all, kl_n2g_partial,
                       ce_recovered_partial, n_simulated (latents with at least one pattern), simulated_frac
                       (n_simulated / n_latents), n_predictions} (None when cfg.splice is False)
    interval_groups   what the intervals resample: "documents" (the contexts' documents given, and the held-out
                      contexts in two or more of them) or "contexts"
    interval_method   how the intervals were made (INTERVAL_METHOD; an earlier saelab's result records none)
    intervals         {precision, recall, f1, delta_ce_sae, delta_ce_n2g_all, delta_ce_n2g_partial,
                       n2g_all_minus_sae}: bootstrap intervals {estimate, low, high, level, n_boot,
                       n_groups, n_undefined} (the delta CEs only with the splice; {} when n_boot is 0)
    n_model_sequences short sequences run through the model while building
    build_s, eval_s, wall_s   wall times

Saved as JSON (alone, or as the "result" of the paper suite's evals/n2g.json), a result is read back
by :func:`load_result`, which checks ``per_latent`` against this schema (the browser shows it).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from saelab.errors import CheckpointError, ConfigError
from saelab.evals._common import (
    check_tokens,
    config_dict,
    first_position,
    json_float,
    resolve_hook,
    split_by_group,
)
from saelab.evals.bootstrap import by_document, check_documents, paired_bootstrap, resampled_documents
from saelab.evals.config import N2GConfig
from saelab.evals.downstream import ce_and_kl, ce_recovered
from saelab.evals.probe_tasks import token_strings
from saelab.run_folder import read_json_value
from saelab.utils.words import plural

WILDCARD = -1
"""Pattern entry matching any token."""

ActFn = Callable[[list[list[int]], list[int]], Sequence[float]]
"""(token sequences, latent of each) -> the latent's activation at each sequence's last token."""


def check_latents(latents: Sequence[int], n_latents: int, name: str = "latents") -> None:
    """Refuse latent ids an SAE with ``n_latents`` latents lacks (they would index past its latents)."""
    bad = sorted({int(l) for l in latents if l >= n_latents})
    if bad:  # a file of another SAE's explanations can hold thousands: the first few name it
        shown = f"{bad}" if len(bad) <= 5 else f"[{', '.join(map(str, bad[:5]))}, …] ({len(bad)} in all)"
        raise ConfigError(f"{name} {shown} out of range: the SAE has {n_latents} {plural(n_latents, 'latent')} "
                          f"(0 to {n_latents - 1})")


# ---- explanations -------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    ids: tuple[int, ...]
    """Token ids in text order; WILDCARD matches any token. The last entry sits on the firing token."""
    anchored: bool
    """The first entry must be the first token of the context (after BOS)."""
    value: float
    """Predicted activation, as a fraction of the latent's max activation."""
    count: int = 1
    """Examples that produced this pattern (value is their mean)."""


class _Node:
    __slots__ = ("children", "value", "start_value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: float | None = None
        self.start_value: float | None = None


class Explanation:
    """A set of patterns, stored as a trie over the reversed tokens (see the module docstring)."""

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        self.patterns = list(patterns)
        self.root = _Node()
        for p in self.patterns:
            node = self.root
            for tok in reversed(p.ids):
                node = node.children.setdefault(tok, _Node())
            if p.anchored:
                node.start_value = p.value
            else:
                node.value = p.value

    def match(self, seq: Sequence[int], i: int) -> float:
        """Prediction at position ``i`` of ``seq`` (0 when no pattern matches ending there)."""
        stack = [(self.root, i)]
        while stack:
            node, j = stack.pop()
            if node is not self.root and node.value is not None:
                return node.value
            if j < 0:
                if node.start_value is not None:
                    return node.start_value
                continue
            wild, exact = node.children.get(WILDCARD), node.children.get(seq[j])
            if wild is not None:
                stack.append((wild, j - 1))
            if exact is not None:  # popped first: exact tokens are tried before the wildcard
                stack.append((exact, j - 1))
        return 0.0

    def predict(self, seq: Sequence[int]) -> list[float]:
        """Prediction at every position of ``seq`` (the context's tokens after BOS)."""
        seq = list(seq)
        return [self.match(seq, i) for i in range(len(seq))]


def _evaluate(act_fn: ActFn, seqs: list[list[int]], lats: list[int], counter: list[int]) -> list[float]:
    counter[0] += len(seqs)
    return [float(a) for a in act_fn(seqs, lats)] if seqs else []


def build_explanations(examples: dict[int, list[tuple[list[int], float]]], act_fn: ActFn,
                       max_acts: dict[int, float], cfg: N2GConfig, padding_id: int,
                       counter: list[int] | None = None) -> dict[int, tuple[Explanation, int]]:
    """Build each latent's explanation from its examples ``(token ids up to the firing token, act)``.

    ``act_fn`` is called with batches of short sequences (all latents together). Returns
    ``{latent: (Explanation, examples used)}``.
    """
    counter = counter if counter is not None else [0]
    items = [(lat, ids, act) for lat, exs in examples.items() for ids, act in exs if act > 0 and ids]
    # Step 2: the shortest suffix keeping keep_frac of the activation, lengths tried in rounds.
    found: dict[int, tuple[list[int], float]] = {}
    lo = 1
    while lo <= cfg.max_len:
        hi = min(cfg.max_len, 2 * lo)
        seqs, lats, owners = [], [], []
        for k, (lat, ids, act) in enumerate(items):
            if k in found:
                continue
            for n in range(lo, min(hi, len(ids)) + 1):
                seqs.append(ids[-n:])
                lats.append(lat)
                owners.append(k)
        acts = _evaluate(act_fn, seqs, lats, counter)
        for seq, k, a in zip(seqs, owners, acts):  # lengths ascend within an example
            if k not in found and a >= cfg.keep_frac * items[k][2]:
                found[k] = (seq, a)
        lo = hi + 1
    # Steps 3-4: saliency of each token, and whether the pattern may be preceded by anything.
    seqs, lats = [], []
    order = sorted(found)
    for k in order:
        sub = found[k][0]
        seqs += [sub[:i] + [padding_id] + sub[i + 1:] for i in range(len(sub))] + [[padding_id] + sub]
        lats += [items[k][0]] * (len(sub) + 1)
    acts = _evaluate(act_fn, seqs, lats, counter)
    grouped: dict[int, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    used: dict[int, int] = defaultdict(int)
    at = 0
    for k in order:
        lat, _, act = items[k]
        sub, sub_act = found[k]
        replaced, padded = acts[at:at + len(sub)], acts[at + len(sub)]
        at += len(sub) + 1
        pattern = tuple(tok if 1 - a / sub_act >= cfg.saliency_threshold else WILDCARD
                        for tok, a in zip(sub, replaced))
        anchored = padded < cfg.keep_frac * act
        grouped[lat][(pattern, anchored)].append(sub_act / max_acts[lat])
        used[lat] += 1
    out = {}
    for lat in examples:
        pats = [Pattern(p, anc, sum(v) / len(v), len(v)) for (p, anc), v in grouped[lat].items()
                if sum(v) / len(v) >= cfg.min_value]
        out[lat] = (Explanation(pats), used[lat])
    return out


# ---- scoring ------------------------------------------------------------------------------
def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    nan = float("nan")
    prec = tp / (tp + fp) if tp + fp else nan
    rec = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return prec, rec, f1


def n2g_scores(pred_M: torch.Tensor, act_M: torch.Tensor, threshold: float) -> dict:
    """Counts, precision, recall, F1 and correlation of one latent over M scored positions.

    Predicted firing: ``pred > 0``; actual firing: ``act > threshold``. Undefined values are NaN.
    """
    p, a = pred_M > 0, act_M > threshold
    tp, fp, fn = int((p & a).sum()), int((p & ~a).sum()), int((~p & a).sum())
    prec, rec, f1 = _prf(tp, fp, fn)
    x, y = pred_M.double(), act_M.double()
    xc, yc = x - x.mean(), y - y.mean()
    den = (xc.pow(2).sum() * yc.pow(2).sum()).sqrt()
    corr = float((xc * yc).sum() / den) if den > 0 else float("nan")
    return {"precision": prec, "recall": rec, "f1": f1, "corr": corr, "tp": tp, "fp": fp, "fn": fn}


def _nanmean(values) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


# ---- splicing -----------------------------------------------------------------------------
def splice_latents(sae, latents_E: torch.Tensor, values_BTE: torch.Tensor | None, first: int,
                   keep_error: bool = False, zero_others: bool = False,
                   values_from: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit replacing positions >= first by the SAE reconstruction with latents E set to values.

    ``values_BTE`` None keeps the SAE's own values (a plain splice). The other latents keep their
    SAE values, or are 0 with ``zero_others`` (every latent simulated: N2G §4.4). Positions before
    ``values_from`` keep every latent's SAE value (a plain splice there). With ``keep_error`` the
    SAE's error ``x - SAE(x)`` is added back.
    """
    @torch.no_grad()
    def edit(x_BTD: torch.Tensor) -> torch.Tensor:
        x = x_BTD.to(sae.W_dec.dtype)
        x_n, state = sae.normalize_input(x)
        vals, idx, _ = sae.encode_topk(x_n)
        z = torch.zeros(*x.shape[:-1], sae.n_latents, dtype=vals.dtype, device=vals.device)
        if not zero_others:
            z.scatter_(-1, idx, vals)
        if values_BTE is not None:
            z[..., latents_E.to(z.device)] = values_BTE.to(z)
            z[:, :values_from] = 0
            z[:, :values_from].scatter_(-1, idx[:, :values_from], vals[:, :values_from])
        x_hat = sae.denormalize_output(z @ sae.W_dec + sae.b_dec, state)
        if keep_error:
            x_hat = x_hat + x - sae.denormalize_output(sae.decode_topk(vals, idx), state)
        out = x.clone()
        out[:, first:] = x_hat[:, first:]
        return out.to(x_BTD.dtype)
    return edit


# ---- the metric ---------------------------------------------------------------------------
def model_act_fn(lm, sae, hook: str, prepend_bos: bool, pad_id: int, batch: int) -> ActFn:
    @torch.no_grad()
    def act_fn(seqs: list[list[int]], lats: list[int]) -> list[float]:
        out: list[float] = []
        for s in range(0, len(seqs), batch):
            chunk, lat = seqs[s:s + batch], torch.tensor(lats[s:s + batch])
            pre = [lm.bos_token_id] if prepend_bos else []
            rows = [pre + q for q in chunk]
            L = max(len(r) for r in rows)
            toks = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows])
            acts = lm.activations(toks, hook)
            last = torch.tensor([len(r) - 1 for r in rows])
            x = acts[torch.arange(len(rows)), last.to(acts.device)].float()
            x_n, _ = sae.normalize_input(x.to(sae.W_dec.dtype))
            vals, idx, _ = sae.encode_topk(x_n)
            out += (vals * (idx == lat.to(idx.device)[:, None])).sum(-1).tolist()
        return out
    return act_fn


@torch.no_grad()
def _sparse_latents(lm, sae, tokens_NT: torch.Tensor, hook: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's kept values and indices ``[N, T, k]`` (CPU, float32) on every token of ``tokens_NT``."""
    vals, idx = [], []
    for i in range(0, tokens_NT.shape[0], batch):
        x = lm.activations(tokens_NT[i:i + batch], hook).to(sae.W_dec.device, sae.W_dec.dtype)
        v, j, _ = sae.encode_topk(sae.normalize_input(x)[0])
        vals.append(v.float().cpu())
        idx.append(j.cpu())
    return torch.cat(vals), torch.cat(idx)


def _columns(vals: torch.Tensor, idx: torch.Tensor, lats: torch.Tensor) -> torch.Tensor:
    """Dense values ``[N, T, E]`` of latents ``lats`` from kept values and indices ``[N, T, k]``."""
    out = torch.zeros(*vals.shape[:-1], lats.numel())
    for e, lat in enumerate(lats.tolist()):
        out[..., e] = (vals * (idx == lat)).sum(-1)
    return out


def padding_id(tokenizer, text: str, name: str = "padding_token") -> int:
    """The one token of ``text``; ``name``: the setting it comes from, as the message names it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:  # the default named as such: the user may never have typed it
        default = " (the default)" if text == N2GConfig.padding_token else ""
        raise ValueError(f"{name} {text!r}{default} is {len(ids)} tokens for this tokenizer; pick a single-token text")
    return ids[0]


@torch.no_grad()
def run_n2g(lm, sae, tokens_NT: torch.Tensor, cfg: N2GConfig | None = None, *,
            documents: torch.Tensor | None = None) -> dict:
    """Build N2G explanations on some contexts, score and splice them on the others (module docstring);
    ``documents``: the document of each context (None: the contexts are taken to be independent)."""
    cfg = cfg or N2GConfig()
    t0 = time.perf_counter()
    tokens_NT = check_tokens(tokens_NT)
    check_documents(documents, tokens_NT)
    documents = resampled_documents(documents)
    hook = resolve_hook(lm, sae, cfg.hook)
    first = first_position(sae, cfg.exclude_first)
    s0 = 1 if sae.cfg.prepend_bos else 0  # where the text starts: a pattern's "start of context"
    lo = max(first, s0)
    build, held, held_documents = _build_and_held(tokens_NT, documents, cfg)
    held_documents = resampled_documents(held_documents)  # held out in one document: its contexts are the units
    pad_id = padding_id(lm.tokenizer, cfg.padding_token)
    check_latents(cfg.latents, sae.n_latents)

    vals_b, idx_b = _sparse_latents(lm, sae, build, hook, cfg.lm_batch_size)
    vals_b[:, :lo] = 0
    lats, max_acts = _latents_to_explain(vals_b, idx_b, sae.n_latents, cfg)
    examples = _top_examples(_columns(vals_b, idx_b, lats), build, lats, s0, cfg.n_examples)
    counter = [0]
    act_fn = model_act_fn(lm, sae, hook, sae.cfg.prepend_bos, pad_id, cfg.seq_batch_size)
    expl = build_explanations(examples, act_fn, max_acts, cfg, pad_id, counter)
    t_build = time.perf_counter()

    z_h = _columns(*_sparse_latents(lm, sae, held, hook, cfg.lm_batch_size), lats)
    pred = _predictions(expl, held, lats, s0)
    per_latent, tot = _score_latents(lm, expl, pred, z_h, lats, max_acts, lo, cfg)
    E = lats.numel()
    micro = _prf(tot["tp"], tot["fp"], tot["fn"])
    splice, per_ctx = _splice(lm, sae, held, hook, lats, pred, max_acts, (first, s0), cfg) if cfg.splice and E else (None, {})
    if splice:
        splice.update(_simulated(per_latent, sae.n_latents))
    thresholds = torch.tensor([cfg.firing_frac * max_acts[int(l)] for l in lats])
    per_ctx.update(context_counts(pred[:, lo:], z_h[:, lo:], thresholds))
    t_end = time.perf_counter()
    return {
        "metric": "n2g", "hook": hook, "config": config_dict(cfg), "n_explained": E,
        "n_build_contexts": int(build.shape[0]), "n_eval_contexts": int(held.shape[0]),
        **{k: json_float(_nanmean(r[k] for r in per_latent)) for k in ("precision", "recall", "f1", "corr")},
        "micro": {"precision": json_float(micro[0]), "recall": json_float(micro[1]),
                  "f1": json_float(micro[2]), **tot},
        "mean_patterns": json_float(_nanmean(float(r["n_patterns"]) for r in per_latent)),
        "per_latent": per_latent, "splice": splice,
        "intervals": _intervals(by_document(per_ctx, held_documents), cfg) if E else {},
        "interval_groups": "contexts" if held_documents is None else "documents",
        "interval_method": INTERVAL_METHOD,
        "n_model_sequences": counter[0], "build_s": t_build - t0, "eval_s": t_end - t_build, "wall_s": t_end - t0,
    }


def _build_and_held(tokens_NT: torch.Tensor, documents: torch.Tensor | None, cfg: N2GConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The build and held-out contexts, and the held-out ones' documents. With ``documents``, whole documents go
    to each side (a pattern learnt from one part of an article is not scored on another part of it), else the
    last ``heldout_frac`` of the contexts are held out, as they are when all come from one document."""
    N = tokens_NT.shape[0]
    n_eval = max(1, round(N * cfg.heldout_frac))
    if n_eval >= N:
        raise ValueError(f"need at least 2 contexts to split into build and held-out parts, got {N}")
    build = None if documents is None else split_by_group(documents, cfg.heldout_frac,
                                                          torch.Generator().manual_seed(cfg.seed))
    if build is None:
        build = torch.arange(N) < N - n_eval
        return tokens_NT[build], tokens_NT[~build], None if documents is None else documents[~build]
    return tokens_NT[build], tokens_NT[~build], documents.cpu()[~build]


def _latents_to_explain(vals_b, idx_b, n_latents: int, cfg: N2GConfig) -> tuple[torch.Tensor, dict[int, float]]:
    """The latents to explain (cfg.latents, or a seeded sample of those that fire on the build split)
    and every chosen latent's max activation there."""
    max_all = torch.zeros(n_latents).scatter_reduce_(0, idx_b.flatten(), vals_b.flatten(), reduce="amax")
    if cfg.latents:
        lats = torch.tensor(sorted({int(l) for l in cfg.latents}), dtype=torch.long)
    else:
        lats = (max_all > 0).nonzero().squeeze(1)
        if cfg.n_latents and lats.numel() > cfg.n_latents:
            g = torch.Generator().manual_seed(cfg.seed)
            lats = lats[torch.randperm(lats.numel(), generator=g)[: cfg.n_latents]].sort().values
    return lats, {int(l): float(max_all[l]) for l in lats}


def _top_examples(z_b: torch.Tensor, build: torch.Tensor, lats: torch.Tensor, s0: int,
                  n_examples: int) -> dict[int, list[tuple[list[int], float]]]:
    """Per latent, its n_examples best build contexts, each cut after its max position."""
    ctx_max, ctx_arg = z_b.max(dim=1)  # [Nb, E]
    examples: dict[int, list[tuple[list[int], float]]] = {}
    for e, lat in enumerate(lats.tolist()):
        top = ctx_max[:, e].argsort(descending=True)[:n_examples]
        examples[lat] = [(build[c, s0:int(ctx_arg[c, e]) + 1].tolist(), float(ctx_max[c, e]))
                         for c in top.tolist() if ctx_max[c, e] > 0]
    return examples


def _predictions(expl: dict, held: torch.Tensor, lats: torch.Tensor, s0: int) -> torch.Tensor:
    """The explanations' predicted activations (fractions of the max) on the held-out contexts [N, T, E]."""
    n_eval, T = held.shape
    pred = torch.zeros(n_eval, T, lats.numel())
    for e, lat in enumerate(lats.tolist()):
        ex = expl[lat][0]
        for c in range(n_eval):
            pred[c, s0:, e] = torch.tensor(ex.predict(held[c, s0:].tolist()))
    return pred


def _score_latents(lm, expl: dict, pred: torch.Tensor, z_h: torch.Tensor, lats: torch.Tensor,
                   max_acts: dict[int, float], lo: int, cfg: N2GConfig) -> tuple[list[dict], dict[str, int]]:
    """Each latent's precision / recall / F1 and its reported patterns; the summed confusion counts."""
    strs: dict = {}
    per_latent = []
    tot = {"tp": 0, "fp": 0, "fn": 0}
    for e, lat in enumerate(lats.tolist()):
        m = max_acts[lat]
        sc = n2g_scores(pred[:, lo:, e].flatten() * m, z_h[:, lo:, e].flatten(), cfg.firing_frac * m)
        for k in tot:
            tot[k] += sc[k]
        ex, n_used = expl[lat]
        pats = sorted(ex.patterns, key=lambda p: (-p.count, -p.value))[: cfg.max_patterns_reported]
        per_latent.append({
            "latent": lat, "max_act": m, "n_examples_used": n_used, "n_patterns": len(ex.patterns),
            **{k: (json_float(v) if isinstance(v, float) else v) for k, v in sc.items()},
            "patterns": [{"tokens": ["*" if t == WILDCARD else token_strings(lm.tokenizer, [t], strs)[0] for t in p.ids],
                          "ids": list(p.ids), "anchored": p.anchored, "value": p.value, "count": p.count}
                         for p in pats],
        })
    return per_latent, tot


# ---- reading a result back ----------------------------------------------------------------
RESULT_EXPECTED = ("the evals/n2g.json that `saelab eval RUN --suite paper` writes, or a JSON object with a "
                   "'per_latent' list of {latent, patterns: [{tokens, anchored, value, count}], precision, recall, "
                   "f1}")
"""What an N2G result file is, for the refusals of one that is not."""
PATTERN_EXPECTED = "{tokens: [text, ...], anchored: true or false, value, count}"
"""One pattern of a ``per_latent`` entry, as :func:`_score_latents` writes it (its ids are not read back)."""


def read_result_json(path: Path, name: str) -> Any:
    """The JSON in ``path``; a file that is no text or no JSON is refused (CheckpointError) naming it as ``name``
    and what an N2G result is."""
    return read_json_value(path, name, f"expected {RESULT_EXPECTED}")


def load_result(path: str | Path, n_latents: int | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """The checked ``per_latent`` entries (:func:`checked_per_latent`) of the ``run_n2g`` result saved as JSON
    at ``path``, or of the one the paper suite's evals/n2g.json holds as its "result". ``name``: how refusals
    name the file (the setting that gave it, say; default its path)."""
    path = Path(path).expanduser()
    name = name or str(path)
    data = read_result_json(path, name)
    if isinstance(data, dict) and isinstance(data.get("result"), dict):
        data = data["result"]
    return checked_per_latent(data, name, n_latents)


def checked_per_latent(result: Any, name: str, n_latents: int | None = None) -> list[dict[str, Any]]:
    """The ``per_latent`` entries of a ``run_n2g`` result read back, the whole list checked first: an entry
    that is no explanation, a latent given twice or (with ``n_latents``) one the SAE lacks is refused naming
    the result as ``name`` and the entry (CheckpointError; ConfigError for a latent out of range)."""
    if not isinstance(result, dict) or not isinstance(result.get("per_latent"), list):
        raise CheckpointError(f"{name}: not an N2G result; expected {RESULT_EXPECTED}")
    seen: dict[int, int] = {}
    for i, entry in enumerate(result["per_latent"]):
        problem = _entry_problem(entry)
        lat = entry.get("latent") if isinstance(entry, dict) else None
        where = f"per_latent[{i}]" + (f" (latent {lat})" if isinstance(lat, int) and not isinstance(lat, bool) else "")
        if problem is None and lat in seen:
            problem = f"latent {lat} is explained twice (also per_latent[{seen[lat]}]); expected one entry per latent"
        if problem is not None:
            raise CheckpointError(f"{name}: {where}: {problem}")
        seen[lat] = i
    if n_latents is not None:  # explanations of another SAE would be read as those of latents they do not describe
        check_latents(list(seen), n_latents, name=f"{name}: latent")
    return result["per_latent"]


def _entry_problem(entry: Any) -> str | None:
    """What keeps one ``per_latent`` entry from being an explanation as :func:`_score_latents` writes it, or None."""
    if not isinstance(entry, dict):
        return f"is {_shown(entry)}; expected an object {{latent, patterns: [{PATTERN_EXPECTED}, ...]}}"
    lat = entry.get("latent")
    if not isinstance(lat, int) or isinstance(lat, bool) or lat < 0:
        return f"latent is {_shown(lat) if 'latent' in entry else 'missing'}; expected a latent index (an integer >= 0)"
    for key in ("precision", "recall", "f1"):
        if entry.get(key) is not None and not _is_number(entry[key]):
            return f"{key} is {_shown(entry[key])}; expected a number or null"
    patterns = entry.get("patterns")
    if patterns is None:
        return None
    if not isinstance(patterns, list):
        return f"patterns is {_shown(patterns)}; expected a list of {PATTERN_EXPECTED}"
    for j, p in enumerate(patterns):
        if not isinstance(p, dict):
            return f"patterns[{j}] is {_shown(p)}; expected {PATTERN_EXPECTED}"
        tokens = p.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            found = _shown(tokens) if "tokens" in p else "missing"
            return f"patterns[{j}].tokens is {found}; expected a list of token texts"
        if p.get("anchored") is not None and not isinstance(p["anchored"], bool):
            return f"patterns[{j}].anchored is {_shown(p['anchored'])}; expected true or false"
        for key in ("value", "count"):
            if p.get(key) is not None and not _is_number(p[key]):
                return f"patterns[{j}].{key} is {_shown(p[key])}; expected a number or null"
    return None


def _shown(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[:width - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _intervals(per_ctx: dict[str, torch.Tensor], cfg: N2GConfig) -> dict:
    """Paired bootstrap intervals over the held-out contexts (module docstring)."""
    if cfg.n_boot == 0:
        return {}
    stats = {**INTERVAL_STATS, **(SPLICE_STATS if "ce_clean" in per_ctx else {})}
    out = paired_bootstrap(per_ctx, stats, n_boot=cfg.n_boot, level=cfg.ci_level, seed=cfg.seed)
    recovered = out.get("ce_recovered_partial")
    if recovered is not None and recovered["estimate"] is None:  # undefined: bounds from the draws it is defined on
        recovered.update(low=None, high=None)  # would read as its interval
    return out


SPLICES = {"sae": False, "n2g_partial": False, "zeroed": False, "n2g_all": True}
"""The spliced runs and whether latents without a given value are 0 (zero_others) in each."""


@torch.no_grad()
def _splice(lm, sae, held: torch.Tensor, hook: str, lats: torch.Tensor, pred: torch.Tensor,
            max_acts: dict[int, float], positions: tuple[int, int], cfg: N2GConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """The splice summary of the schema, and per held-out context sums of each run's CE (and counts).
    ``positions``: (first position replaced, first position predicted)."""
    # BOS, when the SAE reads it, is replaced in every run as the plain SAE splice (and downstream_metrics)
    # replaces it: N2G predicts nothing there, so the runs differ only where the explanations predict.
    first, s0 = positions
    scale = torch.tensor([max_acts[int(l)] for l in lats])
    per_ctx: dict[str, list[torch.Tensor]] = defaultdict(list)
    kl: dict[str, float] = defaultdict(float)
    for i in range(0, held.shape[0], cfg.lm_batch_size):
        toks = held[i:i + cfg.lm_batch_size]
        sim = pred[i:i + cfg.lm_batch_size] * scale
        clean = lm.logits(toks)
        values = {"sae": None, "n2g_partial": sim, "zeroed": torch.zeros_like(sim), "n2g_all": sim}
        for name, zero_others in SPLICES.items():
            edit = splice_latents(sae, lats, values[name], first, cfg.splice_error_term, zero_others, s0)
            ce_c, ce_e, kl_e = ce_and_kl(clean, lm.logits(toks, edits={hook: edit}), toks.to(clean.device), first)
            per_ctx[f"ce_{name}"].append(ce_e.double().reshape(toks.shape[0], -1).sum(1).cpu())
            kl[name] += float(kl_e.double().sum())
        per_ctx["ce_clean"].append(ce_c.double().reshape(toks.shape[0], -1).sum(1).cpu())
        per_ctx["n"].append(torch.full((toks.shape[0],), ce_c.numel() / toks.shape[0], dtype=torch.float64))
    totals = {k: torch.cat(v) for k, v in per_ctx.items()}
    count = int(totals["n"].sum())
    ce = {k: float(v.sum()) / count for k, v in totals.items() if k != "n"}
    return {
        **ce, **{f"delta_{k}": v - ce["ce_clean"] for k, v in ce.items() if k != "ce_clean"},
        **{f"kl_{k}": kl[k] / count for k in ("sae", "n2g_all", "n2g_partial")},
        "ce_recovered_partial": json_float(_recovered(*(torch.tensor(ce[k], dtype=torch.float64) for k in RECOVERED))),
        "n_predictions": count,
    }, totals


def _simulated(per_latent: list[dict], n_latents: int) -> dict[str, Any]:
    """How many latents the splices simulate: those with at least one pattern (a latent whose examples were
    all dropped predicts 0 everywhere, as a latent never explained)."""
    n = sum(1 for r in per_latent if r["n_patterns"] > 0)
    return {"n_simulated": n, "simulated_frac": n / n_latents}


RECOVERED = ("ce_zeroed", "ce_n2g_partial", "ce_sae")


def _recovered(zeroed: torch.Tensor, partial: torch.Tensor, sae: torch.Tensor) -> torch.Tensor:
    """ce_recovered_partial: (zeroed - partial) / (zeroed - sae), NaN where zeroing the explained latents does not
    raise CE above the SAE's (the scale from 0 to 1 is then undefined: 1.7 from two differences of noise)."""
    return ce_recovered(zeroed, partial, sae)


def _nanmean_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim (latents) of num / den where den > 0 (NaN when none is)."""
    r = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))
    return torch.nanmean(r, dim=-1)


INTERVAL_METHOD = "documents of the held-out contexts (those contexts where they lie in one document)"
"""How N2G's intervals are made, as its results record it (``interval_method``): a result
that records another or none is computed again, not reused (:func:`saelab.evals.bootstrap.earlier_intervals`)."""

INTERVAL_STATS = {
    "precision": lambda t: _nanmean_ratio(t["tp"], t["tp"] + t["fp"]),
    "recall": lambda t: _nanmean_ratio(t["tp"], t["tp"] + t["fn"]),
    "f1": lambda t: _nanmean_ratio(2 * t["tp"], 2 * t["tp"] + t["fp"] + t["fn"]),
}
SPLICE_STATS = {
    "delta_ce_sae": lambda t: (t["ce_sae"] - t["ce_clean"]) / t["n"],
    "delta_ce_n2g_all": lambda t: (t["ce_n2g_all"] - t["ce_clean"]) / t["n"],
    "delta_ce_n2g_partial": lambda t: (t["ce_n2g_partial"] - t["ce_clean"]) / t["n"],
    "n2g_all_minus_sae": lambda t: (t["ce_n2g_all"] - t["ce_sae"]) / t["n"],
    "delta_ce_zeroed": lambda t: (t["ce_zeroed"] - t["ce_clean"]) / t["n"],
    "zeroed_minus_sae": lambda t: (t["ce_zeroed"] - t["ce_sae"]) / t["n"],  # ce_recovered_partial's denominator
    "ce_recovered_partial": lambda t: _recovered(t["ce_zeroed"], t["ce_n2g_partial"], t["ce_sae"]),
}
"""Statistics of per held-out context totals: counts [E] per latent, and the splices' CE sums."""


def context_counts(pred_NTE: torch.Tensor, act_NTE: torch.Tensor, thresholds_E: torch.Tensor) -> dict[str, torch.Tensor]:
    """tp, fp, fn ``[N, E]`` of each context and latent (the counts of ``n2g_scores``, per context)."""
    p, a = pred_NTE > 0, act_NTE > thresholds_E
    return {"tp": (p & a).sum(1).double(), "fp": (p & ~a).sum(1).double(), "fn": (~p & a).sum(1).double()}
