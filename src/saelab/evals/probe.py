"""Held-out 1-D probe loss (after Gao et al. 2024, §4.2): how well the single best latent predicts a known
binary feature. Not the paper's quantity (its minimum over latents of each latent's 1-D logistic loss on
its own datasets): here the latent is chosen on train data and scored on held-out data, the fit has a
ridge penalty, and the tasks are saelab's own.

Definition pinned here (and in ``tests/test_evals_probe.py``):

- For each binary task, the examples (token positions, or whole texts for context tasks) are
  sampled, balancing the two classes when ``cfg.balance`` (then chance loss is ln 2), and split
  into a train part and a held-out part (``cfg.test_frac`` of the examples) *by group*: whole
  groups go to one side, so tokens of one paragraph never land in both (neighbouring tokens share
  most of their context, and a split by token would score the probe on near-copies of its train
  rows). Token tasks: a group is a paragraph, followed across the cuts between packed contexts
  (``probe_tasks.text_groups``; ``cfg.split_unit = "document"`` keeps whole documents instead);
  context tasks: each text. Groups are taken in random order into the held-out part until it
  holds ``round(test_frac * n)`` examples or more.
  Sampling and split are seeded by (``cfg.seed``, task name): a task's numbers do not depend on
  which other tasks run.
- For every latent ``i`` a 1-D logistic regression ``P(y=1) = sigmoid(w * f_i + b)`` is fit on the
  train part, where ``f_i`` is the latent standardized with train statistics, by minimizing
  ``mean CE + l2/2 * w^2`` (Newton's method with backtracking, all latents at once). Features are
  the encoder *pre-activations* by default (``cfg.features = "pre"``: ``W_enc^T (x - b_dec) +
  b_enc`` before TopK/ReLU), as the paper's probe definition uses; ``"post"`` probes the sparse
  latents themselves.
- The task's *probe loss* is the held-out cross-entropy (nats) of the latent with the lowest
  train loss (selection on train data, so the number is not biased low by picking on test data).
- The suite's probe loss is the mean over tasks. The same probe on each residual-stream channel
  (the SAE's input, standardized the same way) gives the baseline.
- Features and fits are computed in float64 (the channels are float32 activations, exact in
  float64; the latents' pre-activations are computed from them in float64 too, so a latent that
  reads one channel gives that channel's loss to ~1e-15, not to the 1e-9 of a float32 product).
- Intervals (``saelab.evals.bootstrap``, ``cfg.n_boot`` replicates, ``cfg.ci_level``): the
  held-out examples of a task are resampled by document when the contexts' documents are known (the
  eval draws give them: paragraphs of one article share its topic), else by group; the selected latent and channel and their fits stay
  fixed, so the interval covers the sampling of held-out text, not the selection. Paired: the
  latent and channel losses of a replicate are scored on the same draw. The mean over tasks
  averages the tasks' replicates (each task resampled on its own).

Result schema (``run_probe`` returns a JSON-serializable dict)::

    metric            "probe"
    hook, config      as used
    features          "pre" or "post"
    mean_loss         mean over tasks of the SAE probe loss (held-out CE, nats)
    mean_baseline_loss  the same for residual channels (None when cfg.baseline is False)
    mean_entropy      mean over tasks of the held-out label entropy (the loss of a constant probe)
    interval_groups   what the token tasks' intervals resample: "documents", or without the contexts'
                      documents the split's groups ("paragraphs", "documents"); context tasks: texts
    interval_method   how the intervals were made (INTERVAL_METHOD; an earlier saelab's result records none)
    intervals         {mean_loss, mean_baseline_loss, mean_loss_minus_baseline}: bootstrap intervals
                      {estimate, low, high, level, n_boot, n_groups, n_undefined} (baseline ones
                      absent without the baseline; {} when cfg.n_boot is 0)
    tasks             {task: TaskResult} for each task that had enough examples
    skipped           {task: reason} for tasks left out
    wall_s            wall time

    TaskResult = {loss, train_loss, latent (index of the selected latent), weight, bias
                  (on the standardized feature), baseline_loss, baseline_train_loss,
                  baseline_channel, entropy, base_rate (held-out positive fraction),
                  n_train, n_test, n_train_groups, n_test_groups,
                  intervals {loss, baseline_loss, loss_minus_baseline}}
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from saelab.evals._common import check_tokens, config_dict, first_position, json_float, resolve_hook, split_by_group
from saelab.evals.bootstrap import (
    check_documents,
    estimates,
    resampled_documents,
    group_totals,
    percentile_interval,
    ratio,
    replicate_statistics,
    resample_counts,
)
from saelab.data import token_documents
from saelab.evals.config import ProbeConfig
from saelab.utils.words import plural
from saelab.evals.probe_tasks import (
    ContextTask,
    label_tokens,
    load_hf_task,
    text_groups,
)

# ---- the 1-D logistic regressions -----------------------------------------------------------
def _objective(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean CE over rows (dim 0) plus the ridge term, one value per column."""
    return (F.softplus(z) - y * z).mean(0) + 0.5 * l2 * w * w


