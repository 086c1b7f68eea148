"""The top-k sparse autoencoder, the ReLU + L1 baseline, and their file formats."""

from saelab.utils.lazy import lazy_names

# Each imported with its module (torch) when first used: saelab.sae.config is read without torch.
lazy_names(__name__, {
    "saelab.sae.io": ("load_from_hub", "load_sae", "load_sparsify", "openai_v5_url", "read_sparsity", "save_sae",
                      "save_sparsify"),
    "saelab.sae.openai_format": ("OPENAI_LOCATION_TO_HOOK", "openai_hook_name"),
    "saelab.sae.relu": ("ReLUSAE", "relu_config"),
    "saelab.sae.sparsify_format": ("hook_to_hookpoint", "hookpoint_to_hook"),
    "saelab.sae.topk": ("SAEConfig", "SAEMetadata", "TopKSAE"),
})

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
