"""Reconstruction metrics: nMSE (= FVU), L0, dead and dense latents.

    nMSE = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2

where mean(x) is the mean over all evaluated rows (not over a batch), so the value does not
depend on how the rows are batched. The denominator is accumulated as sum ||x||^2 - N ||mean||^2
in float64, exact for any batching.

It is reported in two spaces:

- ``nmse``: in the raw activation space (x as the model produces it, x_hat after the SAE has
  undone its input normalization): the error the model sees when the SAE is spliced in.
- ``nmse_sae_input``: in the SAE's own input space, the paper's nMSE: x_n = the activation after
  the SAE's input normalization (``TopKSAE.normalize_input``; LayerNorm for OpenAI's v5 SAEs and
  ``input_norm='layernorm'``) and x_hat_n = the decoder output before de-normalization. For an SAE
  without input normalization the two are the same number. They differ for a LayerNorm SAE because
  de-normalizing multiplies each token's error by its std: tokens of large norm weigh more in raw
  space.

Rows that do not vary around their mean (one row, or identical rows) have no nMSE (its denominator
is 0): they are refused (NonFiniteError naming the space), not reported as inf.

Given each row's group (``row_groups``: e.g. the document of its context), the same sums are also kept per
group (``ReconstructionResult.per_group``), from which ``NMSE_STATS`` recompute both nMSEs on bootstrap
draws of the groups (the mean of each draw is that draw's own, as a fresh sample's would be).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.errors import NonFiniteError
from saelab.utils.words import plural

DENSE_THRESHOLD = 0.1
"""A latent is 'dense' if it fires on more than this fraction of evaluated tokens."""


@dataclass
class ReconstructionResult:
    nmse: float
    """Normalized MSE / fraction of variance unexplained, in the raw activation space."""
    nmse_sae_input: float
    """The same in the SAE's input space (after its input normalization; = nmse without one)."""
    l0: float
    """Mean number of nonzero latents per token."""
    dead_frac: float
    """Fraction of latents that never fired on the n_tokens evaluated."""
    dense_frac: float
    """Fraction of latents firing on more than DENSE_THRESHOLD of tokens."""
    n_tokens: int
    """Rows evaluated (the window for 'dead')."""
    per_group: dict[str, torch.Tensor] | None = None
    """The nMSE sums of each group of rows ({name: [G, ...]}, ``NMSE_STATS``' inputs); None without groups."""

    def to_dict(self) -> dict[str, float | int]:
        return {"nmse": self.nmse, "nmse_sae_input": self.nmse_sae_input, "l0": self.l0, "dead_frac": self.dead_frac,
                "dense_frac": self.dense_frac, "n_tokens": self.n_tokens}


class _NMSESums:
    """Float64 sums from which the nMSE of all rows seen follows, whatever the batching; with ``n_groups``, the
    same sums of each group of rows too."""

    def __init__(self, d_in: int, space: str, n_groups: int = 0):
        self.space = space
        self.sse = torch.zeros((), dtype=torch.float64)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = torch.zeros((), dtype=torch.float64)
        self.rows = 0
        self.groups = {"sse": torch.zeros(n_groups, dtype=torch.float64), "rows": torch.zeros(n_groups, dtype=torch.float64),
                       "sum_x": torch.zeros(n_groups, d_in, dtype=torch.float64),
                       "sum_sq": torch.zeros(n_groups, dtype=torch.float64)}

    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, groups_B: torch.Tensor | None = None) -> None:
        x = x_BD.double()  # reduced where it lies (CPU or accelerator); only the sums move
        sse_B, sq_B = (x - x_hat_BD.double()).pow(2).sum(1), x.pow(2).sum(1)
        self.sse += sse_B.sum().cpu()
        self.sum_x += x.sum(dim=0).cpu()
        self.sum_sq += sq_B.sum().cpu()
        self.rows += x.shape[0]
        if groups_B is not None:  # kept where the rows lie: one copy to the host, at the end (group_sums)
            g = groups_B.to(x.device)
            for name, rows in (("sse", sse_B), ("sum_sq", sq_B), ("sum_x", x), ("rows", torch.ones_like(sse_B))):
                self.groups[name] = self.groups[name].to(x.device).index_add_(0, g, rows)

    def group_sums(self) -> dict[str, torch.Tensor]:
        return {name: v.cpu() for name, v in self.groups.items()}

    def nmse(self) -> float:
        mean = self.sum_x / self.rows
        return _nmse_value(self.sse, self.sum_sq - self.rows * mean.pow(2).sum(), self.sum_sq, self.rows, self.space)