@torch.no_grad()
def fit_logistic_1d(X_NL: torch.Tensor, y_N: torch.Tensor, l2: float = 1e-3, steps: int = 30,
                    tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit ``sigmoid(w_l * X[:, l] + b_l)`` to ``y`` for every column ``l`` at once.

    Minimizes ``mean CE + l2/2 * w^2`` by Newton's method on (w, b) with a backtracking line
    search, starting from w = 0, b = logit(mean y), in float64. Returns ``w_L, b_L`` and the
    train cross-entropy ``ce_L`` (without the ridge term).
    """
    X = X_NL.double()
    y = y_N.double().unsqueeze(1)
    L = X.shape[1]
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(L, dtype=torch.float64, device=X.device)
    b = torch.full((L,), float(torch.log(rate / (1 - rate))), dtype=torch.float64, device=X.device)
    loss = _objective(X * w + b, y, w, l2)
    for _ in range(steps):
        z = X * w + b
        p = torch.sigmoid(z)
        r = p - y
        s = p * (1 - p)
        g_w = (r * X).mean(0) + l2 * w
        g_b = r.mean(0)
        h_ww = (s * X * X).mean(0) + l2
        h_wb = (s * X).mean(0)
        h_bb = s.mean(0) + 1e-12
        det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-30)
        d_w = (h_bb * g_w - h_wb * g_b) / det
        d_b = (h_ww * g_b - h_wb * g_w) / det
        decrease = g_w * d_w + g_b * d_b  # > 0 for a descent direction
        t = torch.ones(L, dtype=torch.float64, device=X.device)
        new_w, new_b, new_loss = w, b, loss
        pending = torch.ones(L, dtype=torch.bool, device=X.device)
        for _ in range(30):  # halve the step where the Armijo condition fails
            cw, cb = w - t * d_w, b - t * d_b
            cl = _objective(X * cw + cb, y, cw, l2)
            ok = pending & (cl <= loss - 1e-4 * t * decrease)
            new_w = torch.where(ok, cw, new_w)
            new_b = torch.where(ok, cb, new_b)
            new_loss = torch.where(ok, cl, new_loss)
            pending &= ~ok
            if not pending.any():
                break
            t = torch.where(pending, t / 2, t)
        improvement = (loss - new_loss).max()
        w, b, loss = new_w, new_b, new_loss
        if improvement <= tol:
            break
    ce = (F.softplus(X * w + b) - y * (X * w + b)).mean(0)
    return w, b, ce


def logistic_ce(X_NL: torch.Tensor, y_N: torch.Tensor, w_L: torch.Tensor, b_L: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of each column's fitted probe, ``[L]``."""
    z = X_NL.double() * w_L + b_L
    return (F.softplus(z) - y_N.double().unsqueeze(1) * z).mean(0)


def binary_entropy(p: float) -> float:
    """H(p) in nats (0 for p in {0, 1})."""
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def best_single_feature_probe(chunks: Iterator[tuple[int, torch.Tensor, torch.Tensor]], y_N: torch.Tensor,
                              train_N: torch.Tensor, l2: float = 1e-3, steps: int = 30,
                              tol: float = 1e-9) -> dict:
    """Fit every feature's 1-D probe on the train rows; select by train CE; report its held-out CE.

    ``chunks`` yields ``(first feature index, X_train [n_train, c], X_test [n_test, c])``; features
    are standardized here with train mean and std (a constant feature becomes 0). The result's
    ``test_losses`` are the selected probe's held-out cross-entropies, one per test row.
    """
    train_N = train_N.to(y_N.device)
    y_tr, y_te = y_N[train_N].double(), y_N[~train_N].double()
    best = {"train_loss": math.inf}
    for start, X_tr, X_te in chunks:
        X_tr, X_te = X_tr.double(), X_te.double()
        y_tr, y_te = y_tr.to(X_tr.device), y_te.to(X_te.device)  # features may live on an accelerator
        mu = X_tr.mean(0)
        sd = X_tr.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12 * (1 + mu.abs()), sd, torch.full_like(sd, math.inf))
        X_tr, X_te = (X_tr - mu) / sd, (X_te - mu) / sd
        w, b, ce_tr = fit_logistic_1d(X_tr, y_tr, l2, steps, tol)
        j = int(ce_tr.argmin())
        if float(ce_tr[j]) < best["train_loss"]:
            z = X_te[:, j] * w[j] + b[j]
            per_row = F.softplus(z) - y_te * z  # logistic_ce, row by row (for the intervals)
            best = {"train_loss": float(ce_tr[j]), "loss": float(per_row.mean()), "index": start + j,
                    "weight": float(w[j]), "bias": float(b[j]), "test_losses": per_row}
    return best


