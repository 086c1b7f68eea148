"""The top-k sparse autoencoder and its file formats."""

from saelab.sae.io import load_sae, openai_v5_url, read_sparsity, save_sae
from saelab.sae.openai_format import OPENAI_LOCATION_TO_HOOK, openai_hook_name
from saelab.sae.topk import SAEConfig, TopKSAE

__all__ = [
    "OPENAI_LOCATION_TO_HOOK",
    "SAEConfig",
    "TopKSAE",
    "load_sae",
    "openai_hook_name",
    "openai_v5_url",
    "read_sparsity",
    "save_sae",
]
