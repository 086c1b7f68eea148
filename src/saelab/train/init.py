"""Data-dependent initialisation: b_pre from the geometric median, the loss normalizer.

Runs on the device of the SAE and the sample; random draws come from a CPU generator, so a
given seed picks the same rows and directions on every device."""

from __future__ import annotations

import torch

from saelab.errors import NonFiniteError
from saelab.sae.topk import TopKSAE
from saelab.utils.tensors import all_finite


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
def init_from_data(sae: TopKSAE, sample_ND: torch.Tensor, *, use_geometric_median: bool = True,
                   decoder_from_data: bool = False, max_cos: float = 1.0, noise: float = 0.0,
                   scale_encoder: bool = False,
                   generator: torch.Generator | None = None) -> float:
    """Set b_dec (b_pre) from a sample and return the nMSE normalizer for the training loss.

    The normalizer is the mean squared distance of the (normalized) inputs to their mean, computed
    once here so the loss scale does not drift with batches.

    ``decoder_from_data`` points each decoder row at a centred sample direction (encoder tied to
    it), so latents start where the data is: directions closer than ``max_cos`` to an already
    chosen one are skipped (near-duplicates compete until one dies), and each is mixed with
    ``noise`` times the random unit row the decoder holds on entry (pure sample directions
    make latents that fire rarely once trained; the random part spreads them). ``scale_encoder`` rescales the encoder by the scalar
    that makes the initial top-k reconstruction least-squares optimal (top-k choices do not
    change under a positive scale while b_enc = 0), so training starts at the right magnitude.
    """
    if not all_finite(sample_ND):
        raise NonFiniteError("the initialisation sample of activations contains NaN or inf")
    x_n, _ = sae.normalize_input(sample_ND.float())
    sae.b_dec.copy_(geometric_median(x_n) if use_geometric_median else x_n.mean(dim=0))
    if decoder_from_data:
        rows = distinct_directions(x_n - sae.b_dec, sae.n_latents, max_cos, generator=generator)
        random_rows = sae.W_dec.detach().clone()
        if rows.shape[0] < sae.n_latents:  # the sample ran out of distinct directions: random rows for the rest
            rows = torch.cat([rows, random_rows[rows.shape[0]:]])
        rows = rows + noise * random_rows
        rows /= rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
    if scale_encoder:
        probe = x_n[:8192]
        vals, idx, _ = sae.encode_topk(probe)
        recon = sae.decode_topk(vals, idx, bias=False)
        scale = ((probe - sae.b_dec) * recon).sum() / recon.pow(2).sum().clamp_min(1e-12)
        if scale > 0:
            sae.W_enc.mul_(scale)
    normalizer = (x_n - x_n.mean(dim=0)).pow(2).sum(dim=1).mean().item()
    if normalizer <= 0:
        raise NonFiniteError("the initialisation sample has zero variance; activations look constant")
    return normalizer


@torch.no_grad()
def distinct_directions(rows_ND: torch.Tensor, n: int, max_cos: float, generator: torch.Generator | None = None,
                        block: int = 1024) -> torch.Tensor:
    """Up to n unit directions of the rows, taken in random order, skipping any whose cosine to
    an already taken one exceeds max_cos (fewer than n when the rows run out)."""
    u = rows_ND / rows_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # The order is drawn on the CPU (the generator's device), so it is the same on every device.
    u = u[torch.randperm(u.shape[0], generator=generator).to(u.device)]
    if max_cos >= 1.0:
        return u[:n]
    chosen = u.new_empty(0, u.shape[1])
    for lo in range(0, u.shape[0], block):
        cand = u[lo:lo + block]
        if chosen.shape[0]:
            cand = cand[(cand @ chosen.T).amax(dim=1) <= max_cos]
        # Within the block earlier candidates win: a sequential scan, on the CPU (no GPU sync per row).
        close = ((cand @ cand.T) > max_cos).triu(1).cpu()
        keep = torch.ones(cand.shape[0], dtype=torch.bool)
        for i in range(cand.shape[0]):
            if keep[i]:
                keep[close[i]] = False
        chosen = torch.cat([chosen, cand[keep.to(cand.device)]])
        if chosen.shape[0] >= n:
            break
    return chosen[:n]