# ---- features -------------------------------------------------------------------------------
def _feature_chunks(sae, x_tr: torch.Tensor, x_te: torch.Tensor, kind: str, chunk: int):
    """Yield (start, F_train, F_test) for latent columns start..start+chunk of the SAE features.

    Computed in float64, the precision of the fits and of the channel baseline: a float32
    pre-activation rounds every value to 24 bits, which moves a probe's loss by ~1e-9 and would
    make a latent reading one channel score differently from that channel.
    """
    with torch.no_grad():
        W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
        c_tr = sae.normalize_input(x_tr.to(W_enc.device, torch.float64))[0] - b_dec
        c_te = sae.normalize_input(x_te.to(W_enc.device, torch.float64))[0] - b_dec
        if kind == "post":
            tk_tr, tk_te = sae.topk(c_tr @ W_enc + b_enc), sae.topk(c_te @ W_enc + b_enc)
        for start in range(0, sae.n_latents, chunk):
            cols = slice(start, min(start + chunk, sae.n_latents))
            if kind == "pre":
                W, b = W_enc[:, cols], b_enc[cols]
                yield start, c_tr @ W + b, c_te @ W + b
            else:
                yield start, _dense_cols(*tk_tr, cols), _dense_cols(*tk_te, cols)


def _dense_cols(vals: torch.Tensor, idx: torch.Tensor, cols: slice) -> torch.Tensor:
    out = torch.zeros(vals.shape[0], cols.stop - cols.start, dtype=vals.dtype, device=vals.device)
    inside = (idx >= cols.start) & (idx < cols.stop)
    rows = torch.arange(vals.shape[0], device=vals.device).unsqueeze(1).expand_as(idx)
    out[rows[inside], idx[inside] - cols.start] = vals[inside]
    return out


PROBE_STATS = {"loss": ratio("sae", "n"), "baseline_loss": ratio("base", "n"),
               "loss_minus_baseline": lambda t: (t["sae"] - t["base"]) / t["n"]}
"""Statistics of a task's held-out per-group totals (sum of CE of the latent, of the channel, count)."""


SPLIT_TRIES = 16
"""Random splits tried for one that puts both classes in train and in the held-out part."""
SPLIT_METHOD = "each part holds both classes; a paragraph within its document"
"""How a task's examples are split, as the paper suite records it: results of a probe that scored one-class
parts (which recorded nothing of it), or whose paragraphs ran on across a cut into another document's context
(recorded as "each part holds both classes"), are computed again."""


