"""The top-k sparse autoencoder and its file formats."""

from saelab.sae.topk import SAEConfig, TopKSAE

__all__ = ["SAEConfig", "TopKSAE"]
