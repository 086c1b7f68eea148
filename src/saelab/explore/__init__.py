"""Use SAE latents inside the model: splice SAEs with hook points, steer and ablate, attribute.

- :mod:`saelab.explore.spliced`: ``run_with_saes``, ``run_with_cache_with_saes``, ``spliced`` (SAELens-style
  ``<hook>.hook_sae_*`` points, with or without the error term), ``latent_edit``.
- :mod:`saelab.explore.steering`: ``steer`` (add / clamp / ablate a latent in scoring and generation),
  ``generate_with_and_without``; the ``saelab steer`` verb.
- :mod:`saelab.explore.attribution`: attribution patching, true ablation effects and their comparison,
  latent -> logit effects, token -> latent gradients.
- :mod:`saelab.explore.positions`: what ``positions`` mean, also during generation with a KV cache.
- :mod:`saelab.explore.top`: ``top_activations`` (top-activating contexts of latents over text, the feature
  browser's one-pass code), ``latent_max_activation`` (the unit for steering strengths).
"""

from saelab.utils.lazy import lazy_names

# Each imported with its module (torch) when first used: explore.config and .positions are read without it.
lazy_names(__name__, {
    "saelab.explore.attribution": ("Attribution", "TokenSaliency", "ablation_effects", "attribution_patching",
                                   "compare_attribution_with_ablation", "latent_logit_effects", "logit_diff",
                                   "token_latent_gradients", "unembed_direction"),
    "saelab.explore.positions": ("parse_positions", "position_tracker"),
    "saelab.explore.spliced": ("SAE_HOOK_POINTS", "latent_edit", "run_with_cache_with_saes", "run_with_saes",
                               "sae_hook_name", "spliced"),
    "saelab.explore.steering": ("SteeredGeneration", "Steering", "combine_edits", "generate", "generate_ids",
                                "generate_with_and_without", "steer"),
    "saelab.explore.top": ("TopActivations", "latent_max_activation", "top_activations"),
})

__all__ = [
    "SAE_HOOK_POINTS",
    "Attribution",
    "SteeredGeneration",
    "Steering",
    "TokenSaliency",
    "TopActivations",
    "ablation_effects",
    "attribution_patching",
    "combine_edits",
    "compare_attribution_with_ablation",
    "generate",
    "generate_ids",
    "generate_with_and_without",
    "latent_edit",
    "latent_logit_effects",
    "latent_max_activation",
    "logit_diff",
    "parse_positions",
    "position_tracker",
    "run_with_cache_with_saes",
    "run_with_saes",
    "sae_hook_name",
    "spliced",
    "steer",
    "token_latent_gradients",
    "top_activations",
    "unembed_direction",
]