def _split_with_both_classes(groups_M: torch.Tensor, y_M: torch.Tensor, cfg: ProbeConfig, g: torch.Generator,
                             unit: str) -> torch.Tensor | str:
    """A train mask (split_by_group) whose two sides each hold both classes (the first of SPLIT_TRIES random
    splits that does), or why there is none: a side of one class has no loss to compare (a probe fits it exactly,
    or is scored on labels it never saw)."""
    for _ in range(SPLIT_TRIES):
        train = split_by_group(groups_M, cfg.test_frac, g)
        if train is None:
            return f"all examples come from one {unit}: no held-out text apart from the train text"
        if all(y_M[side].unique().numel() == 2 for side in (train, ~train)):
            return train
    pos_groups = torch.unique(groups_M[y_M == 1]).numel()
    neg_groups = torch.unique(groups_M[y_M == 0]).numel()
    return (f"no split of its {unit}s into train and held-out parts gave each part both classes "
            f"(positive examples in {pos_groups} {plural(pos_groups, unit)}, negative in {neg_groups} "
            f"{plural(neg_groups, unit)}; {SPLIT_TRIES} splits tried)")


def probe_task(sae, x_MD: torch.Tensor, y_M: torch.Tensor, cfg: ProbeConfig, g: torch.Generator,
               groups_M: torch.Tensor | None = None, unit: str | None = None,
               documents_M: torch.Tensor | None = None) -> tuple[dict, dict[str, torch.Tensor]] | str:
    """Probe one task given its examples' hook activations, labels and groups (each example its own
    group when None). Returns the TaskResult of the schema (without intervals) and the held-out loss totals
    per document (``documents_M``: each example's; None: per group), or why the task is skipped: its examples
    hold fewer than two groups, or no split gives both classes to both parts. ``unit``: what a group is, for
    that reason (default ``cfg.split_unit``)."""
    groups_M = torch.arange(x_MD.shape[0]) if groups_M is None else groups_M.cpu()
    y_M = y_M.cpu()
    train = _split_with_both_classes(groups_M, y_M, cfg, g, unit or cfg.split_unit)
    if isinstance(train, str):
        return train
    x_tr, x_te = x_MD[train.to(x_MD.device)], x_MD[~train.to(x_MD.device)]
    res = best_single_feature_probe(_feature_chunks(sae, x_tr, x_te, cfg.features, cfg.latent_chunk),
                                    y_M, train, cfg.l2, cfg.newton_steps, cfg.tol)
    rate = float(y_M[~train].double().mean())
    out = {"loss": res["loss"], "train_loss": res["train_loss"], "latent": res["index"],
           "weight": res["weight"], "bias": res["bias"], "baseline_loss": None, "baseline_train_loss": None,
           "baseline_channel": None, "entropy": binary_entropy(rate), "base_rate": rate,
           "n_train": int(train.sum()), "n_test": int((~train).sum()),
           "n_train_groups": int(torch.unique(groups_M[train]).numel()),
           "n_test_groups": int(torch.unique(groups_M[~train]).numel())}
    losses = {"sae": res["test_losses"]}
    if cfg.baseline:
        base = best_single_feature_probe(iter([(0, x_tr, x_te)]), y_M, train, cfg.l2, cfg.newton_steps, cfg.tol)
        out.update(baseline_loss=base["loss"], baseline_train_loss=base["train_loss"], baseline_channel=base["index"])
        losses["base"] = base["test_losses"]
    return out, group_totals((groups_M if documents_M is None else documents_M.cpu())[~train], losses)


INTERVAL_METHOD = ("token tasks: the documents of the probe's contexts (the split's groups where they lie in one "
                   "document); context tasks: texts")
"""How the probe's intervals are made, as its results record it (``interval_method``): a result
that records another or none is computed again, not reused (:func:`saelab.evals.bootstrap.earlier_intervals`)."""