def _nmse_value(sse: torch.Tensor, centred: torch.Tensor, total: torch.Tensor, rows: int, space: str) -> float:
    """sse / centred (sum ||x - mean x||^2); refused where the rows do not vary around their mean."""
    # float32 rows that are one vector (or one after a LayerNorm) still vary by rounding, ~1e-12 of sum ||x||^2
    if not centred > 1e-9 * total:
        raise NonFiniteError(f"{space}: nMSE is undefined where the rows do not vary around their mean ({rows:,} "
                             f"{plural(rows, 'row')}; sum ||x - mean x||^2 is 0); expected at least 2 rows that differ")
    return float(sse / centred)


def _nmse_of(space: str):
    """The nMSE of ``space``'s totals on each bootstrap draw ({name: [B, ...]}), NaN where the draw does not vary."""
    def fn(t):
        centred = t[f"{space}_sum_sq"] - t[f"{space}_sum_x"].pow(2).sum(-1) / t[f"{space}_rows"]
        return torch.where(centred > 0, t[f"{space}_sse"] / centred, torch.full_like(centred, float("nan")))
    return fn


NMSE_STATS = {"nmse": _nmse_of("raw"), "nmse_sae_input": _nmse_of("sae_input")}
"""Both nMSEs from the per-group sums of ``ReconstructionResult.per_group``."""


class ReconstructionAccumulator:
    """Accumulates reconstruction statistics batch by batch; ``row_groups``: the group of every row to come
    (in order), whose sums are kept apart for the intervals."""

    def __init__(self, n_latents: int, d_in: int, row_groups: torch.Tensor | None = None):
        n_groups = 0 if row_groups is None else int(row_groups.max()) + 1 if row_groups.numel() else 0
        self.row_groups = row_groups
        self.raw = _NMSESums(d_in, "eval activations", n_groups)
        self.sae_input = _NMSESums(d_in, "eval activations after the SAE's input normalization", n_groups)
        self.nonzero = 0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.long)

    @property
    def rows(self) -> int:
        return self.raw.rows

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, vals_BK: torch.Tensor, idx_BK: torch.Tensor,
               x_n_BD: torch.Tensor | None = None, x_hat_n_BD: torch.Tensor | None = None) -> None:
        """One batch: raw x and x_hat, the kept latents, and the same pair in the SAE's input space
        (``x_n``, ``x_hat_n``; None when the SAE has no input normalization: then it is x, x_hat)."""
        groups = None if self.row_groups is None else self.row_groups[self.rows:self.rows + x_BD.shape[0]]
        self.raw.update(x_BD, x_hat_BD, groups)
        if x_n_BD is None:
            x_n_BD, x_hat_n_BD = x_BD, x_hat_BD
        self.sae_input.update(x_n_BD, x_hat_n_BD, groups)
        active = vals_BK > 0
        self.nonzero += int(active.sum())
        self.fire_counts += torch.bincount(idx_BK[active].flatten().cpu(), minlength=self.fire_counts.numel())

    @property
    def frequencies(self) -> torch.Tensor:
        return self.fire_counts.double() / max(self.rows, 1)

    def result(self) -> ReconstructionResult:
        if self.rows == 0:
            raise ValueError("no rows were evaluated")
        freq = self.frequencies
        return ReconstructionResult(
            nmse=self.raw.nmse(),
            nmse_sae_input=self.sae_input.nmse(),
            l0=self.nonzero / self.rows,
            dead_frac=float((self.fire_counts == 0).double().mean()),
            dense_frac=float((freq > DENSE_THRESHOLD).double().mean()),
            n_tokens=self.rows,
            per_group=None if self.row_groups is None else
            {f"{space}_{k}": v for space, sums in (("raw", self.raw), ("sae_input", self.sae_input))
             for k, v in sums.group_sums().items()},
        )


def nmse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """nMSE of one set of rows (the definition, in one line)."""
    x = x_ND.double()
    return _nmse_value((x - x_hat_ND.double()).pow(2).sum(), (x - x.mean(dim=0)).pow(2).sum(), x.pow(2).sum(),
                       x.shape[0], "rows")


@torch.no_grad()
def reconstruction_metrics(sae, batches, *, progress: bool = False, row_groups: torch.Tensor | None = None
                           ) -> tuple[ReconstructionResult, torch.Tensor]:
    """Evaluate an SAE on an iterable of raw activation batches [B, d_in].

    Returns the metrics (nMSE in both spaces, module docstring) and the per-latent firing frequency.
    ``row_groups``: the group (0 .. G-1) of each row, in order, for the per-group sums of the intervals.
    """
    from tqdm.auto import tqdm

    acc = ReconstructionAccumulator(sae.n_latents, sae.d_in, row_groups)
    for x in tqdm(batches, desc="reconstruction", unit="batch", disable=not progress):
        x = x.to(device=sae.W_dec.device, dtype=torch.float32)
        x_hat, vals, idx, x_n, x_hat_n = sae.forward_normalized(x)
        acc.update(x, x_hat, vals, idx, x_n, x_hat_n)
    return acc.result(), acc.frequencies
