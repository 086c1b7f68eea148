"""The top-k sparse autoencoder, the ReLU + L1 baseline, and their file formats."""

from saelab.sae.io import (
    load_from_hub,
    load_sae,
    load_sparsify,
    openai_v5_url,
    read_sparsity,
    save_sae,
    save_sparsify,
)
from saelab.sae.openai_format import OPENAI_LOCATION_TO_HOOK, openai_hook_name
from saelab.sae.relu import ReLUSAE, relu_config
from saelab.sae.sparsify_format import hook_to_hookpoint, hookpoint_to_hook
from saelab.sae.topk import SAEConfig, SAEMetadata, TopKSAE

__all__ = [
    "OPENAI_LOCATION_TO_HOOK",
    "ReLUSAE",
    "SAEConfig",
    "SAEMetadata",
    "TopKSAE",
    "hook_to_hookpoint",
    "hookpoint_to_hook",
    "load_from_hub",
    "load_sae",
    "load_sparsify",
    "openai_hook_name",
    "openai_v5_url",
    "relu_config",
    "read_sparsity",
    "save_sae",
    "save_sparsify",
]
