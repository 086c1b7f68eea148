"""Reconstruction metrics: nMSE (= FVU), L0, dead and dense latents.

    nMSE = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2

where mean(x) is the mean over all evaluated rows (not over a batch), so the value does not
depend on how the rows are batched. The denominator is accumulated as sum ||x||^2 - N ||mean||^2
in float64, exact for any batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DENSE_THRESHOLD = 0.1
"""A latent is 'dense' if it fires on more than this fraction of evaluated tokens."""


@dataclass
class ReconstructionResult:
    nmse: float
    """Normalized MSE / fraction of variance unexplained."""
    l0: float
    """Mean number of nonzero latents per token."""
    dead_frac: float
    """Fraction of latents that never fired on the n_tokens evaluated."""
    dense_frac: float
    """Fraction of latents firing on more than DENSE_THRESHOLD of tokens."""
    n_tokens: int
    """Rows evaluated (the window for 'dead')."""

    def to_dict(self) -> dict[str, float | int]:
        return {"nmse": self.nmse, "l0": self.l0, "dead_frac": self.dead_frac,
                "dense_frac": self.dense_frac, "n_tokens": self.n_tokens}


class ReconstructionAccumulator:
    """Accumulates reconstruction statistics batch by batch."""

    def __init__(self, n_latents: int, d_in: int):
        self.sse = torch.zeros((), dtype=torch.float64)
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = torch.zeros((), dtype=torch.float64)
        self.rows = 0
        self.nonzero = 0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.long)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, vals_BK: torch.Tensor, idx_BK: torch.Tensor) -> None:
        x = x_BD.double()
        self.sse += (x - x_hat_BD.double()).pow(2).sum()
        self.sum_x += x.sum(dim=0)
        self.sum_sq += x.pow(2).sum()
        self.rows += x.shape[0]
        active = vals_BK > 0
        self.nonzero += int(active.sum())
        self.fire_counts += torch.bincount(idx_BK[active].flatten(), minlength=self.fire_counts.numel())

    @property
    def frequencies(self) -> torch.Tensor:
        return self.fire_counts.double() / max(self.rows, 1)

    def result(self) -> ReconstructionResult:
        if self.rows == 0:
            raise ValueError("no rows were evaluated")
        mean = self.sum_x / self.rows
        total_var = self.sum_sq - self.rows * mean.pow(2).sum()
        freq = self.frequencies
        return ReconstructionResult(
            nmse=float(self.sse / total_var),
            l0=self.nonzero / self.rows,
            dead_frac=float((self.fire_counts == 0).double().mean()),
            dense_frac=float((freq > DENSE_THRESHOLD).double().mean()),
            n_tokens=self.rows,
        )


def nmse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """nMSE of one set of rows (the definition, in one line)."""
    x = x_ND.double()
    return float((x - x_hat_ND.double()).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())


@torch.no_grad()
def reconstruction_metrics(sae, batches, *, progress: bool = False) -> tuple[ReconstructionResult, torch.Tensor]:
    """Evaluate an SAE on an iterable of raw activation batches [B, d_in].

    Returns the metrics and the per-latent firing frequency.
    """
    from tqdm.auto import tqdm

    acc = ReconstructionAccumulator(sae.n_latents, sae.d_in)
    for x in tqdm(batches, desc="reconstruction", unit="batch", disable=not progress):
        x = x.float()
        x_hat, vals, idx = sae.forward_with_latents(x)
        acc.update(x, x_hat, vals, idx)
    return acc.result(), acc.frequencies
