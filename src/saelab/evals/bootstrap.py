"""Paired cluster-bootstrap intervals, shared by the paper metrics (ablation sparsity, probe, N2G).

Definition pinned here (and in ``tests/test_evals_bootstrap.py``):

- The data come in ``G`` *groups* (clusters): the units that were sampled independently. Values
  inside one group may be correlated, so whole groups are resampled, never single values. Contexts
  of one document share its topic and style, so the metrics group by document when the contexts'
  documents are known (:func:`group_totals`; the eval draws give them), else by context.
- Every statistic is a function of *per-group totals* (sums over the group: a loss summed over the
  group's predictions, the number of predictions, counts of true positives...). A replicate draws
  ``G`` groups with replacement (``torch.randint`` with a seeded generator), adds the totals of the
  drawn groups (a group drawn twice counts twice) and evaluates each statistic on those sums. The
  estimate is the statistic of the plain totals (every group once).
- *Paired*: all statistics of one call see the same draws, so the interval of a difference
  (latent minus baseline, measured on the same groups) has the correlation between the two
  removed instead of adding two independent spreads.
- The interval is the percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
  quantiles of the replicates (``torch.quantile``, linear interpolation, as numpy's default).
  Replicates where the statistic is undefined (NaN, e.g. a precision with nothing predicted) are
  left out and counted (``n_undefined``).
- Fewer than 2 groups give no interval (``low`` and ``high`` None, ``n_boot`` 0): every draw of one
  group is that group, so the replicates would all equal the estimate and claim no uncertainty.

Result of one statistic (JSON-ready): ``{estimate, low, high, level, n_boot, n_groups, n_undefined}``.
Each metric's result records how its intervals were made (``interval_method``, the metric's ``INTERVAL_METHOD``):
one made otherwise, or by an earlier saelab that recorded none, is computed again rather than reused
(:func:`earlier_intervals`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from saelab.evals.config import DEFAULT_LEVEL, DEFAULT_N_BOOT, check_bootstrap_args
from saelab.utils.words import plural

Totals = Mapping[str, torch.Tensor]
"""Named totals; in a replicate each has a leading replicate dimension ``[B, ...]``."""
Statistic = Callable[[Totals], torch.Tensor]
"""Maps totals ``{name: [B, ...]}`` to one value per replicate ``[B]``."""


def resample_counts(n_groups: int, n_boot: int, generator: torch.Generator) -> torch.Tensor:
    """How many times each group is drawn in each replicate, ``[n_boot, n_groups]`` float64."""
    idx = torch.randint(n_groups, (n_boot, n_groups), generator=generator)
    counts = torch.zeros(n_boot, n_groups, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones_like(counts))


def replicate_statistics(per_group: Totals, statistics: Mapping[str, Statistic],
                         counts_BG: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each statistic on every replicate ``[B]``: totals are ``counts_BG @ per_group[name]``."""
    totals = {k: torch.tensordot(counts_BG, v.double().cpu(), dims=1) for k, v in per_group.items()}
    return {name: fn(totals).double().reshape(-1) for name, fn in statistics.items()}


def estimates(per_group: Totals, statistics: Mapping[str, Statistic]) -> dict[str, float]:
    """Each statistic on the plain totals (every group once)."""
    n_groups = next(iter(per_group.values())).shape[0]
    ones = torch.ones(1, n_groups, dtype=torch.float64)
    return {k: float(v[0]) for k, v in replicate_statistics(per_group, statistics, ones).items()}


def percentile_interval(estimate: float, replicates_B: torch.Tensor, level: float, n_groups: int) -> dict:
    """The JSON-ready interval of one statistic from its replicates (module docstring)."""
    if n_groups < 2:  # one group redrawn is itself: a zero-width interval
        replicates_B = replicates_B[:0]
    ok = replicates_B[~replicates_B.isnan()]
    lo = hi = None
    if ok.numel():
        q = torch.quantile(ok, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ok.dtype))
        lo, hi = float(q[0]), float(q[1])
    est = float(estimate)
    return {"estimate": est if est == est else None, "low": lo, "high": hi, "level": level,
            "n_boot": int(replicates_B.numel()), "n_groups": n_groups,
            "n_undefined": int(replicates_B.numel() - ok.numel())}


