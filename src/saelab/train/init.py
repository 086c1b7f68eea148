"""Data-dependent initialisation: b_pre from the geometric median, the loss normalizer."""

from __future__ import annotations

import torch

from saelab.errors import NonFiniteError
from saelab.sae.topk import TopKSAE


@torch.no_grad()
def geometric_median(points_ND: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    pts = points_ND.double()
    median = pts.mean(dim=0)
    for _ in range(iters):
        dist = (pts - median).norm(dim=1).clamp_min(1e-8)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(dim=0) / w.sum()
        shift = (new - median).norm() / median.norm().clamp_min(1e-12)
        median = new
        if shift < tol:
            break
    return median.to(points_ND.dtype)


@torch.no_grad()
def init_from_data(sae: TopKSAE, sample_ND: torch.Tensor, *, use_geometric_median: bool = True) -> float:
    """Set b_dec (b_pre) from a sample and return the nMSE normalizer for the training loss.

    The normalizer is the mean squared distance of the (normalized) inputs to their mean, computed
    once here so the loss scale does not drift with batches.
    """
    if not torch.isfinite(sample_ND).all():
        raise NonFiniteError("the initialisation sample of activations contains NaN or inf")
    x_n, _ = sae.normalize_input(sample_ND.float())
    sae.b_dec.copy_(geometric_median(x_n) if use_geometric_median else x_n.mean(dim=0))
    normalizer = (x_n - x_n.mean(dim=0)).pow(2).sum(dim=1).mean().item()
    if normalizer <= 0:
        raise NonFiniteError("the initialisation sample has zero variance; activations look constant")
    return normalizer
