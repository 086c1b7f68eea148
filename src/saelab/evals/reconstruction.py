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

    def to_dict(self) -> dict[str, float | int]:
        return {"nmse": self.nmse, "nmse_sae_input": self.nmse_sae_input, "l0": self.l0, "dead_frac": self.dead_frac,
                "dense_frac": self.dense_frac, "n_tokens": self.n_tokens}


class _NMSESums:
    """Float64 sums from which the nMSE of all rows seen follows, whatever the batching."""

    def __init__(self, d_in: int, space: str):
        self.space = space
        self.sse = torch.zeros((), dtype=torch.float64)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = torch.zeros((), dtype=torch.float64)
        self.rows = 0

    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> None:
        x = x_BD.double()  # reduced where it lies (CPU or accelerator); only the sums move
        self.sse += (x - x_hat_BD.double()).pow(2).sum().cpu()
        self.sum_x += x.sum(dim=0).cpu()
        self.sum_sq += x.pow(2).sum().cpu()
        self.rows += x.shape[0]

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


class ReconstructionAccumulator:
    """Accumulates reconstruction statistics batch by batch."""

    def __init__(self, n_latents: int, d_in: int):
        self.raw = _NMSESums(d_in, "eval activations")
        self.sae_input = _NMSESums(d_in, "eval activations after the SAE's input normalization")
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
        self.raw.update(x_BD, x_hat_BD)
        if x_n_BD is None:
            x_n_BD, x_hat_n_BD = x_BD, x_hat_BD
        self.sae_input.update(x_n_BD, x_hat_n_BD)
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
        )


def nmse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """nMSE of one set of rows (the definition, in one line)."""
    x = x_ND.double()
    return _nmse_value((x - x_hat_ND.double()).pow(2).sum(), (x - x.mean(dim=0)).pow(2).sum(), x.pow(2).sum(),
                       x.shape[0], "rows")


@torch.no_grad()
def reconstruction_metrics(sae, batches, *, progress: bool = False) -> tuple[ReconstructionResult, torch.Tensor]:
    """Evaluate an SAE on an iterable of raw activation batches [B, d_in].

    Returns the metrics (nMSE in both spaces, module docstring) and the per-latent firing frequency.
    """
    from tqdm.auto import tqdm

    acc = ReconstructionAccumulator(sae.n_latents, sae.d_in)
    for x in tqdm(batches, desc="reconstruction", unit="batch", disable=not progress):
        x = x.to(device=sae.W_dec.device, dtype=torch.float32)
        x_hat, vals, idx, x_n, x_hat_n = sae.forward_normalized(x)
        acc.update(x, x_hat, vals, idx, x_n, x_hat_n)
    return acc.result(), acc.frequencies