def paired_bootstrap(per_group: Totals, statistics: Mapping[str, Statistic], *, n_boot: int = DEFAULT_N_BOOT,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> dict[str, dict]:
    """Percentile intervals of ``statistics`` of the per-group totals ``per_group`` ({name: [G, ...]}).

    All statistics share the same ``n_boot`` draws of the ``G`` groups (seeded by ``seed``).
    """
    check_bootstrap_args(n_boot, level)
    n_groups = {v.shape[0] for v in per_group.values()}
    if len(n_groups) != 1:
        raise ValueError(f"per-group totals must share their group count, got {sorted(n_groups)}")
    G = n_groups.pop()
    est = estimates(per_group, statistics)
    if G < 2 or n_boot == 0:
        return {k: percentile_interval(v, torch.empty(0, dtype=torch.float64), level, G) for k, v in est.items()}
    counts = resample_counts(G, n_boot, torch.Generator().manual_seed(seed))
    reps = replicate_statistics(per_group, statistics, counts)
    return {k: percentile_interval(est[k], reps[k], level, G) for k in statistics}


def group_totals(groups_M: torch.Tensor, totals: Totals) -> dict[str, torch.Tensor]:
    """Totals of M units ``{name: [M, ...]}`` summed per group ``[G, ...]`` (groups in sorted id order), and
    ``"n"``: the units of each group. ``groups_M``: each unit's group id (e.g. the document of a context)."""
    _, inverse = torch.unique(groups_M.cpu(), return_inverse=True)
    G = int(inverse.max()) + 1 if inverse.numel() else 0
    ones = torch.ones(inverse.numel(), dtype=torch.float64)
    return {"n": torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, ones),
            **{k: torch.zeros((G, *v.shape[1:]), dtype=torch.float64).index_add_(0, inverse, v.double().cpu())
               for k, v in totals.items()}}


def check_documents(documents_N: torch.Tensor | None, tokens_NT: torch.Tensor) -> None:
    """Refuse documents that do not name one per context of ``tokens_NT``."""
    if documents_N is not None and tuple(documents_N.shape) != (tokens_NT.shape[0],):
        raise ValueError(f"documents must hold one document per context ({tokens_NT.shape[0]}), got shape "
                         f"{tuple(documents_N.shape)}")


def resampled_documents(documents: torch.Tensor | None) -> torch.Tensor | None:
    """``documents`` as the units to resample, or None (each context its own unit) where they name fewer than
    two: one document's contexts are the only units its text has (a .txt corpus is one document). Give it the
    documents of the contexts a metric's intervals read, not of the whole draw: a metric whose own contexts lie
    in one document would otherwise get one group, and no interval."""
    if documents is None or torch.unique(documents).numel() < 2:
        return None
    return documents


def by_document(per_context: Totals, documents: torch.Tensor | None) -> Totals:
    """Per-context totals summed per document (``documents``: each context's; None: each context is its own
    group), so that a replicate draws whole documents."""
    if documents is None:
        return per_context
    return {k: v for k, v in group_totals(documents, per_context).items() if k in per_context}


MAX_GROUPS = 4096
"""The most groups :func:`bounded_groups` keeps: plenty for an interval, and a bound on the per-group sums."""


def bounded_groups(groups_N: torch.Tensor) -> torch.Tensor:
    """Group ids ``0 .. G-1`` for the units' ``groups_N`` (e.g. documents), G at most ``MAX_GROUPS``: beyond it,
    whole groups are merged (a merged group is still drawn whole, so the intervals stay valid)."""
    return torch.unique(groups_N.cpu(), return_inverse=True)[1] % MAX_GROUPS


def ratio(num: str, den: str) -> Statistic:
    """The statistic ``total[num] / total[den]`` (a mean over the pooled values; NaN when den is 0)."""
    def fn(t: Totals) -> torch.Tensor:
        d = t[den]
        return torch.where(d != 0, t[num] / torch.where(d != 0, d, torch.ones_like(d)),
                           torch.full_like(d, float("nan")))
    return fn


def earlier_intervals(result: dict, method: str) -> str | None:
    """Why ``result``'s intervals are not the ones this saelab computes, or None where they are: each metric's
    result records its ``INTERVAL_METHOD`` as ``interval_method`` (``method``: the metric's now); one an earlier
    saelab wrote records none, or another. Its numbers are those of its settings, but its intervals (or their
    absence) are the earlier method's, so it is computed again rather than reused or shown beside new ones."""
    recorded = result.get("interval_method")
    if recorded == method:
        return None
    if recorded is None:
        return ("it has no intervals (an earlier saelab wrote it, before saelab computed them)" if "intervals" not in
                result else "its intervals are an earlier saelab's (it records no interval_method)")
    return f"its intervals were made another way (interval_method {recorded!r}; this saelab's: {method!r})"


def format_interval(interval: dict | None, fmt: str = "{:.4f}") -> str:
    """`` [low, high]`` for reports; why there is none when too few groups were drawn from ('' when there is no
    interval otherwise)."""
    n = (interval or {}).get("n_groups")
    if isinstance(n, int) and n < 2:
        return f" (no interval: {n} {plural(n, 'group')})"
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return ""
    return f" [{fmt.format(interval['low'])}, {fmt.format(interval['high'])}]"
