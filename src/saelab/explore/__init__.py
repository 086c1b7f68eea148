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

from saelab.explore.attribution import (
    Attribution,
    TokenSaliency,
    ablation_effects,
    attribution_patching,
    compare_attribution_with_ablation,
    latent_logit_effects,
    logit_diff,
    token_latent_gradients,
    unembed_direction,
)
from saelab.explore.positions import parse_positions, position_tracker
from saelab.explore.spliced import (
    SAE_HOOK_POINTS,
    latent_edit,
    run_with_cache_with_saes,
    run_with_saes,
    sae_hook_name,
    spliced,
)
from saelab.explore.steering import (
    SteeredGeneration,
    Steering,
    combine_edits,
    generate,
    generate_ids,
    generate_with_and_without,
    steer,
)
from saelab.explore.top import TopActivations, latent_max_activation, top_activations

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
