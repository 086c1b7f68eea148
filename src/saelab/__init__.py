"""saelab: train, evaluate and explore top-k sparse autoencoders on language-model activations."""

__version__ = "0.1.0"

from saelab.errors import SaelabError
from saelab.sae.topk import TopKSAE, SAEConfig

__all__ = ["SaelabError", "TopKSAE", "SAEConfig", "__version__"]
