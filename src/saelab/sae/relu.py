"""The ReLU sparse autoencoder trained with an L1 penalty: the baseline TopK is compared against.

    z     = ReLU(W_enc^T (x - b_dec) + b_enc)
    x_hat = W_dec^T z + b_dec

This is SAELens' ``architecture="standard"`` (``apply_b_dec_to_input=True``), and the baseline of
Gao et al. (2024), Figure 2 / section 5.1. It is the k = n case of :class:`TopKSAE` (keeping every
latent, then ReLU, is plain ReLU), so it subclasses it with ``cfg.k == cfg.n_latents``: the weights,
their layout, the input normalization, ``decode``, the shape checks and every file format reader stay
shared. What differs is that the latents are dense: ``encode_topk`` returns all n latents with the
identity index (``all_latents``), and ``decode_topk`` recognises that index and runs one dense matmul
instead of gathering rows. So every metric written against the top-k interface (``forward_with_latents``,
``forward_normalized``, ``encode_topk``/``decode_topk``) gives the ReLU SAE's numbers; its L0 depends on
the data (the count of positive latents).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.sae.topk import SAEConfig, TopKOutput, TopKSAE

SAELENS_ARCHITECTURE = "standard"
"""SAELens' name for this SAE in ``cfg.json``."""


def relu_config(d_in: int, n_latents: int, **fields: Any) -> SAEConfig:
    """An SAEConfig for a ReLU SAE (k = n_latents: every positive latent is kept)."""
    return SAEConfig(d_in=d_in, n_latents=n_latents, k=n_latents, **fields)


def sparsity_of(sae: TopKSAE) -> dict[str, Any]:
    """How ``sae`` picks its latents, as the files that describe it record it: ``{"activation": "topk", "k": k}``,
    or ``{"activation": "relu", "k": None}`` (a ReLU SAE keeps every positive latent: its k = n_latents is no
    top-k, and read as one it showed as "k = 512")."""
    if isinstance(sae, ReLUSAE):
        return {"activation": "relu", "k": None}
    return {"activation": "topk", "k": sae.cfg.k}


class ReLUSAE(TopKSAE):
    """ReLU + L1 SAE (SAELens 'standard'); answers the same methods as :class:`TopKSAE`."""

    architecture = "relu"

    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 init: bool = True):
        if cfg.k != cfg.n_latents:
            raise ConfigError(f"a ReLU SAE keeps every positive latent: SAEConfig.k must equal n_latents="
                              f"{cfg.n_latents}, got k={cfg.k} (use saelab.sae.relu.relu_config)")
        super().__init__(cfg, dtype=dtype, device=device, init=init)
        # The identity index handed out with dense latents; not saved (persistent=False), moved by .to().
        self.register_buffer("latent_ids", torch.arange(cfg.n_latents, device=device), persistent=False)

    def all_latents(self, lead: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Index [..., n] naming every latent, a broadcast view (no memory per row)."""
        return self.latent_ids.expand(*lead, self.n_latents)

    def is_all_latents(self, idx: torch.Tensor) -> bool:
        """Whether ``idx`` is (a broadcast of) ``all_latents``: a view of its storage with every latent in order."""
        return (idx.shape[-1] == self.n_latents and idx.stride(-1) == 1 and idx.storage_offset() == 0
                and idx.untyped_storage().data_ptr() == self.latent_ids.untyped_storage().data_ptr())

    def topk(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU of every pre-activation, with the identity index (there is no selection)."""
        self._check_k(k)
        return F.relu(pre), self.all_latents(pre.shape[:-1])

    def _check_k(self, k: int | None) -> None:
        if k is not None and k != self.n_latents:
            raise ConfigError(f"a ReLU SAE has no top-k selection: k must be None or n_latents={self.n_latents}, "
                              f"got {k}")

    def encode_topk(self, x_n: torch.Tensor, k: int | None = None) -> TopKOutput:
        """Dense ReLU latents of normalized input, in the top-k form: (z, all_latents, pre)."""
        pre = self.pre_acts(x_n)
        return TopKOutput(*self.topk(pre, k), pre)

    def decode_topk(self, vals: torch.Tensor, idx: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Sum of decoder rows weighted by ``vals``: a dense matmul for ``all_latents``, else the gather."""
        if not self.is_all_latents(idx):
            return super().decode_topk(vals, idx, bias=bias)
        out = vals.reshape(-1, self.n_latents) @ self.W_dec
        out = out.reshape(*vals.shape[:-1], self.d_in)
        return out + self.b_dec if bias else out

    def fired(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """TopKSAE.fired for dense latents (``idx`` all_latents): no [B, n] index copy."""
        if not self.is_all_latents(idx):
            return super().fired(vals, idx)
        return (vals > 0).reshape(-1, self.n_latents).any(0).float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents z [..., n] of raw activations (keeps a LayerNorm SAE's statistics for ``decode``)."""
        return self.encode_sparse(x).vals_BK

    def __repr__(self) -> str:
        c = self.cfg
        return f"ReLUSAE(d_in={c.d_in}, n_latents={c.n_latents}, input_norm={c.input_norm!r}, hook={c.hook_name!r})"


def sae_class(architecture: str) -> type[TopKSAE]:
    """The SAE class of a training architecture ('topk' or 'relu')."""
    classes = {"topk": TopKSAE, "relu": ReLUSAE}
    if architecture not in classes:
        raise ConfigError(f"architecture must be one of {', '.join(classes)}, got {architecture!r}")
    return classes[architecture]


__all__ = ["SAELENS_ARCHITECTURE", "ReLUSAE", "relu_config", "sae_class"]
