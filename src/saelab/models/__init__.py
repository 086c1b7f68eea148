"""Language models with TransformerLens-named hook points (see ``saelab.models.hooks``).

    from saelab.models import load_model
    lm = load_model("default")                         # or "gpt2", a model directory, a .gguf file
    acts_BTD = lm.activations(tokens_BT, "blocks.9.hook_resid_post")
    ce_BT = lm.cross_entropy(tokens_BT, edits={"blocks.9.hook_resid_post": sae})
"""

from saelab.models.config import HOOK_KINDS
from saelab.utils.lazy import lazy_names

# Each imported with its module (torch) when first used: saelab.models.config is read without torch.
lazy_names(__name__, {
    "saelab.models.hooks": ("UnsupportedModelError",),
    "saelab.models.lm": ("LanguageModel",),
    "saelab.models.loading": ("DEFAULT_MODEL", "DEFAULT_MODEL_HUB_ID", "MODEL_FINGERPRINT", "ModelLoadError",
                              "cache_root", "check_before_load", "check_context_fits", "check_hook_layer",
                              "default_gguf_path", "library_bars", "load_model", "model_fingerprint", "model_name",
                              "model_provenance", "same_model",
                              "save_dequantized", "tokenizer_before_load", "tokenizer_on_disk"),
})

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_HUB_ID",
    "HOOK_KINDS",
    "MODEL_FINGERPRINT",
    "LanguageModel",
    "ModelLoadError",
    "UnsupportedModelError",
    "cache_root",
    "check_before_load",
    "check_context_fits",
    "check_hook_layer",
    "default_gguf_path",
    "library_bars",
    "load_model",
    "model_fingerprint",
    "model_name",
    "model_provenance",
    "same_model",
    "save_dequantized",
    "tokenizer_before_load",
    "tokenizer_on_disk",
]
