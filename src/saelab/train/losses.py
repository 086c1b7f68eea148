"""One forward pass of the training objective: nMSE + AuxK + Multi-TopK (or, for the ReLU baseline,
nMSE + lambda * decoder-norm-weighted L1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saelab.sae.kernels import decode_aux, sparse_decode, sparse_topk_encode
from saelab.sae.relu import ReLUSAE
from saelab.sae.topk import TopKSAE
from saelab.train.config import TrainConfig
from saelab.train.distributed import all_reduce_sum


@dataclass
class StepOutput:
    """The loss and the step's statistics. The statistics are 0-d tensors on the data's device, read by
    the caller in one go after the backward (``stats``): each read of a GPU value waits for the GPU,
    and a wait between the forward and the backward leaves the GPU idle while the backward's kernels
    are being launched."""
    loss: torch.Tensor
    """Total loss to backpropagate."""
    nmse: torch.Tensor
    """Normalized MSE of the top-k reconstruction (in the SAE's input space)."""
    auxk: torch.Tensor
    """AuxK loss (0 when no latent is dead)."""
    multi_topk: torch.Tensor
    """Multi-TopK loss (0 when off)."""
    l0: torch.Tensor
    """Mean number of nonzero latents per row."""
    idx_BK: torch.Tensor
    """Latents selected by TopK (for dead-latent tracking)."""
    vals_BK: torch.Tensor
    l1: torch.Tensor | None = None
    """ReLU SAEs: the L1 penalty before lambda (None for top-k)."""

    def stats(self) -> dict[str, torch.Tensor]:
        """{name: 0-d tensor}: the loss and every statistic, detached."""
        out = {"loss": self.loss, "nmse": self.nmse, "auxk": self.auxk, "multi_topk": self.multi_topk, "l0": self.l0}
        if self.l1 is not None:
            out["l1"] = self.l1
        return {name: value.detach() for name, value in out.items()}


def residual_variance(r_BD: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the rows to their mean, over the GLOBAL batch when data-parallel."""
    stats = torch.cat([r_BD.sum(dim=0), r_BD.pow(2).sum().reshape(1),
                       r_BD.new_full((1,), float(r_BD.shape[0]))])  # made on the device: no copy to wait for
    stats = all_reduce_sum(stats)
    rows = stats[-1]
    mean = stats[:-2] / rows
    return (stats[-2] / rows - mean.pow(2).sum()).clamp_min(1e-12)


def normalized_mse(x_hat_BD: torch.Tensor, x_BD: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||x - x_hat||^2, over ``normalizer``. One fused kernel each way (mse_loss):
    written as (x - x_hat).pow(2).sum(-1).mean(), its forward and backward take ~8 passes over [B, d]."""
    return F.mse_loss(x_hat_BD, x_BD, reduction="sum") / (x_BD.shape[0] * normalizer)


def training_loss(
    sae: TopKSAE, x_BD: torch.Tensor, cfg: TrainConfig, normalizer: float, dead_mask_N: torch.Tensor | None,
    step: int | None = None,
) -> StepOutput:
    """The paper's loss on one batch of raw activations (a ReLU SAE's: ``relu_l1_loss``, at ``step``)."""
    if isinstance(sae, ReLUSAE):
        return relu_l1_loss(sae, x_BD, cfg, normalizer, step)
    x_n, _ = sae.normalize_input(x_BD)
    k = sae.cfg.k
    big_k = min(k * cfg.multi_topk_factor, sae.n_latents) if cfg.multi_topk else k
    dead_idx = None
    if cfg.auxk and dead_mask_N is not None:
        dead_idx = dead_mask_N.nonzero().squeeze(1).to(x_n.device)  # index on the data's device
        dead_idx = dead_idx if dead_idx.numel() else None
    # One sorted top-(4k) serves both TopK and Multi-TopK: the top-k are its first k.
    enc = sparse_topk_encode(x_n, sae.b_dec, sae.W_enc, sae.b_enc, big_k, dead_idx=dead_idx, k_aux=cfg.k_aux,
                             sorted_out=cfg.multi_topk)
    vals, idx = enc.vals_BK[:, :k], enc.idx_BK[:, :k]

    # sae.decode_topk's numbers, with the faster decoder-gradient backward of sparse_decode.
    x_hat = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
    nmse = normalized_mse(x_hat, x_n, normalizer)
    loss = nmse

    multi = x_n.new_zeros(())
    if cfg.multi_topk:
        multi = normalized_mse(sparse_decode(enc.vals_BK, enc.idx_BK, sae.W_dec) + sae.b_dec, x_n, normalizer)
        loss = loss + cfg.multi_topk_coef * multi

    auxk = x_n.new_zeros(())
    if enc.aux_vals_BA is not None:
        # Dead latents reconstruct the residual, decoded WITHOUT b_dec (it is a difference).
        with torch.no_grad():
            residual = x_n - x_hat
        auxk = normalized_mse(decode_aux(enc, sae.W_dec), residual, residual_variance(residual))
        loss = loss + cfg.auxk_coef * auxk

    l0 = (vals > 0).sum(dim=-1).float().mean()
    return StepOutput(loss, nmse, auxk, multi, l0, idx, vals)


L1_WARMUP_FRACTION = 0.05
"""lambda rises linearly from 0 over this first fraction of the steps (Anthropic, April 2024 update)."""


def l1_coefficient_at(cfg: TrainConfig, step: int | None) -> float:
    """lambda at ``step`` (0-based): linear warmup over the first 5 % of steps; None: the full value."""
    warmup = max(1, round(L1_WARMUP_FRACTION * cfg.total_steps))
    if step is None or step >= warmup:
        return cfg.l1_coefficient
    return cfg.l1_coefficient * (step + 1) / warmup


def relu_l1_loss(sae: ReLUSAE, x_BD: torch.Tensor, cfg: TrainConfig, normalizer: float,
                 step: int | None = None) -> StepOutput:
    """nMSE + lambda * mean over rows of sum_i z_i ||W_dec_i|| / sqrt(d_in * normalizer).

    The decoder-norm weighting (SAELens' standard SAE; Anthropic's April 2024 update) lets the decoder
    go unconstrained without the L1 shrinking z by growing W_dec. The division makes this Anthropic's
    loss divided by d_in when the activations are scaled so that E||x||^2 = d_in (their normalization,
    with ``normalizer`` in the place of E||x||^2), so lambda has their units: MSE_s = d_in * nMSE and
    z_s = z * sqrt(d_in / normalizer). No AuxK or Multi-TopK: the baseline has neither.
    """
    x_n, _ = sae.normalize_input(x_BD)
    z, idx, _ = sae.encode_topk(x_n)
    x_hat = sae.decode_topk(z, idx)
    nmse = normalized_mse(x_hat, x_n, normalizer)
    l1 = (z @ sae.W_dec.norm(dim=1)).mean() / math.sqrt(sae.d_in * normalizer)
    loss = nmse + l1_coefficient_at(cfg, step) * l1
    l0 = (z > 0).sum(dim=-1).float().mean()
    zero = x_n.new_zeros(())
    return StepOutput(loss, nmse, zero, zero, l0, idx, z, l1=l1)