def probe_intervals(totals: dict[str, dict[str, torch.Tensor]], cfg: ProbeConfig) -> tuple[dict, dict]:
    """Bootstrap intervals of each task (``{task: {stat: interval}}``) and of the means over tasks.

    Each task's held-out groups are resampled with its own seeded generator; replicate b of the
    mean is the mean of the tasks' replicates b.
    """
    if cfg.n_boot == 0 or not totals:
        return {t: {} for t in totals}, {}
    stats = {k: f for k, f in PROBE_STATS.items() if k == "loss" or cfg.baseline}
    per_task, reps = {}, {}
    for task, per_group in totals.items():
        G = per_group["n"].shape[0]
        counts = resample_counts(G, cfg.n_boot, _task_generator(cfg.seed, task, 2))
        reps[task] = replicate_statistics(per_group, stats, counts)
        est = estimates(per_group, stats)
        per_task[task] = {k: percentile_interval(est[k], reps[task][k], cfg.ci_level, G) for k in stats}
    mean = {}
    for k in stats:
        est = sum(per_task[t][k]["estimate"] for t in totals) / len(totals)
        rep = torch.stack([reps[t][k] for t in totals]).mean(0)
        mean[f"mean_{k}"] = percentile_interval(est, rep, cfg.ci_level, sum(v["n"].numel() for v in totals.values()))
    return per_task, mean


