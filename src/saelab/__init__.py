"""saelab: train, evaluate and explore top-k sparse autoencoders on language-model activations."""

__version__ = "0.1.0"

from saelab.errors import SaelabError
from saelab.utils.lazy import lazy_names

# The SAE's classes import torch: read when first used, so that `saelab --help` starts without it.
lazy_names(__name__, {"saelab.sae.topk": ("TopKSAE", "SAEConfig")})

__all__ = ["SaelabError", "TopKSAE", "SAEConfig", "__version__"]
