"""Probe loss (Gao et al. 2024): how well the single best latent predicts a known binary feature.

Definition pinned here (and in ``tests/test_evals_probe.py``):

- For each binary task, the examples (token positions, or whole texts for context tasks) are
  split at random into a train part and a held-out part (``cfg.test_frac``), after balancing the
  two classes when ``cfg.balance`` (then chance loss is ln 2). Sampling and split are seeded by
  (``cfg.seed``, task name): a task's numbers do not depend on which other tasks run.
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

Result schema (``run_probe`` returns a JSON-serializable dict)::

    metric            "probe"
    hook, config      as used
    features          "pre" or "post"
    mean_loss         mean over tasks of the SAE probe loss (held-out CE, nats)
    mean_baseline_loss  the same for residual channels (None when cfg.baseline is False)
    mean_entropy      mean over tasks of the held-out label entropy (the loss of a constant probe)
    tasks             {task: TaskResult} for each task that had enough examples
    skipped           {task: reason} for tasks left out
    wall_s            wall time

    TaskResult = {loss, train_loss, latent (index of the selected latent), weight, bias
                  (on the standardized feature), baseline_loss, baseline_train_loss,
                  baseline_channel, entropy, base_rate (held-out positive fraction),
                  n_train, n_test}
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from saelab.evals._common import check_tokens, config_dict, first_position, json_float, resolve_hook
from saelab.evals.probe_tasks import DEFAULT_TASKS, ContextTask, label_tokens, load_hf_task

FEATURES = ("pre", "post")


@dataclass
class ProbeConfig:
    """Settings of the probe-loss metric."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Offline token tasks to run (names in saelab.evals.probe_tasks.TOKEN_TASKS)."""
    hf_tasks: tuple[str, ...] = ()
    """Hugging Face datasets ('name' or 'name:config', text + binary label) run as context tasks."""
    features: str = "pre"
    """'pre': encoder pre-activations (paper); 'post': the latents after TopK and ReLU."""
    baseline: bool = True
    """Also probe each residual-stream channel (the SAE input) as the baseline."""
    max_examples: int = 2000
    """Examples per task at most (after balancing), drawn at random."""
    min_per_class: int = 100
    """Tasks with fewer examples of either class are skipped (with few examples, picking the best of
    n latents overfits: the held-out loss can exceed the label entropy)."""
    balance: bool = True
    """Use as many negatives as positives (chance loss ln 2)."""
    test_frac: float = 0.3
    """Fraction of each task's examples held out for the reported loss."""
    l2: float = 1e-3
    """Ridge penalty l2/2 * w^2 on the weight of the standardized feature (keeps separable fits finite)."""
    newton_steps: int = 30
    """Newton iterations at most."""
    tol: float = 1e-9
    """Stop when no latent's loss improves by more than this."""
    latent_chunk: int = 2048
    """Latents fit together (memory: examples x chunk float64 values)."""
    pool: str = "last"
    """Context tasks: 'last' token's activation or 'mean' over the text's tokens."""
    lm_batch_size: int = 8
    """Contexts per LM forward."""
    seed: int = 0
    """Seed of example sampling and the train/test split."""
    exclude_first: bool | None = None
    """Leave position 0 out of token tasks; None = follow the SAE's cfg.exclude_first."""
    hook: str | None = None
    """Hook the SAE reads; None = the SAE's cfg.hook_name."""

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if not 0 < self.test_frac < 1:
            raise ValueError(f"test_frac must be in (0, 1), got {self.test_frac}")
        if self.pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {self.pool!r}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")


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
    are standardized here with train mean and std (a constant feature becomes 0).
    """
    y_tr, y_te = y_N[train_N].double(), y_N[~train_N].double()
    best = {"train_loss": math.inf}
    for start, X_tr, X_te in chunks:
        X_tr, X_te = X_tr.double(), X_te.double()
        mu = X_tr.mean(0)
        sd = X_tr.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12 * (1 + mu.abs()), sd, torch.full_like(sd, math.inf))
        X_tr, X_te = (X_tr - mu) / sd, (X_te - mu) / sd
        w, b, ce_tr = fit_logistic_1d(X_tr, y_tr, l2, steps, tol)
        j = int(ce_tr.argmin())
        if float(ce_tr[j]) < best["train_loss"]:
            ce_te = logistic_ce(X_te[:, j:j + 1], y_te, w[j:j + 1], b[j:j + 1])
            best = {"train_loss": float(ce_tr[j]), "loss": float(ce_te[0]), "index": start + j,
                    "weight": float(w[j]), "bias": float(b[j])}
    return best


# ---- features -------------------------------------------------------------------------------
def _feature_chunks(sae, x_tr: torch.Tensor, x_te: torch.Tensor, kind: str, chunk: int):
    """Yield (start, F_train, F_test) for latent columns start..start+chunk of the SAE features."""
    with torch.no_grad():
        xn_tr = sae.normalize_input(x_tr.to(sae.W_dec.dtype))[0]
        xn_te = sae.normalize_input(x_te.to(sae.W_dec.dtype))[0]
        if kind == "post":
            tk_tr, tk_te = sae.topk(sae.pre_acts(xn_tr)), sae.topk(sae.pre_acts(xn_te))
        c_tr, c_te = xn_tr - sae.b_dec, xn_te - sae.b_dec
        for start in range(0, sae.n_latents, chunk):
            cols = slice(start, min(start + chunk, sae.n_latents))
            if kind == "pre":
                W, b = sae.W_enc[:, cols], sae.b_enc[cols]
                yield start, c_tr @ W + b, c_te @ W + b
            else:
                yield start, _dense_cols(*tk_tr, cols), _dense_cols(*tk_te, cols)


def _dense_cols(vals: torch.Tensor, idx: torch.Tensor, cols: slice) -> torch.Tensor:
    out = torch.zeros(vals.shape[0], cols.stop - cols.start, dtype=vals.dtype, device=vals.device)
    inside = (idx >= cols.start) & (idx < cols.stop)
    rows = torch.arange(vals.shape[0], device=vals.device).unsqueeze(1).expand_as(idx)
    out[rows[inside], idx[inside] - cols.start] = vals[inside]
    return out


def _split(n: int, test_frac: float, g: torch.Generator) -> torch.Tensor:
    """A boolean train mask with round(n * test_frac) (at least 1) held-out rows."""
    n_test = min(max(1, round(n * test_frac)), n - 1)
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:n_test]] = False
    return mask


def probe_task(sae, x_MD: torch.Tensor, y_M: torch.Tensor, cfg: ProbeConfig, g: torch.Generator) -> dict:
    """Probe one task given its examples' hook activations and labels (TaskResult of the schema)."""
    train = _split(x_MD.shape[0], cfg.test_frac, g)
    x_tr, x_te = x_MD[train], x_MD[~train]
    res = best_single_feature_probe(_feature_chunks(sae, x_tr, x_te, cfg.features, cfg.latent_chunk),
                                    y_M, train, cfg.l2, cfg.newton_steps, cfg.tol)
    rate = float(y_M[~train].double().mean())
    out = {"loss": res["loss"], "train_loss": res["train_loss"], "latent": res["index"],
           "weight": res["weight"], "bias": res["bias"], "baseline_loss": None, "baseline_train_loss": None,
           "baseline_channel": None, "entropy": binary_entropy(rate), "base_rate": rate,
           "n_train": int(train.sum()), "n_test": int((~train).sum())}
    if cfg.baseline:
        base = best_single_feature_probe(iter([(0, x_tr, x_te)]), y_M, train, cfg.l2, cfg.newton_steps, cfg.tol)
        out.update(baseline_loss=base["loss"], baseline_train_loss=base["train_loss"], baseline_channel=base["index"])
    return out


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