def _sample_examples(labels: torch.Tensor, cfg: ProbeConfig, g: torch.Generator) -> tuple[torch.Tensor, str | None]:
    """Indices (into the flattened labels) of the examples used, or a reason to skip the task."""
    flat = labels.flatten()
    pos = (flat == 1).nonzero().squeeze(1)
    neg = (flat == 0).nonzero().squeeze(1)
    if min(pos.numel(), neg.numel()) < cfg.min_per_class:
        return torch.empty(0, dtype=torch.long), f"{pos.numel()} positive / {neg.numel()} negative examples " \
                                                 f"(need {cfg.min_per_class} of each)"
    pos = pos[torch.randperm(pos.numel(), generator=g)]
    neg = neg[torch.randperm(neg.numel(), generator=g)]
    if cfg.balance:
        m = min(pos.numel(), neg.numel(), cfg.max_examples // 2)
        idx = torch.cat([pos[:m], neg[:m]])
    else:
        both = torch.cat([pos, neg])
        idx = both[torch.randperm(both.numel(), generator=g)[: cfg.max_examples]]
    return idx.sort().values, None


def _task_generator(seed: int, task: str, stream: int = 0) -> torch.Generator:
    """A generator per (seed, task, use): a task's examples and split do not depend on the other tasks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(task.encode()) * 2 + stream) % 2**63)


@torch.no_grad()
def _context_task_activations(lm, hook: str, task: ContextTask, context_size: int, prepend_bos: bool,
                              pool: str, batch_size: int) -> torch.Tensor:
    rows = []
    ids = lm.tokenize(task.texts)
    for i in range(len(ids)):
        toks = ids[i][: context_size - int(prepend_bos)] or [lm.bos_token_id]
        if prepend_bos:
            toks = [lm.bos_token_id] + toks
        acts = lm.activations(torch.tensor([toks]), hook)[0].float().cpu()
        body = acts[int(prepend_bos):] if acts.shape[0] > int(prepend_bos) else acts
        rows.append(body[-1] if pool == "last" else body.mean(0))
    return torch.stack(rows)


Examples = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""{task: (hook activations [M, D], labels [M], group of each example [M], document of each example [M] or
None: the unit its intervals resample, when it is not the group)}."""


@torch.no_grad()
def _token_examples(lm, sae, tokens_NT: torch.Tensor, hook: str, cfg: ProbeConfig,
                    skipped: dict[str, str], documents_N: torch.Tensor | None) -> Examples:
    """The sampled examples of the token tasks, with the paragraph (or document) of each, and the document
    of each when the contexts' ``documents_N`` are known."""
    first = first_position(sae, cfg.exclude_first)
    labels = label_tokens(lm.tokenizer, tokens_NT, cfg.tasks) if cfg.tasks else {}
    picks: dict[str, torch.Tensor] = {}
    for name, lab in labels.items():
        lab = lab.clone()
        lab[:, :first] = -1
        idx, reason = _sample_examples(lab, cfg, _task_generator(cfg.seed, name))
        if reason:
            skipped[name] = reason
        else:
            picks[name] = idx
    if not picks:
        return {}
    # One truncated forward per batch of contexts that holds any picked example.
    T = tokens_NT.shape[1]
    ctx_needed = torch.unique(torch.cat(list(picks.values())) // T)
    acts: dict[int, torch.Tensor] = {}
    for i in range(0, ctx_needed.numel(), cfg.lm_batch_size):
        cs = ctx_needed[i:i + cfg.lm_batch_size]
        a = lm.activations(tokens_NT[cs], hook).float().cpu()
        for j, c in enumerate(cs.tolist()):
            acts[c] = a[j]
    docs_NT = None if documents_N is None else token_documents(tokens_NT, documents_N, lm.bos_token_id,
                                                               sae.cfg.prepend_bos)
    groups = text_groups(lm.tokenizer, tokens_NT, sae.cfg.prepend_bos, cfg.split_unit,
                         documents_NT=docs_NT).flatten()
    docs = None if docs_NT is None else docs_NT.flatten()
    if docs is not None and cfg.split_unit == "document":
        groups = docs  # exact where the draw's contexts are not neighbours in the corpus
    return {name: (torch.stack([acts[int(k) // T][int(k) % T] for k in idx]), labels[name].flatten()[idx],
                   groups[idx], None if docs is None else docs[idx]) for name, idx in picks.items()}


@torch.no_grad()
def _context_examples(lm, sae, hook: str, tasks: Sequence[ContextTask], cfg: ProbeConfig,
                      skipped: dict[str, str]) -> Examples:
    """The sampled examples of the context tasks; each text is its own group."""
    out = {}
    for task in tasks:
        y = torch.tensor(task.labels)
        n_pos = int(y.sum())
        if min(n_pos, y.numel() - n_pos) < cfg.min_per_class:
            skipped[task.name] = f"{n_pos} positive / {y.numel() - n_pos} negative texts"
            continue
        x = _context_task_activations(lm, hook, task, sae.cfg.context_size, sae.cfg.prepend_bos, cfg.pool,
                                      cfg.lm_batch_size)
        idx, _ = _sample_examples(y.to(torch.int8), cfg, _task_generator(cfg.seed, task.name))
        out[task.name] = (x[idx], y[idx], idx, None)
    return out


@torch.no_grad()
def run_probe(lm, sae, tokens_NT: torch.Tensor, cfg: ProbeConfig | None = None, *,
              context_tasks: Sequence[ContextTask] = (), documents: torch.Tensor | None = None) -> dict:
    """Probe loss of ``sae`` on the token tasks of ``tokens_NT`` (plus context tasks); see the module docstring.
    ``documents``: the document of each context, which the token tasks' intervals resample (None: their groups).
    Paragraphs are followed across cuts between neighbouring contexts: give the contexts in corpus order."""
    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    tokens_NT = check_tokens(tokens_NT)
    check_documents(documents, tokens_NT)
    documents = resampled_documents(documents)
    hook = resolve_hook(lm, sae, cfg.hook)
    skipped: dict[str, str] = {}
    examples = _token_examples(lm, sae, tokens_NT, hook, cfg, skipped, documents)
    all_ctx = list(context_tasks) + [load_hf_task(n) for n in cfg.hf_tasks]
    examples.update(_context_examples(lm, sae, hook, all_ctx, cfg, skipped))
    context_names = {task.name for task in all_ctx}
    results, totals = {}, {}
    for name, (x, y, groups, docs) in examples.items():
        done = probe_task(sae, x.to(sae.W_dec.device), y, cfg, _task_generator(cfg.seed, name, 1), groups,
                          "text" if name in context_names else None, docs)  # a context task's examples: whole texts
        if isinstance(done, str):
            skipped[name] = done
            continue
        results[name], totals[name] = done
    per_task, mean_intervals = probe_intervals(totals, cfg)

    def mean_of(key):
        vals = [r[key] for r in results.values() if r[key] is not None]
        return json_float(sum(vals) / len(vals)) if vals else None

    return {
        "metric": "probe",
        "hook": hook,
        "config": config_dict(cfg),
        "features": cfg.features,
        "mean_loss": mean_of("loss"),
        "mean_baseline_loss": mean_of("baseline_loss") if cfg.baseline else None,
        "mean_entropy": mean_of("entropy"),
        "intervals": mean_intervals,
        "interval_groups": f"{cfg.split_unit}s" if documents is None else "documents",
        "interval_method": INTERVAL_METHOD,
        "tasks": {k: {**{kk: (json_float(v) if isinstance(v, float) else v) for kk, v in r.items()},
                      "intervals": per_task[k]} for k, r in results.items()},
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