@torch.no_grad()
def run_probe(lm, sae, tokens_NT: torch.Tensor, cfg: ProbeConfig | None = None, *,
              context_tasks: Sequence[ContextTask] = ()) -> dict:
    """Probe loss of ``sae`` on the token tasks of ``tokens_NT`` (plus context tasks); see the module docstring."""
    cfg = cfg or ProbeConfig()
    t0 = time.perf_counter()
    tokens_NT = check_tokens(tokens_NT)
    hook = resolve_hook(lm, sae, cfg.hook)
    first = first_position(sae, cfg.exclude_first)
    labels = label_tokens(lm.tokenizer, tokens_NT, cfg.tasks) if cfg.tasks else {}
    picks: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for name, lab in labels.items():
        lab = lab.clone()
        lab[:, :first] = -1
        idx, reason = _sample_examples(lab, cfg, _task_generator(cfg.seed, name))
        if reason:
            skipped[name] = reason
        else:
            picks[name] = idx
    # One truncated forward per batch of contexts that holds any picked example.
    T = tokens_NT.shape[1]
    needed = torch.unique(torch.cat(list(picks.values()))) if picks else torch.empty(0, dtype=torch.long)
    ctx_needed = torch.unique(needed // T)
    acts: dict[int, torch.Tensor] = {}
    for i in range(0, ctx_needed.numel(), cfg.lm_batch_size):
        cs = ctx_needed[i:i + cfg.lm_batch_size]
        a = lm.activations(tokens_NT[cs], hook).float().cpu()
        for j, c in enumerate(cs.tolist()):
            acts[c] = a[j]

    results = {}
    for name, idx in picks.items():
        x = torch.stack([acts[int(k) // T][int(k) % T] for k in idx]).to(sae.W_dec.device)
        y = labels[name].flatten()[idx].to(x.device)
        results[name] = probe_task(sae, x, y, cfg, _task_generator(cfg.seed, name, 1))

    all_ctx = list(context_tasks) + [load_hf_task(n) for n in cfg.hf_tasks]
    for task in all_ctx:
        y = torch.tensor(task.labels)
        n_pos = int(y.sum())
        if min(n_pos, y.numel() - n_pos) < cfg.min_per_class:
            skipped[task.name] = f"{n_pos} positive / {y.numel() - n_pos} negative texts"
            continue
        x = _context_task_activations(lm, hook, task, sae.cfg.context_size, sae.cfg.prepend_bos, cfg.pool,
                                      cfg.lm_batch_size)
        idx, _ = _sample_examples(y.to(torch.int8), cfg, _task_generator(cfg.seed, task.name))
        results[task.name] = probe_task(sae, x[idx].to(sae.W_dec.device), y[idx], cfg,
                                        _task_generator(cfg.seed, task.name, 1))

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
        "tasks": {k: {kk: (json_float(v) if isinstance(v, float) else v) for kk, v in r.items()}
                  for k, r in results.items()},
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }
